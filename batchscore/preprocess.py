"""How one image file becomes one model input: decode, fix orientation and mode, resize and
crop or pad (`batchscore.resize`), normalise.

The semantics are torchvision's eval transform on a PIL image
(`Resize` -> `CenterCrop` -> `ToTensor` -> `Normalize`), reproduced without torchvision so
that a model trained with it sees the same tensor here (to within 1/255 per value). The one
deliberate shortcut is the JPEG draft decode: libjpeg scales the image down by 1/2, 1/4 or 1/8
while decoding, to no less than twice the resized size, which is several times faster on
camera-sized photos and changes pixels by 0.1-0.3 levels on average; `fast_jpeg=False` turns
it off.

Hostile files are this module's daily bread. Every decode starts from the same Pillow state
(all plugins registered in one fixed order, so what a file opens as never depends on what was
opened before). `--max-pixels` is the one pixel limit: Pillow's own is set to match it, so that
it also guards images nested inside a file (an ICNS icon's PNG, say). Pillow's warnings about a
file are returned with it instead of going to the terminal.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchscore.preprocess_config import PreprocessConfig
from batchscore.resize import draft_allowed, draft_target, resize_and_crop
from batchscore.settings import DEFAULT_MAX_PIXELS

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as viewers do
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(Exception):
    """An image that cannot be scored; its message becomes the row's `error` reason."""


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
        if fast_jpeg and image.format == "JPEG" and draft_allowed(config.interpolation):
            upright = (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)
            target = draft_target(config, *upright)
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
