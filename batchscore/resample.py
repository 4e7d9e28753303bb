"""OpenCV's `cv2.resize`, in numpy: for models trained on images that OpenCV resized.

Pillow filters over the whole footprint of each output pixel when it shrinks an image
(antialiasing); OpenCV's INTER_LINEAR, INTER_CUBIC and INTER_LANCZOS4 sample a fixed 2, 4 or 8
source pixels around the mapped point, however far the image is shrunk. A model trained on
OpenCV's pixels sees the difference (a text-direction classifier's probability moved by 0.23).

Same mapping as OpenCV: output pixel `d` samples source coordinate `(d + 0.5) * scale - 0.5`,
edges replicated, kernels normalised to sum 1. OpenCV rounds its weights to 11-bit fixed point
for 8-bit images, so a pixel may differ from it by 1 (the tests hold it to that).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Kernel = Callable[[np.ndarray], np.ndarray]
_CUBIC_A = -0.75  # OpenCV's cubic coefficient (Pillow and torchvision use -0.5)


def _linear(distance: np.ndarray) -> np.ndarray:
    weights: np.ndarray = np.maximum(0.0, 1.0 - np.abs(distance))
    return weights


def _cubic(distance: np.ndarray) -> np.ndarray:
    x = np.abs(distance)
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _lanczos4(distance: np.ndarray) -> np.ndarray:
    x = np.asarray(distance, dtype=np.float64)
    return np.where(np.abs(x) < 4, np.sinc(x) * np.sinc(x / 4), 0.0)


# name: (taps, kernel); the taps start at floor(source) - (taps / 2 - 1)
KERNELS: dict[str, tuple[int, Kernel]] = {
    "cv2-linear": (2, _linear),
    "cv2-cubic": (4, _cubic),
    "cv2-lanczos4": (8, _lanczos4),
}


def cv2_resize(
    pixels: np.ndarray,
    size: tuple[int, int],
    interpolation: str,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """HxWx3 uint8 `pixels` resized to `size` (width, height) as `cv2.resize` would; only the
    part `window` (left, top, right, bottom, in output pixels) is computed when given."""
    width, height = size
    left, top, right, bottom = window or (0, 0, width, height)
    taps, kernel = KERNELS[interpolation]
    rows = _weights(pixels.shape[0], height, (top, bottom), taps, kernel)
    columns = _weights(pixels.shape[1], width, (left, right), taps, kernel)
    mixed = _apply(_apply(pixels, rows, 0), columns, 1)
    out: np.ndarray = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def _weights(
    source: int, target: int, span: tuple[int, int], taps: int, kernel: Kernel
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each outputs x taps: the source pixels that each output pixel in
    `span` (start, end) along one axis mixes, and how much of each."""
    scale = source / target
    centres = (np.arange(*span, dtype=np.float64) + 0.5) * scale - 0.5
    first = np.floor(centres)
    offsets = np.arange(taps) - (taps // 2 - 1)
    weights = kernel(centres[:, None] - (first[:, None] + offsets))
    weights /= weights.sum(axis=1, keepdims=True)
    indices = np.clip(first[:, None] + offsets, 0, source - 1).astype(np.intp)
    return indices, weights.astype(np.float32)


def _apply(values: np.ndarray, mix: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """Mix along `axis`, one tap at a time: memory stays at one output-sized array (a 12 MP
    photo is never turned into floats whole)."""
    indices, weights = mix
    shape = [1] * values.ndim
    shape[axis] = len(weights)
    out: np.ndarray | None = None
    for tap in range(indices.shape[1]):
        part = np.take(values, indices[:, tap], axis=axis) * weights[:, tap].reshape(shape)
        out = part if out is None else out + part
    assert out is not None
    return out


def is_cv2(interpolation: str) -> bool:
    return interpolation in KERNELS
