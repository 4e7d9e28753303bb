"""The CLI starts without the heavy stack: help and version answer before any model work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "numpy", "pandas", "pyarrow", "PIL", "tqdm", "onnx", "dask")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        *(
            [name, "--help"]
            for name in ("score", "canary", "diff", "quantize", "runs", "inspect", "monitor")
        ),
    ],
)
def test_help_and_version_import_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import json, sys\n"
        "from batchscore.cli import cli\n"
        "try:\n"
        f"    cli.main({argv!r}, standalone_mode=False)\n"
        "finally:\n"
        f"    print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    "argv",
    [[], ["score"], ["canary"], ["diff"], ["quantize"], ["runs"], ["inspect"], ["monitor"]],
)
def test_help_examples_are_whole_commands_never_rewrapped(argv: list[str]) -> None:
    """Every example line in --help is a whole `batchscore ...` command, even at 80 columns."""
    from click.testing import CliRunner

    from batchscore.cli import cli

    result = CliRunner().invoke(cli, [*argv, "--help"], terminal_width=80)
    assert result.exit_code == 0
    example = result.output.split("Example:", 1)[1].split("\n\n", 2)[1]
    lines = [line.strip() for line in example.splitlines() if line.strip()]
    assert lines and all(line.startswith("batchscore ") for line in lines), lines
