"""What preprocessing a model gets: batchscore's keys, their defaults and meanings, and the one
place (`resolve_preprocess`) that decides which value wins.

The config is data that travels with the model (`preprocess.json`, an exporter's files, or
the ONNX file's metadata); see docs/models.md for every key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from batchscore.errors import ModelError
from batchscore.settings import DEFAULT_THRESHOLD, HEADS, INTERPOLATIONS, OUTPUT_KINDS

# The seeds' training recipe: used when neither the model nor the command line says otherwise.
DEFAULT_PREPROCESS: dict[str, Any] = {
    "resize_size": [320, 320],
    "crop_size": None,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "output": "logits",
    "channel_order": "RGB",
    "layout": None,
    "resize_mode": "crop",
    "pad_value": 0,
    "pad_position": "center",
    "exif_orientation": True,
    "crop_offset": "round",
    "longest_edge": None,
    "resize_rounding": "floor",
    # How the output is read (not pixels, but resolved with the same precedence, key by key)
    "head": None,  # None: read from the graph (see batchscore.model)
    "threshold": DEFAULT_THRESHOLD,
    "thresholds": None,  # {class name: threshold} over "threshold", for a multi-label head
    "l2_normalize": False,  # an embedding head's vectors scaled to unit length
}
CHANNEL_ORDERS = ("RGB", "BGR")
# crop: torchvision Resize (+ CenterCrop); pad: letterbox, fit inside (+ CenterCrop or pad);
# fit-height: PaddleOCR's text-line rule, the height fitted, the width padded (or squeezed)
RESIZE_MODES = ("crop", "pad", "fit-height")
PAD_POSITIONS = ("center", "top-left")
# Where a centred crop or pad starts when the margin is odd: torchvision, timm and Pillow's
# ImageOps.pad round half to even; Hugging Face's image processors and many hand-written
# letterboxes floor.
CROP_OFFSETS = ("round", "floor")
# Keys added after setup ids were first recorded: left out of the id at their default, so that
# an upgrade does not make every row scored before it look stale.
LATER_KEYS: dict[str, Any] = {
    "crop_offset": "round",
    "longest_edge": None,
    "resize_rounding": "floor",
    "head": None,
    "threshold": DEFAULT_THRESHOLD,
    "thresholds": {},
    "l2_normalize": False,
}
# How the longer side of a shorter-side resize is rounded: torchvision truncates (floor),
# PaddleClas's ResizeImage rounds.
RESIZE_ROUNDINGS = ("floor", "round")
LAYOUTS = ("NCHW", "NHWC")
Size = int | tuple[int, int]


@dataclass(frozen=True)
class PreprocessConfig:
    """Resolved preprocessing. `resize_size` int = shorter side, (h, w) = exact size."""

    resize_size: Size
    crop_size: Size | None
    interpolation: str
    mean: tuple[float, ...]  # one per model channel, in the model's channel order
    std: tuple[float, ...]
    output: str = "logits"
    channel_order: str = "RGB"
    layout: str | None = None  # None: read from the model's input shape
    resize_mode: str = "crop"
    pad_value: tuple[int, int, int] = (0, 0, 0)  # RGB, 0-255, the letterbox's border
    pad_position: str = "center"
    exif_orientation: bool = True  # False: the model was trained on pixels as stored
    crop_offset: str = "round"
    longest_edge: int | None = None  # with an int resize_size: the cap on the longer side
    resize_rounding: str = "floor"
    head: str | None = None  # as given; ModelSpec.head is what was resolved
    threshold: float = DEFAULT_THRESHOLD
    thresholds: tuple[tuple[str, float], ...] = ()
    l2_normalize: bool = False

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensor handed to the model."""
        if self.crop_size is not None:
            return pair(self.crop_size)
        assert not isinstance(self.resize_size, int)  # ruled out by resolve_preprocess
        return self.resize_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("resize_size", "crop_size", "mean", "std", "pad_value"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        data["thresholds"] = dict(self.thresholds)
        return data

    def identity(self) -> dict[str, Any]:
        """What the setup id hashes: `to_dict` less the later keys at their defaults."""
        data = self.to_dict()
        return {k: v for k, v in data.items() if not (k in LATER_KEYS and LATER_KEYS[k] == v)}


def pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _parse_size(name: str, value: Any, *, allow_none: bool) -> Size | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ModelError(f"preprocess '{name}' must be an int or [height, width], got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        if name == "crop_size" and value[0] == value[1]:
            return int(value[0])
        return (int(value[0]), int(value[1]))
    raise ModelError(f"preprocess '{name}' must be an int or [height, width], got {value!r}")


def _parse_channels(name: str, value: Any) -> tuple[float, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) not in (1, 3)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
    ):
        raise ModelError(
            f"preprocess '{name}' must be 3 numbers (one per channel, in the model's channel"
            f" order) or 1 (a grayscale model), got {value!r}"
        )
    return tuple(float(v) for v in value)


def _parse_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of `choices`, matched in any case, spelled as the choice is."""
    spelled = {choice.lower(): choice for choice in choices}
    text = str(value).lower()
    if text not in spelled:
        raise ModelError(
            f"preprocess '{name}' must be one of {sorted(spelled.values())}, got {value!r}"
        )
    return spelled[text]


def resolve_preprocess(
    overrides: Mapping[str, Any] | None = None, model_config: Mapping[str, Any] | None = None
) -> PreprocessConfig:
    """Merge with one precedence: explicit overrides > the model's config > defaults."""
    merged: dict[str, Any] = dict(DEFAULT_PREPROCESS)
    for layer in (model_config or {}, overrides or {}):
        unknown = set(layer) - set(DEFAULT_PREPROCESS)
        if unknown:
            raise ModelError(f"unknown preprocess keys: {sorted(unknown)}")
        merged.update({key: value for key, value in layer.items() if value is not None})
    interpolation = _parse_choice("interpolation", merged["interpolation"], INTERPOLATIONS)
    output = str(merged["output"])
    if output not in OUTPUT_KINDS:
        raise ModelError(f"preprocess 'output' must be one of {OUTPUT_KINDS}, got {output!r}")
    std = _parse_channels("std", merged["std"])
    if any(v == 0 for v in std):
        raise ModelError("preprocess 'std' must not contain 0")
    resize = _parse_size("resize_size", merged["resize_size"], allow_none=False)
    crop = _parse_size("crop_size", merged["crop_size"], allow_none=True)
    assert resize is not None
    mode = _parse_choice("resize_mode", merged["resize_mode"], RESIZE_MODES)
    position = _parse_choice("pad_position", merged["pad_position"], PAD_POSITIONS)
    longest = _parse_longest_edge(merged["longest_edge"], resize, mode)
    if mode != "crop" and isinstance(resize, int):
        raise ModelError(
            f"preprocess 'resize_mode' {mode} fits the image inside resize_size [height, width]"
            " and pads the rest: give resize_size as [height, width]"
        )
    if mode == "fit-height" and crop is not None:
        raise ModelError("preprocess 'resize_mode' fit-height takes no crop_size")
    if mode == "pad" and crop is not None and position != "center":
        raise ModelError(
            "preprocess 'resize_mode' pad with a crop_size crops or pads around the centre:"
            " leave 'pad_position' at center, or drop crop_size"
        )
    if isinstance(resize, int) and crop is None:
        raise ModelError(
            "preprocess 'resize_size' as a single int keeps the aspect ratio, so images differ"
            " in size: set 'crop_size' too, or give resize_size as [height, width]"
        )
    return PreprocessConfig(
        resize_size=resize,
        crop_size=crop,
        interpolation=interpolation,
        mean=_parse_channels("mean", merged["mean"]),
        std=std,
        output=output,
        channel_order=_parse_choice("channel_order", merged["channel_order"], CHANNEL_ORDERS),
        layout=_parse_layout(merged["layout"]),
        resize_mode=mode,
        pad_value=_parse_pad_value(merged["pad_value"]),
        pad_position=position,
        exif_orientation=_parse_flag("exif_orientation", merged["exif_orientation"]),
        crop_offset=_parse_choice("crop_offset", merged["crop_offset"], CROP_OFFSETS),
        longest_edge=longest,
        resize_rounding=_parse_choice(
            "resize_rounding", merged["resize_rounding"], RESIZE_ROUNDINGS
        ),
        head=None if merged["head"] is None else _parse_choice("head", merged["head"], HEADS),
        threshold=_parse_threshold("threshold", merged["threshold"]),
        thresholds=_parse_thresholds(merged["thresholds"]),
        l2_normalize=_parse_flag("l2_normalize", merged["l2_normalize"]),
    )


def _parse_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ModelError(f"preprocess '{name}' must be a probability in [0, 1], got {value!r}")
    return float(value)


def _parse_thresholds(value: Any) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ModelError(
            f"preprocess 'thresholds' must map class names to probabilities, got {value!r}"
        )
    return tuple(
        (str(name), _parse_threshold(f"thresholds.{name}", threshold))
        for name, threshold in sorted(value.items())
    )


def _parse_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"preprocess '{name}' must be true or false, got {value!r}")
    return value


def _parse_longest_edge(value: Any, resize: Size, mode: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"preprocess 'longest_edge' must be a positive int, got {value!r}")
    if not isinstance(resize, int) or mode != "crop":
        raise ModelError(
            "preprocess 'longest_edge' caps the longer side when resize_size is one int (the"
            " shorter side): give resize_size as an int, with resize_mode crop"
        )
    return value


def _parse_layout(value: Any) -> str | None:
    return None if value is None else _parse_choice("layout", value, LAYOUTS)


def _parse_pad_value(value: Any) -> tuple[int, int, int]:
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        isinstance(values, (list, tuple))
        and len(values) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)
    ):
        return (int(values[0]), int(values[1]), int(values[2]))
    raise ModelError(f"preprocess 'pad_value' must be 0-255 or [R, G, B] of 0-255, got {value!r}")
