"""What users install: the wheel holds every module and artifact, and the README's printed output
is what its first command prints. (`python -m tests.install`, run by .ci/run, also installs the
wheel in fresh venvs; that takes minutes, so it is not a test here.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.install import build, differences, missing_from_wheel, shown_output

BUILD_INPUTS = ["batchscore", "artifacts", "pyproject.toml", "setup.py", "README.md"]


def _copy_for_build(target: Path) -> Path:
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target / name)
    return target


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_artifact(tmp_path: Path) -> None:
    tree = _copy_for_build(tmp_path / "tree")
    _, wheel = build(tree, tmp_path / "dist")
    assert missing_from_wheel(wheel, tree) == []


@pytest.mark.slow
def test_the_wheel_check_sees_a_subpackage_left_out(tmp_path: Path) -> None:
    """The check can fail: a build told to leave batchscore.engines out, as the old hand-written
    package list did, is caught module by module."""
    tree = _copy_for_build(tmp_path / "tree")
    setup = (tree / "setup.py").read_text()
    leaving_out = setup.replace(
        'exclude=["*.__pycache__"]', 'exclude=["*.__pycache__", "*.engines"]'
    )
    assert leaving_out != setup
    (tree / "setup.py").write_text(leaving_out)
    _, wheel = build(tree, tmp_path / "dist")
    assert missing_from_wheel(wheel, tree) == [
        "batchscore/engines/__init__.py",
        "batchscore/engines/dask.py",
        "batchscore/engines/local.py",
    ]


SHOWN = shown_output((REPO / "README.md").read_text())


def test_the_readme_shows_four_predictions_and_a_summary() -> None:
    assert differences(SHOWN, SHOWN) == []
    assert SHOWN.count(".jpg") == 4


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("0.952706", "0.950706", "coffee.jpg: README pred_prob"),  # 2e-3 off
        ("[espresso, cup, consomme", "[espresso, consomme, cup", "coffee.jpg: README espresso"),
        ("espresso   0.952706", "cup   0.952706", "coffee.jpg: README espresso"),
        ("4 ok, 0 errors", "3 ok, 1 errors", "summary"),
    ],
    ids=["probability", "top-k order", "label", "summary"],
)
def test_the_readme_comparison_catches_what_changed(old: str, new: str, reported: str) -> None:
    assert old in SHOWN
    assert any(line.startswith(reported) for line in differences(SHOWN.replace(old, new), SHOWN))


def test_a_probability_within_the_tolerance_is_the_same() -> None:
    assert differences(SHOWN.replace("0.952706", "0.953306"), SHOWN) == []
