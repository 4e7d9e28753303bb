"""Make the exported-model fixtures: real exporters on tiny models, and real framework outputs.

Each folder here is what an exporter wrote, untouched: timm's `onnx_export` and
`save_config_for_hf`, or `optimum-cli export onnx`. The weights are drawn here at random (no
third-party weights), with the classifier scaled up so that the probabilities move with the
pixels. `expected.json` holds what the framework's own inference (timm's eval transform, or the
Hugging Face image processor, then the torch model) gives for each test image.
`timm_transforms.npz` holds timm's eval transform output for small images and several configs.

batchscore does not depend on torch; run this in a separate environment:

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 \
        optimum-onnx==0.1.0 onnxscript
    /tmp/torchenv/bin/python tests/exported/make.py
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import transformers
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_config_for_hf
from timm.utils.onnx import onnx_export

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent.parent / "artifacts" / "samples"
LABELS = ["ant", "bee", "cat", "dog", "eel"]
SEED = 20261201


def images() -> dict[str, Path]:
    """The bundled photos, plus a tall, a wide and a tiny one cut from them (JPEG, q 90)."""
    folder = HERE / "images"
    folder.mkdir(exist_ok=True)
    derived = {
        "tall.jpg": lambda: Image.open(SAMPLES / "rocket.jpg").rotate(90, expand=True),
        "wide.jpg": lambda: Image.open(SAMPLES / "coffee.jpg").crop((0, 120, 600, 270)),
        "tiny.jpg": lambda: Image.open(SAMPLES / "cat.jpg").resize((45, 30)),
    }
    for name, make in derived.items():
        make().convert("RGB").save(folder / name, quality=90)
    found = {p.name: p for p in sorted(SAMPLES.glob("*.jpg"))}
    return found | {name: folder / name for name in derived}


def _open(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _sharpen(head: torch.nn.Module, logits: list[torch.Tensor]) -> None:
    """Random weights give outputs that hardly move with the input. Re-centre and scale the
    final (linear) layer so that each class's logit varies by about 3 across the test images:
    the top class then changes from image to image, and a wrong pixel shows."""
    stacked = torch.cat(logits)
    scale = 3.0 / stacked.std(dim=0).mean().item()
    with torch.no_grad():
        head.bias.sub_(stacked.mean(dim=0)).mul_(scale)  # type: ignore[operator]
        head.weight.mul_(scale)  # type: ignore[operator]


def timm_case(
    name: str, arch: str, overlay: dict[str, Any], dynamic: bool, external: bool = False
) -> None:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    torch.manual_seed(SEED)
    model = timm.create_model(
        arch, pretrained=False, num_classes=len(LABELS), pretrained_cfg_overlay=overlay
    )
    model.eval()
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config)
    inputs = [transform(_open(path)).unsqueeze(0) for path in images().values()]
    with torch.no_grad():
        _sharpen(model.get_classifier(), [model(x) for x in inputs])
    onnx_export(model, str(folder / "model.onnx"), batch_size=2, dynamic_size=dynamic,
                use_dynamo=external, external_data=external or None)  # fmt: skip
    save_config_for_hf(model, str(folder / "config.json"), model_config={"label_names": LABELS})
    with torch.no_grad():
        outputs = [model(x).softmax(-1)[0].tolist() for x in inputs]
    expected = dict(zip(images(), outputs, strict=True))
    _write_expected(folder, expected, f"timm {timm.__version__}: {arch}, {data_config}")


def hf_case(name: str, config: Any, processor: Any, model_class: Any) -> None:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(SEED)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    model = model_class(config).eval()
    inputs = [processor(images=_open(path), return_tensors="pt") for path in images().values()]
    with torch.no_grad():
        _sharpen(model.classifier, [model(**x).logits for x in inputs])
    optimum_export(model, processor, "image-classification", folder)
    with torch.no_grad():
        outputs = [model(**x).logits.softmax(-1)[0].tolist() for x in inputs]
    expected = dict(zip(images(), outputs, strict=True))
    made = f"transformers {transformers.__version__}: {type(model).__name__}"
    _write_expected(folder, expected, made)


def optimum_export(model: Any, processor: Any, task: str, folder: Path) -> None:
    """What `optimum-cli export onnx` writes for a model saved with its image processor."""
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        optimum = str(Path(sys.executable).parent / "optimum-cli")
        command = [optimum, "export", "onnx", "--model", checkpoint, "--task", task, str(folder)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def _write_expected(folder: Path, probabilities: dict[str, list[float]], made: str) -> None:
    data = {"made_with": f"{made}, torch {torch.__version__}",
            "probabilities": probabilities}  # fmt: skip
    (folder / "expected.json").write_text(json.dumps(data, indent=1) + "\n")
    print(folder.name, {k: round(max(v), 3) for k, v in probabilities.items()})


TRANSFORM_CONFIGS = [
    {"input_size": (3, 32, 32), "crop_pct": 0.9, "crop_mode": "border",
     "interpolation": "bicubic", "mean": (0.5, 0.25, 0.75), "std": (0.5, 0.5, 0.5)},
    {"input_size": (3, 24, 40), "crop_pct": 1.0, "crop_mode": "border",
     "interpolation": "bilinear"},
    {"input_size": (3, 30, 20), "crop_pct": 0.8, "crop_mode": "border"},
    {"input_size": (3, 28, 28), "crop_pct": 0.95, "crop_mode": "center",
     "interpolation": "bilinear"},
    {"input_size": (3, 24, 32), "crop_pct": 0.9, "crop_mode": "squash",
     "interpolation": "bicubic"},
]  # fmt: skip


def transform_goldens() -> None:
    """timm's own eval transform on small noisy images of several shapes, for each config."""
    rng = np.random.default_rng(SEED)
    shapes = [(23, 61), (57, 19), (40, 40), (9, 13), (120, 90)]  # (height, width)
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    arrays: dict[str, Any] = {"configs": np.array(json.dumps(TRANSFORM_CONFIGS))}
    for i, pixels in enumerate(pictures):
        arrays[f"image{i}"] = pixels
        for j, cfg in enumerate(TRANSFORM_CONFIGS):
            transform = create_transform(**resolve_data_config(pretrained_cfg=dict(cfg)))
            arrays[f"tensor{i}_{j}"] = transform(Image.fromarray(pixels)).numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    (HERE / "timm_transforms.npz").write_bytes(buffer.getvalue())
    print("timm_transforms.npz", len(pictures), "images x", len(TRANSFORM_CONFIGS), "configs")


def main() -> None:
    transform_goldens()
    timm_case("timm-resnet-dynamic", "test_resnet", {}, dynamic=True)
    timm_case("timm-vit-border", "test_vit", {"crop_mode": "border", "crop_pct": 0.9}, False)
    timm_case("timm-efficientnet-squash", "test_efficientnet_gn",
              {"crop_mode": "squash", "interpolation": "bilinear"}, dynamic=False)  # fmt: skip
    # torch's dynamo exporter, weights in model.onnx.data beside the graph
    timm_case("timm-nfnet-external-data", "test_nfnet", {}, dynamic=True, external=True)
    hf_case(
        "hf-vit",
        transformers.ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64),
        transformers.ViTImageProcessor(size={"height": 64, "width": 64}),
        transformers.ViTForImageClassification,
    )  # fmt: skip
    hf_case(
        "hf-convnext",
        transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
        transformers.ConvNextImageProcessor(size={"shortest_edge": 96}, crop_pct=0.875),
        transformers.ConvNextForImageClassification,
    )
    print("made with python", sys.version.split()[0])


if __name__ == "__main__":
    main()
