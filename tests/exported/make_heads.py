"""Make the exported-model fixtures for other output heads: multi-label, binary and embeddings.

Like make.py: real exporters on tiny models with random weights (no third-party weights), and
`expected.json` from the framework's own inference on the test photos. Each folder holds what the
exporter wrote plus the small files a user writes beside it (`labels.txt`, `preprocess.json`,
Keras' `class_indices.json`).

- timm-multilabel-logits: timm's `onnx_export` of a BCEWithLogitsLoss-style model (the graph
  ends in raw logits); expected = sigmoid of timm's outputs after timm's eval transform.
- torchvision-multilabel-sigmoid: a small torchvision MobileNetV3 with `nn.Sigmoid()` appended,
  `torch.onnx.export` (TorchScript exporter); expected after torchvision's classic eval recipe.
- hf-encoder: a tiny CLIPVisionModel, `optimum-cli export onnx --task image-feature-extraction`;
  expected = `pooler_output` after the Hugging Face image processor.
- keras-binary: a tiny Keras CNN with one sigmoid unit, converted with tf2onnx; expected =
  [1 - p, p] from `model.predict` on `load_img(..., target_size=(64, 64)) / 255`.

Each case also checks that onnxruntime, given the framework's preprocessed tensor, gives
expected.json back. The first three cases run in the torch environment of make.py (plus
onnxruntime), keras-binary in a TensorFlow one; neither needs the other:

    /tmp/torchenv/bin/pip install onnxruntime
    /tmp/torchenv/bin/python tests/exported/make_heads.py torch

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime pillow
    /tmp/tfenv/bin/python tests/exported/make_heads.py keras
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent.parent / "artifacts" / "samples"
# as in make.py, which imports torch and so cannot be imported in the TensorFlow environment
LABELS = ["ant", "bee", "cat", "dog", "eel"]
SEED = 20261201


def images() -> dict[str, Path]:
    """make.py's photo set, in its order, read as it is (make.py writes the derived ones)."""
    found = {p.name: p for p in sorted(SAMPLES.glob("*.jpg"))}
    derived = ["tall.jpg", "wide.jpg", "tiny.jpg"]
    return found | {name: HERE / "images" / name for name in derived}


def _open(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _new_folder(name: str) -> Path:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _write_user_files(folder: Path, preprocess: dict[str, Any], labels: bool = True) -> None:
    if labels:
        (folder / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=1) + "\n")


def _write_expected(folder: Path, key: str, values: dict[str, list[float]], made: str) -> None:
    data = {"made_with": made, key: values}
    (folder / "expected.json").write_text(json.dumps(data, indent=1) + "\n")
    print(folder.name, {k: [round(x, 3) for x in v[:5]] for k, v in values.items()})


def _check_onnx(
    folder: Path, tensors: list[np.ndarray], expected: dict[str, list[float]], output: str,
    then: Any = None,
) -> None:  # fmt: skip
    """onnxruntime on the framework's preprocessed tensors must give expected.json back."""
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    feed = session.get_inputs()[0].name
    worst = 0.0
    for tensor, want in zip(tensors, expected.values(), strict=True):
        (got,) = session.run([output], {feed: tensor.astype(np.float32)})
        got = then(got[0]) if then else got[0]
        worst = max(worst, float(np.abs(np.asarray(got) - np.asarray(want)).max()))
    print(f"  {folder.name}: onnxruntime {onnxruntime.__version__} max |diff| {worst:.2e}")
    assert worst < 1e-5, worst


# ---------------------------------------------------------------------------------- torch


def timm_multilabel() -> None:
    import timm
    import torch
    from make import _sharpen
    from timm.data import create_transform, resolve_data_config
    from timm.models._hub import save_config_for_hf
    from timm.utils.onnx import onnx_export

    arch = "test_convnext"
    folder = _new_folder("timm-multilabel-logits")
    torch.manual_seed(SEED)
    model = timm.create_model(arch, pretrained=False, num_classes=len(LABELS))
    model.eval()
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config)
    inputs = [transform(_open(path)).unsqueeze(0) for path in images().values()]
    with torch.no_grad():
        _sharpen(model.get_classifier(), [model(x) for x in inputs])
    onnx_export(model, str(folder / "model.onnx"), batch_size=2, dynamic_size=False)
    save_config_for_hf(model, str(folder / "config.json"), model_config={"label_names": LABELS})
    _write_user_files(folder, {"head": "multi-label"})
    with torch.no_grad():
        outputs = [model(x).sigmoid()[0].tolist() for x in inputs]
    expected = dict(zip(images(), outputs, strict=True))
    made = f"timm {timm.__version__}: {arch}, {data_config}, torch {torch.__version__}"
    _write_expected(folder, "probabilities", expected, made)
    output = onnxruntime.InferenceSession(str(folder / "model.onnx")).get_outputs()[0].name
    sigmoid = lambda logits: 1 / (1 + np.exp(-logits.astype(np.float64)))  # noqa: E731
    _check_onnx(folder, [x.numpy() for x in inputs], expected, output, then=sigmoid)


def torchvision_multilabel() -> None:
    import torch
    import torchvision
    from make import _sharpen
    from torchvision import transforms

    folder = _new_folder("torchvision-multilabel-sigmoid")
    torch.manual_seed(SEED)
    net = torchvision.models.mobilenet_v3_small(num_classes=len(LABELS), width_mult=0.25)
    net.eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
    inputs = [transform(_open(path)).unsqueeze(0) for path in images().values()]
    with torch.no_grad():
        _sharpen(net.classifier[-1], [net(x) for x in inputs])
    model = torch.nn.Sequential(net, torch.nn.Sigmoid()).eval()
    torch.onnx.export(
        model, (inputs[0],), str(folder / "model.onnx"), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["probs"],
        dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}},
    )  # fmt: skip
    _write_user_files(folder, {
        "resize_size": 256, "crop_size": 224, "interpolation": "bilinear",
        "mean": mean, "std": std, "output": "probabilities",
    })  # fmt: skip
    with torch.no_grad():
        outputs = [model(x)[0].tolist() for x in inputs]
    expected = dict(zip(images(), outputs, strict=True))
    made = (f"torchvision {torchvision.__version__}: mobilenet_v3_small(width_mult=0.25) + "
            f"Sigmoid, Resize(256), CenterCrop(224), torch {torch.__version__}")  # fmt: skip
    _write_expected(folder, "probabilities", expected, made)
    _check_onnx(folder, [x.numpy() for x in inputs], expected, "probs")


def hf_encoder() -> None:
    import torch
    import transformers
    from make import optimum_export

    folder = HERE / "hf-encoder"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(SEED)
    # CLIPVisionModel: optimum exports its pooler_output for this task; ViT and Dinov2 give only
    # last_hidden_state.
    config = transformers.CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}
    )
    model = transformers.CLIPVisionModel(config).eval()
    inputs = [processor(images=_open(path), return_tensors="pt") for path in images().values()]
    optimum_export(model, processor, "image-feature-extraction", folder)
    with torch.no_grad():
        outputs = [model(**x).pooler_output[0].tolist() for x in inputs]
    expected = dict(zip(images(), outputs, strict=True))
    made = (f"transformers {transformers.__version__}: {type(model).__name__}, "
            f"{type(processor).__name__}, torch {torch.__version__}")  # fmt: skip
    _write_expected(folder, "embeddings", expected, made)
    tensors = [x["pixel_values"].numpy() for x in inputs]
    _check_onnx(folder, tensors, expected, "pooler_output")


# ---------------------------------------------------------------------------------- keras


def keras_binary() -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    folder = _new_folder("keras-binary")
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((64, 64, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])  # fmt: skip
    tensors = [
        keras.utils.img_to_array(
            keras.utils.load_img(path, target_size=(64, 64), interpolation="bilinear")
        )[None] / 255.0
        for path in images().values()
    ]  # fmt: skip
    # Random weights give p near 0.5 everywhere: rescale the dense unit so that its logit
    # spans [-2, 2] over the photos (p from about 0.12 to 0.88).
    features = keras.Model(model.inputs, model.layers[-2].output)
    pooled = np.concatenate([features.predict(x, verbose=0) for x in tensors])
    dense = model.layers[-1]
    weight, bias = dense.get_weights()
    logits = pooled @ weight + bias
    scale = 4.0 / float(np.ptp(logits))
    centre = (float(logits.max()) + float(logits.min())) / 2
    dense.set_weights([weight * scale, (bias - centre) * scale])
    # Keras 3 models lack tf2onnx's output_names; name the output (the name is its ONNX name)
    model.output_names = ["probability"]
    signature = (tf.TensorSpec((None, 64, 64, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(
        model, input_signature=signature, opset=17, output_path=str(folder / "model.onnx")
    )
    (folder / "class_indices.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    (folder / "preprocess.json").write_text(json.dumps({
        "resize_size": [64, 64], "interpolation": "bilinear", "mean": [0, 0, 0],
        "std": [1, 1, 1], "layout": "NHWC",
    }, indent=1) + "\n")  # fmt: skip
    outputs = [float(model.predict(x, verbose=0)[0, 0]) for x in tensors]
    expected = {name: [1 - p, p] for name, p in zip(images(), outputs, strict=True)}
    made = (f"keras {keras.__version__}, tensorflow {tf.__version__}, tf2onnx "
            f"{tf2onnx.__version__}: Conv2D(4, 3) + GlobalAveragePooling2D + Dense(1, sigmoid), "
            "load_img(target_size=(64, 64), interpolation='bilinear') / 255")  # fmt: skip
    _write_expected(folder, "probabilities", expected, made)
    _check_onnx(folder, tensors, expected, "probability", then=lambda p: [1 - p[0], p[0]])


def main() -> None:
    which = sys.argv[1:] or ["torch"]
    if "torch" in which:
        sys.path.insert(0, str(HERE))
        timm_multilabel()
        torchvision_multilabel()
        hf_encoder()
    if "keras" in which:
        keras_binary()
    print("made with python", sys.version.split()[0])


if __name__ == "__main__":
    main()
