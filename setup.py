"""Which packages the wheel holds, found and never listed by hand (a hand-written list once
left batchscore.engines out of every install): every package under batchscore/, with or
without an __init__.py, and the bundled artifacts, which live at the top of the checkout and
install as batchscore.artifacts (pyproject.toml's package-dir). The rest is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["batchscore", "batchscore.*"], exclude=["*.__pycache__"]),
        "batchscore.artifacts",
        "batchscore.artifacts.samples",
    ]
)
