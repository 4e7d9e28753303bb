"""Dataset output: parts, readers, incremental runs, the lock, summaries."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from batchscore.cli import cli
from batchscore.dataset import part_files
from batchscore.store import LOCK_NAME
from tests.conftest import COLORS, noisy
from tests.models import color_model

MakeImages = Callable[..., dict[str, str]]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def score_into(dataset: Path, images: Path, model: Path, *extra: str) -> tuple[int, str]:
    return run(
        "score", str(images), "-o", f"{dataset}/", "--model", str(model), "--workers", "0", *extra
    )


def test_dataset_is_one_table_for_every_reader(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    truth = make_images(colors=["red", "green", "blue", "red", "blue"])
    dataset = tmp_path / "preds"
    code, output = score_into(
        dataset, tmp_path / "images", color_model_dir, "--part-rows", "2", "--batch-size", "2"
    )
    assert code == 0, output
    parts = part_files(dataset)
    assert len(parts) == 3  # 2 + 2 + 1 rows
    assert all(p.parent.name.startswith("run_date=") for p in parts)
    frame = pd.read_parquet(dataset)
    assert sorted(frame["path"]) == sorted(truth)
    assert "run_date" in frame.columns
    table = ds.dataset(dataset, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 5
    got = (
        duckdb.connect()
        .execute(
            f"select count(*), count(distinct image_id) from read_parquet('{dataset}/**/*.parquet',"
            " hive_partitioning=true)"
        )
        .fetchall()
    )
    assert got == [(5, 5)]
    polars_rows = pl.read_parquet(f"{dataset}/**/*.parquet", hive_partitioning=True)
    assert polars_rows.height == 5
    summaries = list((dataset / "_runs").glob("*.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "complete"
    assert summary["n_ok"] == 5 and summary["n_skipped"] == 0
    assert sorted(summary["class_distribution"]) == ["blue", "green", "red"]
    assert len(summary["parts"]) == 3


def test_incremental_scores_only_new_or_changed_files(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    images = tmp_path / "images"
    make_images(colors=["red", "green", "blue"])
    dataset = tmp_path / "preds"
    assert score_into(dataset, images, color_model_dir, "--incremental")[0] == 0
    code, output = score_into(dataset, images, color_model_dir, "--incremental")
    assert code == 0
    assert "nothing new to score (3 images already scored)" in output
    # Two new files and one rewritten file: exactly those three are scored.
    noisy(COLORS["blue"], (30, 30), seed=9).save(images / "new_1.png")
    noisy(COLORS["green"], (30, 30), seed=8).save(images / "new_2.png")
    changed = sorted(images.glob("img_000_*.png"))[0]
    noisy(COLORS["green"], (40, 30), seed=5).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    code, output = score_into(dataset, images, color_model_dir, "--incremental")
    assert code == 0, output
    assert "3 images: 3 ok, 0 errors (2 already scored by this model, skipped)" in output
    frame = pd.read_parquet(dataset)
    assert len(frame) == 6
    latest = frame.sort_values("scored_at").groupby("image_id").tail(1)
    assert latest.set_index("path").loc[str(changed), "pred_label"] == "green"


def test_without_incremental_a_rerun_never_duplicates(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images(colors=["red", "green"])
    dataset = tmp_path / "preds"
    for _ in range(2):
        assert score_into(dataset, tmp_path / "images", color_model_dir)[0] == 0
    assert len(pd.read_parquet(dataset)) == 2


def test_a_new_model_rescores_everything_without_overwriting(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images(colors=["red", "green", "blue"])
    dataset = tmp_path / "preds"
    other = color_model(tmp_path / "other", scale=3.0)
    assert score_into(dataset, tmp_path / "images", color_model_dir)[0] == 0
    assert score_into(dataset, tmp_path / "images", other)[0] == 0
    frame = pd.read_parquet(dataset)
    assert len(frame) == 6
    assert frame.groupby("model_sha256").size().tolist() == [3, 3]


@pytest.mark.parametrize("retry", [True, False])
def test_error_rows_are_retried_unless_told_not_to(
    tmp_path: Path, color_model_dir: Path, retry: bool
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n half uploaded")
    dataset = tmp_path / "preds"
    assert score_into(dataset, images, color_model_dir)[0] == 0
    flag = "--retry-errors" if retry else "--no-retry-errors"
    code, output = score_into(dataset, images, color_model_dir, flag)
    assert code == 0, output
    statuses = pd.read_parquet(dataset)["status"].tolist()
    assert statuses == (["error", "error"] if retry else ["error"])


def test_a_half_uploaded_file_is_scored_once_complete(
    tmp_path: Path, color_model_dir: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    upload = images / "upload.png"
    upload.write_bytes(b"\x89PNG\r\n\x1a\n half uploaded")
    dataset = tmp_path / "preds"
    assert score_into(dataset, images, color_model_dir, "--incremental")[0] == 0
    noisy(COLORS["red"], (30, 30)).save(upload)
    assert score_into(dataset, images, color_model_dir, "--incremental")[0] == 0
    frame = pd.read_parquet(dataset).sort_values("scored_at")
    assert frame["status"].tolist() == ["error", "ok"]
    assert frame["pred_label"].iloc[1] == "red"


def test_a_second_run_is_refused_while_the_lock_is_held(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    dataset = tmp_path / "preds"
    dataset.mkdir()
    with (dataset / LOCK_NAME).open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("4242")
        handle.flush()
        code, output = score_into(dataset, tmp_path / "images", color_model_dir)
    assert code == 75
    assert "another batchscore run (pid 4242)" in output
    assert "--wait-lock" in output
    assert not part_files(dataset)
    # Released (as when the holder dies): the next run goes ahead.
    assert score_into(dataset, tmp_path / "images", color_model_dir)[0] == 0


def test_stale_temporaries_are_removed_and_never_read(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    dataset = tmp_path / "preds"
    partition = dataset / "run_date=2026-01-01"
    partition.mkdir(parents=True)
    (partition / ".part-dead-00000.parquet.abcd.tmp").write_bytes(b"PAR1 half written")
    assert score_into(dataset, tmp_path / "images", color_model_dir)[0] == 0
    assert not list(dataset.rglob("*.tmp"))
    assert len(pd.read_parquet(dataset)) == 3


def test_runs_lists_summaries(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    dataset = tmp_path / "preds"
    score_into(dataset, tmp_path / "images", color_model_dir)
    score_into(dataset, tmp_path / "images", color_model_dir)
    code, output = run("runs", str(dataset))
    assert code == 0
    lines = output.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "attempt", "status", "model"]
    assert len(lines) == 3
    assert lines[1].split()[2] == "complete" and lines[1].split()[4] == "3"
    assert lines[2].split()[7] == "3"  # skipped
    code, output = run("runs", str(dataset), "--json")
    assert [json.loads(line)["n_images"] for line in output.splitlines()] == [3, 0]


def test_two_nights_with_one_run_id_keep_both_nights(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    """A script's fixed --run-id used to name the second night's parts like the first's, which
    replaced them: 3 rows where 6 were scored."""
    make_images("monday", ["red", "green", "blue"])
    make_images("tuesday", ["blue", "blue", "red"])
    dataset = tmp_path / "preds"
    for night in ("monday", "tuesday"):
        code, output = score_into(dataset, tmp_path / night, color_model_dir, "--run-id", "n")
        assert code == 0, output
    frame = pd.read_parquet(dataset, columns=["path", "run_id"])
    assert sorted(Path(p).parent.name for p in frame["path"]) == ["monday"] * 3 + ["tuesday"] * 3
    assert set(frame["run_id"]) == {"n"}
    code, output = run("runs", str(dataset), "--field", "run_id,status,n_committed")
    assert output.splitlines() == ["n\tcomplete\t3", "n\tcomplete\t3"]
    code, output = run("runs", str(dataset), "--field", "run_id,committed")
    assert code == 2 and "no field committed in these summaries" in output


def test_incremental_needs_a_dataset(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(tmp_path / "p.parquet"),
        "--model",
        str(color_model_dir),
        "--incremental",
    )
    assert code == 2
    assert "--incremental needs a dataset directory" in output


def test_a_named_run_is_found_by_scripts_through_runs_fields(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    dataset, images = tmp_path / "preds", tmp_path / "images"
    other = color_model(tmp_path / "other", scale=3)  # another file, another SHA-256
    assert score_into(dataset, images, color_model_dir, "--run-id", "night-1")[0] == 0
    assert score_into(dataset, images, other, "--run-id", "rescore.2")[0] == 0
    code, output = run("runs", str(dataset), "--status", "complete", "--field", "run_id,status")
    assert code == 0, output
    assert output.splitlines() == ["night-1\tcomplete", "rescore.2\tcomplete"]
    code, output = run("runs", str(dataset), "--status", "failed", "--field", "run_id")
    assert (code, output) == (0, "")
    shas = run("runs", str(dataset), "--field", "model_sha256")[1].split()
    assert len(set(shas)) == 2 and all(len(sha) == 64 for sha in shas)
    assert sorted(p.name.rsplit("-", 2)[0] for p in part_files(dataset)) == [
        "part-night-1",
        "part-rescore.2",
    ]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", "-starts-with-dash", "x" * 200])
def test_a_run_id_that_could_not_name_a_file_is_refused(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages, bad: str
) -> None:
    make_images()
    code, output = score_into(
        tmp_path / "preds", tmp_path / "images", color_model_dir, "--run-id", bad
    )
    assert code == 2, output
    assert "run id" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "preds").exists() or not part_files(tmp_path / "preds")
