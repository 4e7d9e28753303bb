"""How a decoded image gets the model's height and width: resize, then crop or pad.

`crop` is torchvision's eval transform (`Resize` -> `CenterCrop`); `pad` fits the image inside
and pads the rest (Pillow's `ImageOps.pad`, or timm's `crop_mode: border` with a crop size);
`fit-height` is PaddleOCR's text-line rule. Pillow's filters antialias, as torchvision's do;
the `cv2-*` ones are OpenCV's (`batchscore.resample`). A resize whose intermediate image would
be huge (a 1x40000 strip resized to a shorter side of 256) resamples only the region the centre
crop keeps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from batchscore.preprocess_config import PreprocessConfig, Size, pair
from batchscore.resample import KERNELS, cv2_resize, is_cv2
from batchscore.settings import INTERPOLATIONS

PILLOW_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
assert set(PILLOW_FILTERS) | set(KERNELS) == set(INTERPOLATIONS), "names must agree"
# Above this many pixels, the resized image is not made whole: only the part the centre crop
# keeps is resampled. Ordinary photos stay far below it and take torchvision's exact path.
MAX_INTERMEDIATE_PIXELS = 16_000_000
# As Pillow's own thumbnail() (its reducing_gap): a JPEG draft decode keeps at least twice the
# resized size. Measured on 15 photos, it cuts the change in pixels from 0.33-0.70 to
# 0.10-0.27 levels on average (worst photo 3.3 -> 1.1), for 39 ms instead of 30 per 12 MP
# photo at 256/224 (a full decode: 124).
DRAFT_GAP = 2


def resize_and_crop(rgb: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """torchvision `Resize` then `CenterCrop`, with memory bounded for any aspect ratio.

    When the resized image would exceed MAX_INTERMEDIATE_PIXELS, only the window the crop
    keeps is resampled: same scale, same filter centres, a crop-sized result.
    """
    if config.resize_mode == "pad":
        return letterbox(rgb, config)
    if config.resize_mode == "fit-height":
        return fit_height(rgb, config)
    new_w, new_h = _resized_size(rgb.width, rgb.height, config)
    if config.crop_size is None or new_w * new_h <= MAX_INTERMEDIATE_PIXELS:
        pixels = _resized(rgb, (new_w, new_h), config.interpolation)
    else:
        crop_h, crop_w = pair(config.crop_size)
        left, right = _kept(new_w, crop_w, config.crop_offset)
        top, bottom = _kept(new_h, crop_h, config.crop_offset)
        window = (left, top, right, bottom)
        pixels = _resized(rgb, (new_w, new_h), config.interpolation, window)
    if config.crop_size is not None:
        pixels = center_crop(pixels, config.crop_size, offset=config.crop_offset)
    return pixels


def _resized(
    rgb: Image.Image,
    size: tuple[int, int],
    interpolation: str,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """`rgb` resized to `size` (width, height) with Pillow's filter or OpenCV's; given a
    `window` (left, top, right, bottom), only that part of the result (Pillow's `box`)."""
    if is_cv2(interpolation):
        if window is None and size == rgb.size:
            return np.asarray(rgb)
        return cv2_resize(np.asarray(rgb), size, interpolation, window)
    resample = PILLOW_FILTERS[interpolation]
    if window is None:
        return np.asarray(rgb if size == rgb.size else rgb.resize(size, resample))
    left, top, right, bottom = window
    scale_x, scale_y = rgb.width / size[0], rgb.height / size[1]
    box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return np.asarray(rgb.resize((right - left, bottom - top), resample, box=box))


def letterbox(rgb: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Fit the image inside resize_size, keeping its aspect ratio.

    Without crop_size, the rest is padded to resize_size at pad_position, as Pillow's
    `ImageOps.pad`. With it, the fitted image is cropped or padded around the centre to
    crop_size, as timm's `ResizeKeepRatio(longest=1)` + `CenterCropOrPad` (crop_mode border).
    """
    assert not isinstance(config.resize_size, int)  # ruled out by resolve_preprocess
    height, width = config.resize_size
    if config.crop_size is None:
        size = _contained(rgb.width, rgb.height, width, height)
        left, top = _pad_start(width - size[0], config), _pad_start(height - size[1], config)
        fitted = _resized(rgb, size, config.interpolation)
        return _pasted(fitted, (height, width), (top, left), config.pad_value)
    ratio = max(rgb.height / height, rgb.width / width)
    size = (max(1, round(rgb.width / ratio)), max(1, round(rgb.height / ratio)))
    pixels = _resized(rgb, size, config.interpolation)
    return center_crop(pixels, config.crop_size, config.pad_value, config.crop_offset)


def fit_height(rgb: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """PaddleOCR's rule for text lines (`resize_norm_img`): the height to resize_size's, the
    width ceil(height x aspect ratio) up to resize_size's (a longer line is squeezed), the rest
    of the width padded with pad_value (on the right for pad_position top-left)."""
    assert not isinstance(config.resize_size, int)  # ruled out by resolve_preprocess
    height, width = config.resize_size
    new_w = min(width, math.ceil(height * rgb.width / rgb.height))
    left = _pad_start(width - new_w, config)
    fitted = _resized(rgb, (new_w, height), config.interpolation)
    return _pasted(fitted, (height, width), (0, left), config.pad_value)


def resized_size(
    width: int,
    height: int,
    resize: Size,
    longest_edge: int | None = None,
    rounding: str = "floor",
) -> tuple[int, int]:
    """(width, height) after torchvision `Resize` (an int sets the shorter side; `rounding`
    round: PaddleClas's `ResizeImage`), or with `longest_edge` after Hugging Face's
    `{shortest_edge, longest_edge}` resize."""
    if not isinstance(resize, int):
        return resize[1], resize[0]
    if longest_edge is not None:
        return _capped_size(width, height, resize, longest_edge)
    short, long = (width, height) if width <= height else (height, width)
    new_long = round(long * (resize / short)) if rounding == "round" else int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


def _resized_size(width: int, height: int, config: PreprocessConfig) -> tuple[int, int]:
    return resized_size(
        width, height, config.resize_size, config.longest_edge, config.resize_rounding
    )


def _capped_size(width: int, height: int, shortest: int, longest: int) -> tuple[int, int]:
    """transformers' `get_size_with_aspect_ratio`: the shorter side to `shortest`, unless the
    longer one would pass `longest`; an image already that short keeps its size."""
    short, long = min(width, height), max(width, height)
    exact: float = shortest
    if long / short * shortest > longest:
        exact = longest * short / long
        shortest = round(exact)
    if short == shortest:
        return width, height
    if width < height:
        return shortest, int(exact * height / width)
    return int(exact * width / height), shortest


def center_crop(
    pixels: np.ndarray, crop: Size, fill: tuple[int, int, int] = (0, 0, 0), offset: str = "round"
) -> np.ndarray:
    """torchvision `CenterCrop` on an HxWx3 array, padding with `fill` first when crop > image
    (timm's `CenterCropOrPad` is the same with its own fill; `offset` floor: Hugging Face's)."""
    crop_h, crop_w = pair(crop)
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        padded_size = (max(height, crop_h), max(width, crop_w))
        pixels = _pasted(pixels, padded_size, (pad_top, pad_left), fill)
        height, width = padded_size
    top, left = _crop_start(height - crop_h, offset), _crop_start(width - crop_w, offset)
    return pixels[top : top + crop_h, left : left + crop_w]


def _pasted(
    pixels: np.ndarray, size: tuple[int, int], at: tuple[int, int], fill: tuple[int, int, int]
) -> np.ndarray:
    """A (height, width) canvas of `fill` with `pixels` placed at (top, left)."""
    top, left = at
    canvas = np.empty((*size, 3), dtype=pixels.dtype)
    canvas[:] = np.asarray(fill, dtype=pixels.dtype)
    canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    return canvas


def _crop_start(margin: int, offset: str) -> int:
    return margin // 2 if offset == "floor" else round(margin / 2.0)


def _pad_start(margin: int, config: PreprocessConfig) -> int:
    return 0 if config.pad_position == "top-left" else _crop_start(margin, config.crop_offset)


def _contained(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """(width, height) fitted inside the box, with Pillow's `ImageOps.contain` rounding."""
    ratio, box_ratio = width / height, box_w / box_h
    if ratio > box_ratio:
        return box_w, max(1, round(height / width * box_w))
    if ratio < box_ratio:
        return max(1, round(width / height * box_h)), box_h
    return box_w, box_h


def _kept(size: int, crop: int, offset: str) -> tuple[int, int]:
    """The [start, end) range of one axis of a resized image that `center_crop` keeps."""
    if crop >= size:
        return 0, size
    start = _crop_start(size - crop, offset)
    return start, start + crop


def draft_allowed(interpolation: str) -> bool:
    """A JPEG may be decoded at a reduced size only for the filters that average an area
    anyway: nearest and OpenCV's filters pick source pixels, and need every one of them."""
    return interpolation != "nearest" and not is_cv2(interpolation)


def draft_target(config: PreprocessConfig, width: int, height: int) -> int:
    """Smallest side length the JPEG draft decode must keep: DRAFT_GAP times the resized
    size, so that libjpeg's cruder DCT scaling leaves the last reduction to the filter."""
    out_w, out_h = _resized_size(width, height, config)
    side = max(out_w, out_h) if not isinstance(config.resize_size, int) else min(out_w, out_h)
    return side * DRAFT_GAP
