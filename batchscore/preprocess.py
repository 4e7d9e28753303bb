"""How one image file becomes one model input: decode, fix orientation and mode, resize, crop,
normalise.

The semantics are torchvision's eval transform on a PIL image
(`Resize` -> `CenterCrop` -> `ToTensor` -> `Normalize`), reproduced without torchvision so
that a model trained with it sees the same tensor here (to within 1/255 per value). The one
deliberate shortcut is the JPEG draft decode: libjpeg scales the image down by 1/2, 1/4 or 1/8
while decoding, which is several times faster on camera-sized photos and changes pixels by
less than 1/255 on average; `fast_jpeg=False` turns it off.

The preprocessing config is data that travels with the model (`preprocess.json` or the ONNX
file's metadata); `resolve_preprocess` is the one place that decides which value wins.

Hostile files are this module's daily bread. Every decode starts from the same Pillow state
(all plugins registered in one fixed order, so what a file opens as never depends on what was
opened before). `--max-pixels` is the one pixel limit: Pillow's own is set to match it, so that
it also guards images nested inside a file (an ICNS icon's PNG, say). A resize whose
intermediate image would be huge (a 1x40000 strip resized to a shorter side of 256) resamples
only the region the centre crop keeps. Pillow's warnings about a file are returned with it
instead of going to the terminal.
"""

from __future__ import annotations

import functools
import io
import math
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchscore.errors import ModelError
from batchscore.resample import KERNELS, cv2_resize, is_cv2
from batchscore.settings import DEFAULT_MAX_PIXELS, OUTPUT_KINDS
from batchscore.settings import INTERPOLATIONS as INTERPOLATION_NAMES

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
LATER_KEYS = {"crop_offset": "round", "longest_edge": None, "resize_rounding": "floor"}
# How the longer side of a shorter-side resize is rounded: torchvision truncates (floor),
# PaddleClas's ResizeImage rounds.
RESIZE_ROUNDINGS = ("floor", "round")
LAYOUTS = ("NCHW", "NHWC")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
assert set(INTERPOLATIONS) | set(KERNELS) == set(INTERPOLATION_NAMES), "names must agree"
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as viewers do
_EXIF_ORIENTATION = 0x0112
# Above this many pixels, the resized image is not made whole: only the part the centre crop
# keeps is resampled. Ordinary photos stay far below it and take torchvision's exact path.
MAX_INTERMEDIATE_PIXELS = 16_000_000
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Size = int | tuple[int, int]


class ImageError(Exception):
    """An image that cannot be scored; its message becomes the row's `error` reason."""


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

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensor handed to the model."""
        if self.crop_size is not None:
            return _pair(self.crop_size)
        assert not isinstance(self.resize_size, int)  # ruled out by resolve_preprocess
        return self.resize_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("resize_size", "crop_size", "mean", "std", "pad_value"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    def identity(self) -> dict[str, Any]:
        """What the setup id hashes: `to_dict` less the later keys at their defaults."""
        data = self.to_dict()
        return {k: v for k, v in data.items() if not (k in LATER_KEYS and LATER_KEYS[k] == v)}


def _pair(size: Size) -> tuple[int, int]:
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
    interpolation = _parse_choice("interpolation", merged["interpolation"], INTERPOLATION_NAMES)
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


@functools.lru_cache(maxsize=16)
def normalization_lut(config: PreprocessConfig) -> np.ndarray:
    """Per-channel table uint8 -> float32, computed with ToTensor/Normalize's float32 math."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None]
    return ((values[None, :] - mean) / std).astype(np.float32)


def tensor_batch(
    images: list[np.ndarray],
    config: PreprocessConfig,
    dtype: str,
    *,
    layout: str = "NCHW",
    channels: int = 3,
) -> np.ndarray:
    """HxWx3 uint8 RGB images as the batch a model takes.

    One channel: Pillow's own luma (`convert("L")`, ITU-R 601-2). BGR: channels reversed.
    Float inputs go through the per-channel table (float16 ones are computed in float32 and
    rounded once); a uint8 input gets raw pixels (the model normalises inside its graph).
    `layout` NHWC puts the channel axis last."""
    height, width = config.input_size
    batch = np.empty((len(images), channels, height, width), dtype=dtype)
    lut = normalization_lut(config)
    for row, rgb in enumerate(images):
        pixels = _model_channels(rgb, config.channel_order, channels)
        for channel in range(channels):
            if dtype == "uint8":
                batch[row, channel] = pixels[:, :, channel]
            elif dtype == "float32":
                np.take(lut[channel], pixels[:, :, channel], out=batch[row, channel])
            else:
                batch[row, channel] = np.take(lut[channel], pixels[:, :, channel])
    return np.ascontiguousarray(batch.transpose(0, 2, 3, 1)) if layout == "NHWC" else batch


def _model_channels(rgb: np.ndarray, order: str, channels: int) -> np.ndarray:
    if channels == 1:
        r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
        luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[:, :, None]
    return rgb[:, :, ::-1] if order == "BGR" else rgb


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
    crop_h, crop_w = _pair(crop)
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        padded = np.empty((max(height, crop_h), max(width, crop_w), 3), dtype=pixels.dtype)
        padded[:] = np.asarray(fill, dtype=pixels.dtype)
        padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
        pixels = padded
        height, width = pixels.shape[:2]
    top, left = _crop_start(height - crop_h, offset), _crop_start(width - crop_w, offset)
    return pixels[top : top + crop_h, left : left + crop_w]


def _crop_start(margin: int, offset: str) -> int:
    return margin // 2 if offset == "floor" else round(margin / 2.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16-bit scaled (not clipped) to 8."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(image, dtype=np.float64)
        eight = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    if mode == "F":
        eight = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def init_pillow() -> None:
    """Put Pillow in the same state in every process before it opens anything.

    Pillow imports a format's plugin lazily, by file extension, and tries plugins in the
    order they were imported, so without this a file could open as another format after some
    other file was read in the same process.
    """
    Image.preinit()
    Image.init()


def _pillow_pixel_limit(max_pixels: int | None) -> None:
    """Set Pillow's own bomb check, an error above twice MAX_IMAGE_PIXELS (None: off)."""
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else (max_pixels + 1) // 2


def _describe(exc: BaseException, path: str) -> str:
    if isinstance(exc, ImageError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    if "Ghostscript" in text:
        return (
            "needs Ghostscript: EPS images are rendered by the 'gs' program, which is not"
            " installed here"
        )
    if text.startswith("cannot find loader for this"):
        kind = text.removeprefix("cannot find loader for this").split()[0]
        return (
            f"unsupported format: {kind} is recognised, but Pillow cannot decode it on this"
            " machine (no handler installed)"
        )
    if isinstance(exc, NotImplementedError):
        return f"unsupported image feature: {text}"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return "broken symbolic link"
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        return f"cannot read file: {exc.strerror}"  # the system's error, not the image's
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return f"corrupt or truncated image: {text}"
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class Decoded:
    """An image ready for the model: HxWx3 uint8 pixels, its upright size, and what Pillow
    warned about while decoding it."""

    pixels: np.ndarray
    width: int
    height: int
    warnings: tuple[str, ...] = ()
    format: str | None = None  # Pillow's name of the file format: JPEG, PNG, ...


@dataclass(frozen=True)
class ImageStats:
    """What an image looked like, for input-drift monitoring; from the pixels the model gets
    (every 4th row and column: about 3,000 pixels, tens of microseconds)."""

    format: str | None
    brightness: float  # mean luma, 0-1 (ITU-R 601 weights)
    contrast: float  # standard deviation of luma, 0-1
    saturation: float  # mean chroma (max - min of R, G, B), 0-1


def image_stats(decoded: Decoded) -> ImageStats:
    """Elementwise numpy only (a BLAS call costs more than the sum here): ~45 us an image."""
    sample = decoded.pixels[::4, ::4]
    r, g, b = (sample[:, :, i].astype(np.float32) for i in range(3))
    luma = r * 0.299 + g * 0.587 + b * 0.114
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return ImageStats(
        decoded.format,
        float(luma.mean()) / 255,
        float(luma.std()) / 255,
        float(chroma.mean()) / 255,
    )


def load_image(
    path: str,
    config: PreprocessConfig,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_jpeg: bool = True,
    data: bytes | None = None,
) -> Decoded:
    """Decode, orient, convert, resize and crop one file (or, given `data`, the bytes read from
    the object `path` names); raises ImageError with a reason."""
    init_pillow()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Pillow warns from half its limit on; the limit that counts is --max-pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            decoded = _load_image(
                path, config, max_pixels=max_pixels, fast_jpeg=fast_jpeg, data=data
            )
        if caught:
            messages = tuple(dict.fromkeys(str(w.message) for w in caught))
            decoded = replace(decoded, warnings=messages)
        return decoded
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except Exception as exc:  # any decoder failure is this image's problem, not the job's
        raise ImageError(_describe(exc, path)) from exc


def _load_image(
    path: str, config: PreprocessConfig, *, max_pixels: int, fast_jpeg: bool, data: bytes | None
) -> Decoded:
    if data is None:
        info = os.stat(path)  # follows symlinks; a broken one raises FileNotFoundError
        if stat.S_ISDIR(info.st_mode):
            raise ImageError("is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the worker forever
            raise ImageError("not a regular file")
    if (len(data) if data is not None else info.st_size) == 0:
        raise ImageError("empty file (0 bytes)")
    _pillow_pixel_limit(None)  # the file's own size is checked here, with a clearer reason
    with Image.open(path if data is None else io.BytesIO(data)) as image:  # the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"decompression bomb: {width}x{height} = {width * height} pixels is more than"
                f" the limit of {max_pixels} (--max-pixels)"
            )
        _pillow_pixel_limit(max_pixels)  # Pillow's check guards images nested in this one
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if config.exif_orientation else 1
        # OpenCV's filters sample the full-size pixels: a draft decode would smooth them first.
        if fast_jpeg and image.format == "JPEG" and not is_cv2(config.interpolation):
            upright = (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)
            target = _draft_target(config, *upright)
            image.draft(None, (target, target))
        before = image.size
        image.load()  # decode now: the file closes when this block ends
        # In place: a copy of an upright image costs ~5 ms for a 1080p PNG, 7% of its decode.
        if config.exif_orientation:
            ImageOps.exif_transpose(image, in_place=True)
        # Some decoders (libtiff) turn the image upright themselves and report the upright
        # size in the header: only a turn made here swaps the header's sides.
        if image.size != before and image.size == before[::-1]:
            width, height = height, width
        rgb = to_rgb(image)
        kind = image.format
    pixels = resize_and_crop(rgb, config)
    return Decoded(pixels=pixels, width=width, height=height, format=kind)


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
        crop_h, crop_w = _pair(config.crop_size)
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
    resample = INTERPOLATIONS[interpolation]
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
        out = np.empty((height, width, 3), dtype=np.uint8)
        out[:] = np.asarray(config.pad_value, dtype=np.uint8)
        left, top = _pad_start(width - size[0], config), _pad_start(height - size[1], config)
        out[top : top + size[1], left : left + size[0]] = _resized(rgb, size, config.interpolation)
        return out
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
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = np.asarray(config.pad_value, dtype=np.uint8)
    left = _pad_start(width - new_w, config)
    out[:, left : left + new_w] = _resized(rgb, (new_w, height), config.interpolation)
    return out


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


def _draft_target(config: PreprocessConfig, width: int, height: int) -> int:
    """Smallest side length the JPEG draft decode must keep so that resize never upsamples."""
    out_w, out_h = _resized_size(width, height, config)
    return max(out_w, out_h) if not isinstance(config.resize_size, int) else min(out_w, out_h)
