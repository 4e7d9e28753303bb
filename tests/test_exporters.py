"""Models exported by Hugging Face and timm, read from the files those exporters write.

Hugging Face: transformers' own image processors (their Pillow backends, which need no torch)
write `preprocessor_config.json` with `save_pretrained`, and are the oracle for the tensor.
timm needs torch, so its eval transform is spelled out here from timm's
`transforms_imagenet_eval` with Pillow and numpy, and its `config.json` is written as
timm's `push_to_hub` writes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image
from transformers import CLIPImageProcessorPil, ConvNextImageProcessorPil, ViTImageProcessorPil

from batchscore.cli import cli
from batchscore.errors import ModelError
from batchscore.model import load_model
from batchscore.preprocess import load_image, tensor_batch
from tests.conftest import noisy


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
    "no-rescale": lambda: ViTImageProcessorPil(
        size={"height": 24, "width": 24}, do_rescale=False, image_mean=[120, 110, 100],
        image_std=[60, 60, 60], resample=3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_a_hugging_face_export_gets_the_tensor_its_image_processor_makes(
    tmp_path: Path, name: str
) -> None:
    processor = PROCESSORS[name]()
    image = tmp_path / "photo.png"
    noisy((180, 90, 30), (71, 53), seed=5).save(image)
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


def _timm_reference(image: Path, cfg: dict[str, object]) -> np.ndarray:
    """timm's transforms_imagenet_eval for crop_mode center/squash, on a PIL image."""
    _, height, width = cfg["input_size"]  # type: ignore[misc]
    crop_pct = float(cfg["crop_pct"])  # type: ignore[arg-type]
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[
        str(cfg["interpolation"])
    ]
    picture = Image.open(image).convert("RGB")
    if cfg["crop_mode"] == "squash":
        picture = picture.resize((scale[1], scale[0]), resample)
    else:  # Resize(int): the shorter side, the longer one truncated as torchvision does
        w, h = picture.size
        short = scale[0]
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        picture = picture.resize(size, resample)
    w, h = picture.size
    top, left = round((h - height) / 2), round((w - width) / 2)
    pixels = np.asarray(picture, dtype=np.float64)[top : top + height, left : left + width] / 255
    mean, std = np.asarray(cfg["mean"]), np.asarray(cfg["std"])
    return ((pixels - mean) / std).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("mode", ["center", "squash"])
def test_a_timm_export_gets_timms_eval_transform(tmp_path: Path, mode: str) -> None:
    cfg = {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": mode,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    folder = _model(tmp_path / "timm", 32, 32)
    config = {"architecture": "tiny", "num_classes": 3, "pretrained_cfg": cfg,
              "label_names": ["x", "y", "z"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    image = tmp_path / "photo.png"
    noisy((30, 160, 200), (64, 45), seed=2).save(image)
    fed = _fed(folder, image)
    np.testing.assert_allclose(fed, _timm_reference(image, cfg), rtol=0, atol=1 / 255)
    spec = load_model(folder)
    assert spec.class_names == ("x", "y", "z")
    assert dict(spec.preprocess_sources)["crop_size"] == "config.json (pretrained_cfg)"


def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", 32, 32)
    (folder / "labels.txt").write_text("a\nb\nc\n")
    cfg = {"input_size": [3, 32, 32], "crop_pct": 1.0, "crop_mode": "border"}
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": cfg}))
    with pytest.raises(ModelError, match="crop_mode 'border'"):
        load_model(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 224}))
    with pytest.raises(ModelError, match="size 224 is not supported"):
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
