"""`batchscore score` end to end: real ONNX sessions, real files, Parquet read back."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchscore.cli import cli
from batchscore.output import read_metadata
from batchscore.scorer import NOT_FINITE
from tests.conftest import COLORS, noisy
from tests.models import color_model, probe_model, unstable_model

MakeImages = Callable[..., dict[str, str]]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("workers", ["0", "2"])
def test_directory_scores_every_image_with_its_own_prediction(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages, workers: str
) -> None:
    colors = ["red", "green", "blue", "blue", "red", "green", "green"] * 3
    truth = make_images(colors=colors)
    out = tmp_path / "preds.parquet"
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(out),
        "--model",
        str(color_model_dir),
        "--workers",
        workers,
        "--batch-size",
        "4",
        "--top-k",
        "2",
    )
    assert code == 0, output
    df = pd.read_parquet(out)
    assert list(df["path"]) == sorted(truth)  # sorted walk = input order = output order
    assert (df["status"] == "ok").all()
    assert list(df["pred_label"]) == [truth[p] for p in df["path"]]
    assert df["topk_labels"].map(len).eq(2).all()
    first = df.iloc[0]
    assert first["topk_labels"][0] == first["pred_label"]
    assert np.isclose(sum(first["probs"]), 1.0, atol=1e-5)
    assert first["topk_probs"][0] >= first["topk_probs"][1]
    assert np.isclose(first["pred_prob"], max(first["probs"]))
    assert "21 images: 21 ok, 0 errors" in output


def test_output_schema_and_metadata(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    out = tmp_path / "preds.parquet"
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(out),
        "--model",
        str(color_model_dir),
        "--workers",
        "0",
    )
    assert code == 0, output
    schema = pq.read_schema(out)
    expected = {
        "path": pa.string(),
        "image_id": pa.string(),
        "status": pa.string(),
        "error": pa.string(),
        "pred_index": pa.int32(),
        "pred_label": pa.string(),
        "pred_prob": pa.float32(),
        "topk_labels": pa.list_(pa.string()),
        "topk_probs": pa.list_(pa.float32()),
        "probs": pa.list_(pa.float32()),
        "width": pa.int32(),
        "height": pa.int32(),
        "model_sha256": pa.string(),
        "run_id": pa.string(),
        "scored_at": pa.timestamp("us", tz="UTC"),
    }
    for name, dtype in expected.items():
        assert schema.field(name).type == dtype, name
    meta = read_metadata(out)
    import hashlib

    digest = hashlib.sha256((color_model_dir / "model.onnx").read_bytes()).hexdigest()
    assert meta["model_sha256"] == digest
    assert meta["class_map"] == ["red", "green", "blue"]
    assert meta["preprocess"]["resize_size"] == [16, 16]
    assert meta["n_images"] == 3 and meta["n_ok"] == 3
    assert meta["onnxruntime_version"]
    table = pq.read_table(out)
    assert set(table.column("model_sha256").to_pylist()) == {digest}
    assert set(table.column("run_id").to_pylist()) == {meta["run_id"]}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _bad_files(folder: Path) -> dict[str, str]:
    """One file per kind of breakage, with the reason each must produce."""
    folder.mkdir(parents=True, exist_ok=True)
    good = noisy(COLORS["red"], (64, 48))
    (folder / "a_empty.jpg").write_bytes(b"")
    (folder / "b_text.png").write_text("not an image")
    jpeg = folder / "tmp.jpg"
    good.save(jpeg, quality=90)
    (folder / "c_truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    jpeg.unlink()
    Image.new("L", (5000, 5000)).save(folder / "d_bomb.png")
    (folder / "e_broken_link.png").symlink_to(folder / "nowhere.png")
    good.save(folder / "f_good.png")
    return {
        "a_empty.jpg": "empty file",
        "b_text.png": "not a recognised image format",
        "c_truncated.jpg": "corrupt or truncated image",
        "d_bomb.png": "decompression bomb",
        "e_broken_link.png": "broken symbolic link",
    }


@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_files_become_error_rows_and_lose_nothing(
    tmp_path: Path, color_model_dir: Path, workers: str
) -> None:
    reasons = _bad_files(tmp_path / "mixed")
    out = tmp_path / "preds.parquet"
    code, output = run(
        "score",
        str(tmp_path / "mixed"),
        "-o",
        str(out),
        "--model",
        str(color_model_dir),
        "--workers",
        workers,
        "--max-pixels",
        "1000000",
    )
    assert code == 0, output
    df = pd.read_parquet(out).set_index(pd.read_parquet(out)["path"].map(lambda p: Path(p).name))
    assert len(df) == 6
    for name, reason in reasons.items():
        assert df.loc[name, "status"] == "error"
        assert reason in df.loc[name, "error"], (name, df.loc[name, "error"])
        assert pd.isna(df.loc[name, "pred_label"]) and df.loc[name, "probs"] is None
    assert df.loc["f_good.png", "status"] == "ok"
    assert df.loc["f_good.png", "pred_label"] == "red"
    assert "5 errors" in output


def test_max_error_rate_exits_4_after_writing(tmp_path: Path, color_model_dir: Path) -> None:
    _bad_files(tmp_path / "mixed")
    out = tmp_path / "preds.parquet"
    code, output = run(
        "score",
        str(tmp_path / "mixed"),
        "-o",
        str(out),
        "--model",
        str(color_model_dir),
        "--workers",
        "0",
        "--max-error-rate",
        "0.5",
    )
    assert code == 4
    assert "--max-error-rate" in output
    assert len(pd.read_parquet(out)) == 6


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "txt"])
def test_manifests_resolve_paths_and_pass_extra_columns(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages, fmt: str
) -> None:
    truth = make_images(folder="data/imgs", colors=["blue", "red", "green"])
    rows = [
        {
            "path": os.path.relpath(p, tmp_path / "data"),
            "id": f"id-{i}",
            "label": truth[p],
            "camera": f"cam{i}",
        }
        for i, p in enumerate(sorted(truth))
    ]
    rows.append({"path": "imgs/missing.png", "id": "id-missing", "label": "red", "camera": "x"})
    manifest = tmp_path / "data" / f"manifest.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        frame.to_json(manifest, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(manifest)
    else:
        manifest.write_text("\n".join(["# comment", *frame["path"], ""]))
    out = tmp_path / "preds.parquet"
    code, output = run(
        "score", str(manifest), "-o", str(out), "--model", str(color_model_dir), "--workers", "0"
    )
    assert code == 0, output
    df = pd.read_parquet(out)
    assert len(df) == 4
    assert list(df["status"]) == ["ok", "ok", "ok", "error"]
    assert df["error"].iloc[3] == "file not found"
    assert list(df["pred_label"][:3]) == [truth[p] for p in sorted(truth)]
    if fmt != "txt":
        assert list(df["image_id"]) == ["id-0", "id-1", "id-2", "id-missing"]
        assert list(df["label"]) == [r["label"] for r in rows]
        assert list(df["camera"]) == ["cam0", "cam1", "cam2", "x"]
    else:
        assert list(df["image_id"]) == list(df["path"])


def test_several_sources_at_once_keep_order(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    first = make_images(folder="one", colors=["red", "red"])
    second = make_images(folder="two", colors=["blue"])
    out = tmp_path / "p.parquet"
    code, _ = run(
        "score",
        str(tmp_path / "two"),
        str(tmp_path / "one"),
        "-o",
        str(out),
        "--model",
        str(color_model_dir),
        "--workers",
        "0",
    )
    assert code == 0
    assert list(pd.read_parquet(out)["path"]) == sorted(second) + sorted(first)


def test_broken_manifest_lines_become_error_rows(tmp_path: Path, color_model_dir: Path) -> None:
    good = tmp_path / "g.png"
    noisy(COLORS["green"], (20, 20)).save(good)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "g.png"}\n{not json\n{"id": "no-path"}\n')
    out = tmp_path / "p.parquet"
    code, output = run(
        "score", str(manifest), "-o", str(out), "--model", str(color_model_dir), "--workers", "0"
    )
    assert code == 0, output
    df = pd.read_parquet(out)
    assert list(df["status"]) == ["ok", "error", "error"]
    assert "invalid JSON" in df["error"][1]
    assert "missing 'path'" in df["error"][2]
    assert df["image_id"][2] == "no-path"


def test_fixed_batch_model_still_works(tmp_path: Path, make_images: MakeImages) -> None:
    model = color_model(tmp_path / "fixed", batch=1)
    truth = make_images(colors=["green", "blue", "red", "red", "blue"])
    out = tmp_path / "p.parquet"
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(out),
        "--model",
        str(model),
        "--workers",
        "0",
        "--batch-size",
        "4",
    )
    assert code == 0, output
    df = pd.read_parquet(out)
    assert list(df["pred_label"]) == [truth[p] for p in df["path"]]


def test_probe_model_sees_torchvision_tensor(tmp_path: Path) -> None:
    model = probe_model(tmp_path / "probe", size=8, preprocess={"resize_size": 10, "crop_size": 8})
    image = noisy((200, 100, 50), (37, 23), seed=7)
    image.save(tmp_path / "x.png")
    out = tmp_path / "p.parquet"
    code, output = run(
        "score",
        str(tmp_path / "x.png"),
        "-o",
        str(out),
        "--model",
        str(model),
        "--workers",
        "0",
        "--top-k",
        "1",
    )
    assert code == 0, output
    fed = np.array(pd.read_parquet(out)["probs"][0], dtype=np.float32).reshape(3, 8, 8)
    resized = image.resize((int(10 * 37 / 23), 10), Image.BILINEAR)
    left, top = round((resized.width - 8) / 2), round((resized.height - 8) / 2)
    want = np.asarray(resized.crop((left, top, left + 8, top + 8)), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = ((want - mean) / std).transpose(2, 0, 1)
    assert np.abs(fed - want).max() < 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere/"], "source not found"),
        (["{empty}"], "no images found"),
        (["{bad_csv}"], "no 'path' column"),
        (["{images}", "--model", "{broken}"], "cannot load model"),
        (["{images}", "--model", "{mismatch}"], "class map has 4"),
        (["{images}", "--model-sha256", "deadbeef"], "not the expected deadbeef"),
        (["{images}", "--providers", "NoSuchProvider"], "not available"),
        (["{images}", "--crop-size", "12"], "preprocessing produces 12x12"),
    ],
)
def test_configuration_errors_exit_2_with_one_line(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages, args: list[str], message: str
) -> None:
    make_images()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"\x00garbage")
    (broken / "class_map.json").write_text('["a"]')
    mismatch = color_model(tmp_path / "mismatch")
    (mismatch / "class_map.json").write_text('["a", "b", "c", "d"]')
    names = {
        "empty": tmp_path / "empty",
        "bad_csv": tmp_path / "bad.csv",
        "images": tmp_path / "images",
        "broken": broken,
        "mismatch": mismatch,
    }
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(color_model_dir)]
    out = tmp_path / "out.parquet"
    code, output = run("score", *argv, "-o", str(out), "--workers", "0")
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    assert not out.exists()


def test_unwritable_output_exits_2(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        code, output = run(
            "score",
            str(tmp_path / "images"),
            "-o",
            str(locked / "p.parquet"),
            "--model",
            str(color_model_dir),
            "--workers",
            "0",
        )
    finally:
        locked.chmod(stat.S_IRWXU)
    assert code == 2
    assert "cannot write output" in output


def test_output_into_a_file_path_under_a_regular_file_exits_2(
    tmp_path: Path, color_model_dir: Path, make_images: MakeImages
) -> None:
    make_images()
    (tmp_path / "afile").write_text("x")
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(tmp_path / "afile" / "p.parquet"),
        "--model",
        str(color_model_dir),
        "--workers",
        "0",
    )
    assert code == 2
    assert "cannot write output" in output


def test_no_probs_and_version_and_help() -> None:
    code, output = run("--version")
    assert code == 0 and "batchscore" in output
    code, output = run("score", "--help")
    assert code == 0 and "Example:" in output and "Exit codes" in output


def test_model_metadata_props_supply_config(tmp_path: Path, make_images: MakeImages) -> None:
    import onnx

    folder = color_model(tmp_path / "meta")
    model = onnx.load(folder / "model.onnx")
    for key, name in (("class_map", "class_map.json"), ("preprocess", "preprocess.json")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, (folder / name).read_text()
        (folder / name).unlink()
    onnx.save(model, folder / "model.onnx")
    truth = make_images(colors=["blue"])
    out = tmp_path / "p.parquet"
    code, output = run(
        "score",
        str(tmp_path / "images"),
        "-o",
        str(out),
        "--model",
        str(folder / "model.onnx"),
        "--workers",
        "0",
        "--no-probs",
    )
    assert code == 0, output
    df = pd.read_parquet(out)
    assert list(df["pred_label"]) == list(truth.values())
    assert "probs" not in df.columns
    assert json.loads(pq.ParquetFile(out).metadata.metadata[b"batchscore.preprocess"])


def test_a_model_output_that_is_not_finite_is_an_error_row_and_wrong_in_the_canary(
    tmp_path: Path,
) -> None:
    """A NaN output was an ok row with pred_prob NaN, counted as a prediction everywhere."""
    model = unstable_model(tmp_path / "model")
    folder = tmp_path / "canary"
    for label, color in (("red", (255, 0, 0)), ("green", (255, 255, 255))):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), color).save(folder / label / "img.png")
    out = tmp_path / "out.parquet"
    code, output = run(
        "score", str(folder), "-o", str(out), "--model", str(model), "--workers", "0"
    )
    assert code == 0, output
    assert "2 images: 1 ok, 1 errors" in output
    rows = pd.read_parquet(out).set_index("path")
    red = rows.loc[str(folder / "red" / "img.png")]
    assert red["status"] == "error" and red["error"] == NOT_FINITE
    assert pd.isna(red["pred_label"]) and pd.isna(red["pred_prob"])
    assert rows.loc[str(folder / "green" / "img.png"), "status"] == "ok"
    report = tmp_path / "report"
    args = ["canary", str(folder), "--model", str(model), "--report", str(report), "--workers", "0"]
    run(*args)
    saved = json.loads((report / "canary.json").read_text())
    # Counted, and wrong: the white image's uniform scores pick "red", not its "green", and
    # the red image's NaN is no answer (before, NaN picked "red": right, by accident).
    assert saved["n_scored"] == 2 and saved["accuracy"] == 0.0
    assert [e["error"] for e in saved["errors"]] == [NOT_FINITE]
