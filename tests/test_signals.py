"""Stopping a file-output run with a signal: clear exit code, nothing half-written left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import COLORS, noisy
from tests.models import color_model, slow_color_model


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_file_run_and_leaves_no_partial_file(
    tmp_path: Path, signum: int, code: int
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        noisy(COLORS["red"], (32, 32), seed=i).save(images / f"{i:03d}.png")
    model = slow_color_model(tmp_path / "slow")
    out = tmp_path / "preds.parquet"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchscore",
            "score",
            str(images),
            "-o",
            str(out),
            "--model",
            str(model),
            "--workers",
            "1",
            "--batch-size",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)  # start-up is ~1 s; the 40 images take ~6 s
    assert process.poll() is None, "the run finished before it could be signalled"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "run the same command again" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fifo_is_an_error_row_not_a_hang(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchscore.cli import cli

    model = color_model(tmp_path / "m")
    good = tmp_path / "good.png"
    noisy(COLORS["blue"], (20, 20)).save(good)
    os.mkfifo(tmp_path / "pipe.png")
    manifest = tmp_path / "m.txt"
    manifest.write_text("good.png\npipe.png\n")
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(manifest), "-o", str(out), "--model", str(model), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert frame["status"].tolist() == ["ok", "error"]
    assert frame["error"][1] == "not a regular file"
