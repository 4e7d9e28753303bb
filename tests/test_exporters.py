"""Models exported by Hugging Face and timm, read from the files those exporters write.

Hugging Face: transformers' own image processors (their Pillow backends, which need no torch)
write `preprocessor_config.json` with `save_pretrained`, and are the oracle for the tensor.
timm needs torch, which batchscore does not depend on: its eval transform's output and real
exports (timm's `onnx_export` + `save_config_for_hf`, `optimum-cli export onnx`) with their
framework's own probabilities were saved by tests/exported/make.py, and are compared here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image
from transformers import CLIPImageProcessorPil, ConvNextImageProcessorPil, ViTImageProcessorPil

from batchscore.cli import cli
from batchscore.errors import ModelError
from batchscore.model import load_model
from batchscore.preprocess import load_image, tensor_batch
from tests.conftest import REPO, noisy


def _model(folder: Path, height: int, width: int) -> Path:
    """A tiny classifier with a fixed input size and no batchscore files at all."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"], axis=1),
        ],
        "exported",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder


def _fed(folder: Path, image: Path) -> np.ndarray:
    """The tensor batchscore feeds the model for `image` (what its Scorer builds)."""
    spec = load_model(folder)
    pixels = load_image(str(image), spec.preprocess, fast_jpeg=False).pixels
    return tensor_batch([pixels], spec.preprocess, spec.input_dtype)


PROCESSORS = {
    "vit": lambda: ViTImageProcessorPil(size={"height": 40, "width": 36}),
    "convnext": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875),
    "convnext-full": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 384}),
    "clip": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    ),
    "longest-edge": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 40, "longest_edge": 48}, crop_size={"height": 32, "width": 32}
    ),
    "no-rescale": lambda: ViTImageProcessorPil(
        size={"height": 24, "width": 24}, do_rescale=False, image_mean=[120, 110, 100],
        image_std=[60, 60, 60], resample=3,
    ),
}  # fmt: skip


# (76, 53): odd crop margins; (120, 41), (41, 120): past longest_edge; (40, 44): short side
# already at shortest_edge
@pytest.mark.parametrize("size", [(71, 53), (76, 53), (120, 41), (41, 120), (40, 44)])
@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_a_hugging_face_export_gets_the_tensor_its_image_processor_makes(
    tmp_path: Path, name: str, size: tuple[int, int]
) -> None:
    processor = PROCESSORS[name]()
    image = tmp_path / "photo.png"
    noisy((180, 90, 30), size, seed=5).save(image)
    expected = processor(images=Image.open(image).convert("RGB"), return_tensors="np")
    pixel_values = np.asarray(expected["pixel_values"], dtype=np.float64)
    folder = _model(tmp_path / "vit", *pixel_values.shape[2:])
    processor.save_pretrained(folder)  # preprocessor_config.json, exactly as HF writes it
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    fed = _fed(folder, image)
    assert fed.shape == pixel_values.shape
    np.testing.assert_allclose(fed, pixel_values, rtol=0, atol=1e-4)
    notes = load_model(folder).notes
    assert "labels: 3 class names from config.json" in notes


EXPORTED = Path(__file__).resolve().parent / "exported"  # made by tests/exported/make.py
TIMM_GOLDENS = np.load(EXPORTED / "timm_transforms.npz")
TIMM_CONFIGS = json.loads(str(TIMM_GOLDENS["configs"]))


@pytest.mark.parametrize("case", range(len(TIMM_CONFIGS)))
def test_a_timm_export_gets_timms_eval_transform(tmp_path: Path, case: int) -> None:
    """Against timm's own `create_transform(**resolve_data_config(...))` output, saved by
    tests/exported/make.py: crop modes center, squash and border, on five image shapes."""
    cfg = TIMM_CONFIGS[case]
    _, height, width = cfg["input_size"]
    folder = _model(tmp_path / "timm", height, width)
    config = {"architecture": "tiny", "num_classes": 3, "pretrained_cfg": cfg,
              "label_names": ["x", "y", "z"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    images = sorted(key for key in TIMM_GOLDENS.files if key.startswith("image"))
    for index, key in enumerate(images):
        image = tmp_path / f"{key}.png"
        Image.fromarray(TIMM_GOLDENS[key]).save(image)
        expected = TIMM_GOLDENS[f"tensor{index}_{case}"][None]
        np.testing.assert_allclose(_fed(folder, image), expected, rtol=0, atol=1e-5, err_msg=key)
    spec = load_model(folder)
    assert spec.class_names == ("x", "y", "z")
    assert dict(spec.preprocess_sources)["crop_size"] == "config.json (pretrained_cfg)"


def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", 32, 40)
    (folder / "labels.txt").write_text("a\nb\nc\n")
    cfg = {"input_size": [3, 32, 40], "crop_pct": 1.0, "crop_mode": "center"}
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": cfg}))
    with pytest.raises(ModelError, match="crop_mode 'center' with input size 32x40"):
        load_model(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 224}))
    with pytest.raises(ModelError, match="size 224 is not supported"):
        load_model(folder)
    capped = {"size": {"shortest_edge": 32, "longest_edge": 40}, "do_center_crop": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(capped))
    with pytest.raises(ModelError, match="without a centre crop gives every image its own size"):
        load_model(folder)
    (folder / "preprocessor_config.json").unlink()
    (folder / "config.json").unlink()
    for config, reason in [
        ({"resize_size": [32, 40], "longest_edge": 50}, "give resize_size as an int"),
        ({"resize_size": 32, "crop_size": [32, 40], "longest_edge": 0}, "a positive int"),
    ]:
        (folder / "preprocess.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match=reason):
            load_model(folder)


def test_an_exported_folder_scores_and_preprocess_json_still_wins(tmp_path: Path) -> None:
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    folder = _model(tmp_path / "m", 16, 16)
    processor.save_pretrained(folder)
    (folder / "labels.txt").write_text("a\nb\nc\n")
    image = tmp_path / "photo.png"
    noisy((10, 20, 30), (30, 20)).save(image)
    out = tmp_path / "out.parquet"
    args = ["score", str(image), "-o", str(out), "--model", str(folder), "--workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("1 image: 1 ok")  # no assumption: the size was read
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16], "mean": [0] * 3}))
    assert load_model(folder).preprocess.mean == (0.0, 0.0, 0.0)


EXPORTS = ["hf-convnext", "hf-vit", "timm-efficientnet-squash", "timm-nfnet-external-data",
           "timm-resnet-dynamic", "timm-vit-border"]  # fmt: skip
PHOTOS = sorted((REPO / "artifacts" / "samples").glob("*.jpg")) + sorted(
    (EXPORTED / "images").glob("*.jpg")
)


def _score_photos(tmp_path: Path, folder: Path, *extra: str) -> dict[str, np.ndarray]:
    tmp_path.mkdir(exist_ok=True)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{photo}\n" for photo in PHOTOS))
    out = tmp_path / "out.parquet"
    args = ["score", str(listing), "-o", str(out), "--model", str(folder), "--workers", "0"]
    result = CliRunner().invoke(cli, [*args, "--exact-jpeg", *extra])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{len(PHOTOS)} images: {len(PHOTOS)} ok"), result.output
    table = pd.read_parquet(out)
    return {Path(p).name: np.asarray(v) for p, v in zip(table["path"], table["probs"], strict=True)}


@pytest.mark.parametrize("name", EXPORTS)
def test_a_real_export_scores_as_its_framework_does(tmp_path: Path, name: str) -> None:
    """The folder is what timm's or optimum's exporter wrote, untouched; the probabilities are
    what timm or transformers with torch gave for the same photos (tests/exported/make.py)."""
    folder = EXPORTED / name
    expected = json.loads((folder / "expected.json").read_text())["probabilities"]
    scored = _score_photos(tmp_path, folder)
    assert set(scored) == set(expected)
    for photo, probs in scored.items():
        np.testing.assert_allclose(probs, expected[photo], rtol=0, atol=1e-3, err_msg=photo)
    assert len({int(np.argmax(p)) for p in expected.values()}) >= 3  # outputs follow the pixels
    # The comparison can fail: the same photos resampled otherwise are scored otherwise.
    wrong = _score_photos(tmp_path / "wrong", folder, "--interpolation", "nearest")
    assert max(np.abs(wrong[k] - expected[k]).max() for k in expected) > 0.01


def test_the_weights_torch_writes_beside_the_graph_are_part_of_the_models_identity(
    tmp_path: Path,
) -> None:
    """torch's dynamo exporter wrote model.onnx + model.onnx.data: new weights in the data file
    alone make a new model_sha256."""
    folder = tmp_path / "m"
    shutil.copytree(EXPORTED / "timm-nfnet-external-data", folder)
    before = load_model(folder).sha256
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float32 weight becomes 1.0
    (folder / "model.onnx.data").write_bytes(bytes(data))
    assert load_model(folder).sha256 != before


def test_preprocess_json_overrides_an_exporters_config_key_by_key(tmp_path: Path) -> None:
    """A preprocess.json written beside an optimum export to change only the mean made
    batchscore forget everything preprocessor_config.json gave (the layout: "cannot tell the
    layout"). Now each key comes from the highest layer that has it."""
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    processor = ViTImageProcessorPil(size={"height": 40, "width": 36}, image_std=std)
    image = tmp_path / "photo.png"
    noisy((180, 90, 30), (71, 53), seed=5).save(image)
    changed = ViTImageProcessorPil(size={"height": 40, "width": 36}, image_mean=mean, image_std=std)
    expected = np.asarray(
        changed(images=Image.open(image).convert("RGB"), return_tensors="np")["pixel_values"]
    )
    folder = _model(tmp_path / "optimum", 40, 36)
    processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    (folder / "preprocess.json").write_text(json.dumps({"mean": mean}))
    np.testing.assert_allclose(_fed(folder, image), expected, rtol=0, atol=1e-4)
    sources = dict(load_model(folder).preprocess_sources)
    assert sources["mean"] == "preprocess.json"
    assert (
        sources["std"] == sources["resize_size"] == sources["layout"] == "preprocessor_config.json"
    )
    flagged = load_model(folder, preprocess_overrides={"mean": [0.5, 0.5, 0.5]})
    assert dict(flagged.preprocess_sources)["mean"] == "command line"
