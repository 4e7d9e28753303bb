"""`batchscore diff`: two real models scored with `batchscore score`, then compared."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchscore.cli import cli
from batchscore.diff import CHANGED_COLUMNS, diff_outputs
from batchscore.output import read_metadata
from tests.conftest import COLORS, noisy
from tests.models import color_model

# B's class map swaps green and blue: every green image flips to blue and every blue to green.
SWAPPED = ("red", "blue", "green")
TRUTH = ["red", "green", "blue", "green", "green", "blue", "red", "green", "red"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def sha256(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()


def write_images(folder: Path, colors: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(colors):
        path = folder / f"img_{i:03d}_{name}.png"
        noisy(COLORS[name], (24, 20), seed=i).save(path)
        paths.append(path)
    return paths


def score(sources: list[Path], output: str, model: Path, *extra: str) -> None:
    result = invoke(
        "score", *map(str, sources), "-o", output, "--model", str(model), "--workers", "0", *extra
    )
    assert result.exit_code == 0, result.output


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """The model in production, and a candidate with swapped labels and softer probabilities
    (a different scale, so the ONNX file, hence the SHA-256, differs too)."""
    old = color_model(tmp_path / "old")
    return old, color_model(tmp_path / "new", class_names=SWAPPED, scale=3)


@pytest.fixture
def dataset(tmp_path: Path, models: tuple[Path, Path]) -> Path:
    """One dataset, rescored with the new model: both models' rows side by side."""
    write_images(tmp_path / "images", TRUTH)
    for model in models:
        score([tmp_path / "images"], f"{tmp_path / 'preds'}/", model)
    return tmp_path / "preds"


def test_one_dataset_two_models(dataset: Path, models: tuple[Path, Path]) -> None:
    old, new = sha256(models[0]), sha256(models[1])
    result = invoke("diff", str(dataset), "--model-a", old[:8], "--model-b", new[:8])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"A: {dataset} (model {old[:12]}): 9 images, 9 ok, 0 errors"
    assert "9 images in both, 9 compared (ok on both sides); only in A: 0, only in B: 0" in lines
    assert "changed top-1: 6 of 9 (66.7%)" in lines
    flips = lines[lines.index("flips (A -> B, most frequent first):") + 1 :]
    assert flips == ["        4  green -> blue", "        2  blue  -> green"]

    rows = pd.read_parquet(dataset, columns=["image_id", "pred_prob", "model_sha256"])
    probs = rows.pivot(index="image_id", columns="model_sha256", values="pred_prob")
    delta = (probs[new].astype(float) - probs[old].astype(float)).to_numpy()
    report = diff_outputs(dataset, model_a=old, model_b=new)
    assert report.mean_prob_delta == pytest.approx(delta.mean())
    assert report.mean_abs_prob_delta == pytest.approx(abs(delta).mean())
    assert report.mean_prob_delta < 0  # scale 3 is less sure of itself than scale 10


def test_two_files_count_errors_and_images_on_one_side(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    shared = write_images(tmp_path / "shared", TRUTH[:4])
    (tmp_path / "shared" / "broken.png").write_text("not an image")
    write_images(tmp_path / "only_a", ["red", "blue"])
    write_images(tmp_path / "only_b", ["green"])
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    score([tmp_path / "shared", tmp_path / "only_a"], str(a), models[0])
    score([tmp_path / "shared", tmp_path / "only_b"], str(b), models[1])

    changed = tmp_path / "out" / "changed.parquet"
    result = invoke("diff", str(a), str(b), "--json", "--output", str(changed))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["a"]["n_images"] == 7 and report["a"]["n_errors"] == 1
    assert report["a"]["error_reasons"] == {"not a recognised image format": 1}
    assert report["b"]["n_images"] == 6 and report["b"]["n_errors"] == 1
    assert (report["only_in_a"], report["only_in_b"]) == (2, 1)
    assert (report["n_in_both"], report["n_compared"], report["n_changed"]) == (5, 4, 3)
    assert report["flips"] == [
        {"old": "green", "new": "blue", "count": 2},
        {"old": "blue", "new": "green", "count": 1},
    ]

    frame = pd.read_parquet(changed)
    assert tuple(frame.columns) == CHANGED_COLUMNS
    assert frame["image_id"].tolist() == [str(p) for p in shared[1:4]]
    assert frame["path"].tolist() == frame["image_id"].tolist()
    assert frame["a_pred_label"].tolist() == ["green", "blue", "green"]
    assert frame["b_pred_label"].tolist() == ["blue", "green", "blue"]
    assert set(frame["a_model_sha256"]) == {sha256(models[0])}
    assert set(frame["b_model_sha256"]) == {sha256(models[1])}
    assert (frame["b_pred_prob"] < frame["a_pred_prob"]).all()
    assert read_metadata(changed)["n_changed"] == 3
    assert not [p for p in changed.parent.iterdir() if p.name != "changed.parquet"]


def test_the_latest_row_of_an_image_counts(tmp_path: Path, models: tuple[Path, Path]) -> None:
    """A file fixed after an error, and a file replaced by another colour, are rescored by the
    old model (retry, --incremental); only their latest rows take part in the diff."""
    images = tmp_path / "images"
    paths = write_images(images, ["green", "green", "red"])
    (images / "late.png").write_text("half uploaded")
    dataset = f"{tmp_path / 'preds'}/"
    score([images], dataset, models[0])
    noisy(COLORS["red"], (24, 20), seed=99).save(paths[0])  # was green, now red
    noisy(COLORS["blue"], (24, 20), seed=98).save(images / "late.png")
    score([images], dataset, models[0], "--incremental")
    score([images], dataset, models[1])
    assert len(pd.read_parquet(dataset)) == 4 + 2 + 4

    report = diff_outputs(dataset, model_a=sha256(models[0]), model_b=sha256(models[1]))
    assert (report.a.n_images, report.a.n_ok, report.a.n_errors) == (4, 4, 0)
    assert (report.n_compared, report.n_changed) == (4, 2)
    changed = report.changed.column("image_id").to_pylist()
    assert changed == [str(paths[1]), str(images / "late.png")]


@pytest.mark.parametrize(("share", "code"), [("0.5", 3), ("0.7", 0), ("0.6667", 0)])
def test_max_changed_share_is_a_rescoring_guard(
    dataset: Path, models: tuple[Path, Path], share: str, code: int
) -> None:
    changed = dataset.parent / "changed.parquet"
    result = invoke(
        "diff",
        str(dataset),
        "--model-a",
        sha256(models[0]),
        "--model-b",
        sha256(models[1]),
        "--max-changed-share",
        share,
        "-o",
        str(changed),
    )
    assert result.exit_code == code, result.output
    assert "changed top-1: 6 of 9" in result.output  # the report comes first either way
    assert pq.read_table(changed).num_rows == 6
    if code == 3:
        assert result.output.splitlines()[-1] == (
            "batchscore: error: 6 of 9 compared images changed top-1 (66.7%),"
            " more than --max-changed-share 50.0%"
        )


def test_guard_fails_when_nothing_could_be_compared(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    write_images(tmp_path / "one", ["red"])
    write_images(tmp_path / "two", ["red", "blue"])
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    score([tmp_path / "one"], str(a), models[0])
    score([tmp_path / "two" / "img_001_blue.png"], str(b), models[1])
    result = invoke("diff", str(a), str(b), "--max-changed-share", "1")
    assert result.exit_code == 3
    assert "nothing to compare" in result.output
    assert "cannot be checked" in result.output


def _models_sharing_a_first_digit(folder: Path) -> tuple[Path, Path]:
    """Two real models whose SHA-256 start with the same hex digit (an ambiguous prefix)."""
    seen: dict[str, Path] = {}
    for scale in range(1, 60):
        model = color_model(folder / f"scale{scale}", scale=float(scale))
        first = sha256(model)[0]
        if first in seen:
            return seen[first], model
        seen[first] = model
    raise AssertionError("unreachable: 59 hashes over 16 digits")


def test_model_prefix_that_matches_several_or_none_exits_2(tmp_path: Path) -> None:
    first, second = _models_sharing_a_first_digit(tmp_path / "models")
    write_images(tmp_path / "images", ["red", "green"])
    dataset = tmp_path / "preds"
    for model in (first, second):
        score([tmp_path / "images"], f"{dataset}/", model)
    hashes = sorted([sha256(first), sha256(second)])
    digit = hashes[0][0]
    absent = next(c for c in "0123456789abcdef" if c != digit)

    cases = [
        (["--model-a", digit, "--model-b", hashes[1]], f"--model-a {digit} matches several"),
        (["--model-a", hashes[0], "--model-b", absent], f"--model-b {absent} matches no model"),
        (["--model-a", hashes[0]], "needs --model-a and --model-b"),
    ]
    for args, message in cases:
        result = invoke("diff", str(dataset), *args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        if "matches" in message:
            assert f"models present: {hashes[0]} (2 rows), {hashes[1]} (2 rows)" in result.output
        assert "Traceback" not in result.output

    result = invoke("diff", str(dataset), str(dataset), "--model-b", hashes[1][:6])
    assert result.exit_code == 2
    assert f"{dataset} holds 2 models; choose one with --model-a" in result.output


def test_comparing_a_model_with_itself_or_nothing_exits_2(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_runs").mkdir()
    sha = pd.read_parquet(dataset, columns=["model_sha256"])["model_sha256"].iloc[0]
    cases = [
        ([str(dataset), "--model-a", sha, "--model-b", sha[:10]], "nothing to compare"),
        ([str(tmp_path / "nowhere.parquet"), str(dataset)], "no output at"),
        ([str(tmp_path / "empty"), str(dataset)], "no Parquet files in"),
        ([str(tmp_path / "images" / "img_000_red.png"), str(dataset)], "cannot read"),
    ]
    for args, message in cases:
        result = invoke("diff", *args)
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_hidden_and_underscore_files_are_not_read(dataset: Path, models: tuple[Path, Path]) -> None:
    partition = next(dataset.glob("run_date=*"))
    (partition / ".part-dead-00000.parquet.1234abcd.tmp").write_bytes(b"half a part")
    (partition / ".hidden.parquet").write_bytes(b"not parquet")
    (dataset / "_runs" / "stray.parquet").write_bytes(b"not parquet")
    report = diff_outputs(dataset, model_a=sha256(models[0]), model_b=sha256(models[1]))
    assert report.n_compared == 9


def test_top_limits_the_flip_table(dataset: Path, models: tuple[Path, Path]) -> None:
    args = ["diff", str(dataset), "--model-a", sha256(models[0]), "--model-b", sha256(models[1])]
    result = invoke(*args, "--top", "1")
    assert result.exit_code == 0
    assert "        4  green -> blue" in result.output
    assert "blue  -> green" not in result.output
    assert "... 1 more pairs (see --top)" in result.output
    report = json.loads(invoke(*args, "--json", "--top", "1").stdout)
    assert report["n_flip_pairs"] == 2 and len(report["flips"]) == 1
