"""Docs that tests keep honest: help texts, the README's commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from batchscore.cli import cli
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    assert README.index("```bash") < README.index("\n## ")
    commands = _setup_commands()
    assert len(commands) == 2
    assert "batchscore score artifacts/samples" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example_and_is_in_the_readme(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"batchscore {name}" in README


def test_exit_codes_are_documented() -> None:
    assert isinstance(cli, click.Group)
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 75 |", "| 130 / 143 |"):
        assert code in README


def test_first_readme_command_prints_the_top_predictions(tmp_path: Path) -> None:
    first = _setup_commands()[0]
    scoring = first.split("&&", 1)[1]  # the part after `pip install .`
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    if shutil.which("batchscore", path=env["PATH"]) is None:
        scoring = scoring.replace("batchscore score", f"{sys.executable} -m batchscore score")
    scoring = scoring.replace("python -c", f"{sys.executable} -c")
    done = subprocess.run(
        ["bash", "-c", scoring],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "espresso" in done.stdout and "tripod" in done.stdout
    assert "4 images: 4 ok, 0 errors" in done.stderr
    assert len(pd.read_parquet(tmp_path / "preds.parquet")) == 4


def test_the_hostile_input_page_runs_as_written(tmp_path: Path) -> None:
    """docs/hostile-input.md's example: a Latin-1 file name is scored and round-trips."""
    page = (REPO / "docs" / "hostile-input.md").read_text()
    block = re.search(r"```bash\n(.*?)```", page, re.S)
    assert block is not None
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    bindir = Path(sys.executable).parent
    script = block.group(1).replace("python -c", f"{sys.executable} -c")
    if shutil.which("batchscore", path=f"{bindir}{os.pathsep}{os.environ['PATH']}") is None:
        script = script.replace("batchscore score", f"{sys.executable} -m batchscore score")
    done = subprocess.run(
        ["bash", "-c", script],
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("1 image: 1 ok, 0 errors")
    path, label, exists = done.stdout.strip().split(" | ")
    assert path == f"{tmp_path}/uploads/caf\\xe9.jpg"
    assert (label, exists) == ("Egyptian cat", "True")
    assert "\\xNN" in page and "path_bytes" in README
