"""Preprocessing that other exporters write, translated into batchscore's config.

- Hugging Face (`optimum-cli export onnx`, `save_pretrained`): `preprocessor_config.json`, read
  as transformers' image processors read it: `do_resize`, `size` (`height`/`width`,
  `shortest_edge`, `shortest_edge` + `longest_edge`), `resample` (Pillow's integer codes),
  `do_center_crop`, `crop_size`, `crop_pct` (ConvNext's rule), `do_rescale`, `rescale_factor`,
  `do_normalize`, `image_mean`, `image_std`, `data_format`.
- timm: `config.json` with `pretrained_cfg`: `input_size`, `interpolation`, `crop_pct`,
  `crop_mode` (`center` with a square size, `squash`, `border`), `mean`, `std`.

A setting batchscore cannot reproduce exactly is refused with one line naming it, never
approximated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from batchscore.errors import ModelError

HF_FILE = "preprocessor_config.json"
TIMM_FILE = "config.json"
# transformers' config.json says how a classifier was trained; its ONNX export ends in logits
HF_PROBLEM_TYPES = {
    "single_label_classification": "softmax",
    "multi_label_classification": "multi-label",
}
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
CONVNEXT_FULL_SIZE = 384  # from this shortest edge on, ConvNext resizes without cropping
# What timm's resolve_data_config falls back to for a key pretrained_cfg leaves out.
TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)
TIMM_DEFAULT_STD = (0.229, 0.224, 0.225)
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_INTERPOLATION = "bicubic"


def exporter_config(folder: Path) -> tuple[dict[str, Any], str] | None:
    """(batchscore config, the file it came from) from an exporter's files, or None."""
    hf = folder / HF_FILE
    if hf.is_file():
        config = from_hugging_face(_read(hf), hf)
        model_config = folder / TIMM_FILE  # transformers' model config.json, beside it
        problem = _read(model_config).get("problem_type") if model_config.is_file() else None
        if problem in HF_PROBLEM_TYPES:
            config["head"] = HF_PROBLEM_TYPES[problem]
            return config, f"{HF_FILE} and {TIMM_FILE} (problem_type {problem})"
        return config, HF_FILE
    timm = folder / TIMM_FILE
    if timm.is_file():
        data = _read(timm)
        if isinstance(data.get("pretrained_cfg"), dict):
            return from_timm(data["pretrained_cfg"], timm), f"{TIMM_FILE} (pretrained_cfg)"
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} must be a JSON object")
    return data


def from_hugging_face(data: dict[str, Any], where: Path) -> dict[str, Any]:
    """The config a transformers image processor applies, as batchscore's keys."""
    # transformers' processors make channels-first pixel_values unless told otherwise, and
    # start a centre crop at the floor of half the margin (torchvision rounds).
    layout = "NHWC" if data.get("data_format") == "channels_last" else "NCHW"
    config: dict[str, Any] = {"layout": layout, "crop_offset": "floor"}
    if not data.get("do_resize", True):
        raise ModelError(f"{where}: do_resize false is not supported; pass --resize-size")
    size = data.get("size")
    crop_pct = data.get("crop_pct")
    kind = str(data.get("image_processor_type", ""))
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        config["resize_size"] = [int(size["height"]), int(size["width"])]
    elif isinstance(size, dict) and set(size) == {"shortest_edge", "longest_edge"}:
        if not data.get("do_center_crop"):
            raise ModelError(
                f"{where}: size {size!r} without a centre crop gives every image its own size,"
                " and batchscore feeds batches of one size; pass --resize-size H,W"
            )
        config["resize_size"] = int(size["shortest_edge"])
        config["longest_edge"] = int(size["longest_edge"])
    elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
        edge = int(size["shortest_edge"])
        if crop_pct is not None and kind.startswith("ConvNext"):
            if edge < CONVNEXT_FULL_SIZE:
                config["resize_size"] = int(edge / float(crop_pct))
                config["crop_size"] = edge
            else:
                config["resize_size"] = [edge, edge]
        else:
            config["resize_size"] = edge
    else:
        raise ModelError(
            f"{where}: size {size!r} is not supported (height/width, shortest_edge, or"
            " shortest_edge with longest_edge);"
            " pass --resize-size and --crop-size"
        )
    if crop_pct is not None and not kind.startswith("ConvNext"):
        raise ModelError(
            f"{where}: crop_pct for {kind or 'this processor'} is not supported;"
            " pass --resize-size and --crop-size"
        )
    if data.get("do_center_crop") and "crop_size" not in config:
        crop = data.get("crop_size")
        if isinstance(crop, dict) and {"height", "width"} <= set(crop):
            config["crop_size"] = [int(crop["height"]), int(crop["width"])]
        elif isinstance(crop, int):
            config["crop_size"] = crop
        else:
            raise ModelError(f"{where}: crop_size {crop!r} is not supported")
    if "resample" in data:
        if data["resample"] not in PIL_RESAMPLE:
            raise ModelError(f"{where}: resample {data['resample']!r} is not a Pillow filter")
        config["interpolation"] = PIL_RESAMPLE[data["resample"]]
    factor = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
    mean = data.get("image_mean", [0.0] * 3) if data.get("do_normalize", True) else [0.0] * 3
    std = data.get("image_std", [1.0] * 3) if data.get("do_normalize", True) else [1.0] * 3
    # batchscore computes (x / 255 - mean') / std'; the processor (x * factor - mean) / std.
    config["mean"] = [m / (255 * factor) for m in mean]
    config["std"] = [s / (255 * factor) for s in std]
    return config


def from_timm(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """timm's eval transform (`resolve_data_config` + `create_transform`) as batchscore's keys."""
    size = cfg.get("input_size") or cfg.get("test_input_size")
    if not (isinstance(size, list) and len(size) == 3):
        raise ModelError(f"{where}: pretrained_cfg has no input_size [C, H, W]")
    height, width = int(size[1]), int(size[2])
    crop_pct = float(cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)
    mode = cfg.get("crop_mode") or "center"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    config: dict[str, Any] = {"crop_size": [height, width], "layout": "NCHW"}  # timm: always
    if mode == "squash":
        config["resize_size"] = list(scale)
    elif mode == "border":  # fit the longest edge, then crop or pad with the mean colour
        mean = cfg.get("mean") or TIMM_DEFAULT_MEAN
        config["resize_mode"] = "pad"
        config["resize_size"] = list(scale)
        fill = [round(255 * float(v)) for v in mean]
        config["pad_value"] = fill * 3 if len(fill) == 1 else fill  # a grayscale model's mean
    elif mode == "center" and scale[0] == scale[1]:
        config["resize_size"] = scale[0]
    else:
        raise ModelError(
            f"{where}: crop_mode {mode!r} with input size {height}x{width} is not supported;"
            " pass --resize-size and --crop-size"
        )
    config["interpolation"] = str(cfg.get("interpolation") or TIMM_DEFAULT_INTERPOLATION)
    for key, default in (("mean", TIMM_DEFAULT_MEAN), ("std", TIMM_DEFAULT_STD)):
        config[key] = [float(v) for v in cfg.get(key) or default]
    return config
