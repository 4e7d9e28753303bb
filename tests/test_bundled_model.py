"""The bundled EfficientNet-Lite0 on the bundled sample photos, through the real CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchscore.cli import cli
from batchscore.model import bundled_model_dir, load_model
from batchscore.output import read_metadata
from tests.conftest import REPO

EXPECTED = {
    "cat.jpg": {"Egyptian cat", "tiger cat", "tabby"},
    "coffee.jpg": {"espresso"},
    "cameraman.jpg": {"tripod"},
    "rocket.jpg": {"missile", "projectile"},
}


def test_bundled_model_is_checked_and_described() -> None:
    spec = load_model()
    assert Path(spec.path).parent == bundled_model_dir().resolve()
    assert spec.num_classes == 1000
    assert len(set(spec.class_names)) == 1000
    assert spec.preprocess.input_size == (224, 224)
    provenance = (bundled_model_dir() / "PROVENANCE.md").read_text()
    assert spec.sha256 in provenance


@pytest.mark.parametrize("workers", ["0", "2"])
def test_samples_get_correct_labels(tmp_path: Path, samples: Path, workers: str) -> None:
    out = tmp_path / "preds.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(samples), "-o", str(out), "--workers", workers, "--top-k", "5"]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert len(frame) == len(EXPECTED)
    for _, row in frame.iterrows():
        assert row["pred_label"] in EXPECTED[Path(row["path"]).name], row["path"]
        assert len(row["topk_labels"]) == 5 and len(row["probs"]) == 1000
    digest = hashlib.sha256((bundled_model_dir() / "model_fp32.onnx").read_bytes()).hexdigest()
    assert read_metadata(out)["model_sha256"] == digest
    assert set(frame["model_sha256"]) == {digest}


def test_exact_and_fast_jpeg_paths_agree_on_samples(tmp_path: Path, samples: Path) -> None:
    frames = {}
    for flag in ("--fast-jpeg", "--exact-jpeg"):
        out = tmp_path / f"{flag}.parquet"
        result = CliRunner().invoke(
            cli, ["score", str(samples), "-o", str(out), flag, "--workers", "0"]
        )
        assert result.exit_code == 0, result.output
        frames[flag] = pd.read_parquet(out)
    fast, exact = frames["--fast-jpeg"], frames["--exact-jpeg"]
    confident = exact["pred_prob"] > 0.5
    assert (fast["pred_label"][confident] == exact["pred_label"][confident]).all()


@pytest.mark.slow
def test_wheel_ships_the_bundled_model(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("batchscore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "model_fp32.onnx",
        "class_map.json",
        "preprocess.json",
        "samples/cat.jpg",
        "NOTICE",
        "LICENSE-efficientnet-lite",
    ):
        assert f"batchscore/artifacts/{name}" in names, name
    assert "batchscore/cli/score.py" in names
