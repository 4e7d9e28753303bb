"""The cv2-* interpolations against OpenCV itself: same pixels to within 1 (OpenCV rounds its
weights to fixed point), from a resized photo down to a few pixels, shrunk and enlarged."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchscore import resize
from batchscore.preprocess import load_image
from batchscore.preprocess_config import resolve_preprocess
from batchscore.resample import KERNELS, cv2_resize
from tests.conftest import SAMPLES

FLAGS = {"cv2-linear": cv2.INTER_LINEAR, "cv2-cubic": cv2.INTER_CUBIC,
         "cv2-lanczos4": cv2.INTER_LANCZOS4}  # fmt: skip
assert set(FLAGS) == set(KERNELS)


@settings(max_examples=60, deadline=None)
@given(
    source=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    target=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    name=st.sampled_from(sorted(FLAGS)),
    seed=st.integers(0, 2**16),
)
def test_cv2_resize_matches_opencv(
    source: tuple[int, int], target: tuple[int, int], name: str, seed: int
) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (*source, 3), dtype=np.uint8)
    expected = cv2.resize(pixels, target, interpolation=FLAGS[name])
    got = cv2_resize(pixels, target, name)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_a_photo_shrunk_as_opencv_shrinks_it_not_as_pillow_does(name: str) -> None:
    pixels = np.asarray(Image.open(SAMPLES / "rocket.jpg").convert("RGB"))
    expected = cv2.resize(pixels, (96, 64), interpolation=FLAGS[name]).astype(int)
    assert np.abs(cv2_resize(pixels, (96, 64), name) - expected).max() <= 1
    pillow = np.asarray(Image.fromarray(pixels).resize((96, 64), Image.Resampling.BILINEAR))
    assert np.abs(pillow - expected).mean() > 2  # antialiasing: the reason this module exists


def test_a_config_with_cv2_interpolation_gets_opencvs_pixels() -> None:
    """From the file to the pixels: resize 64, crop 56, cv2-linear; the JPEG is decoded at full
    size even on the fast JPEG path (a draft decode would smooth before OpenCV's filter)."""
    config = resolve_preprocess({"resize_size": 64, "crop_size": 56, "interpolation": "cv2-linear"})
    photo = str(SAMPLES / "coffee.jpg")
    fast = load_image(photo, config, fast_jpeg=True).pixels
    exact = load_image(photo, config, fast_jpeg=False).pixels
    np.testing.assert_array_equal(fast, exact)
    full = np.asarray(Image.open(photo).convert("RGB"))
    height, width = full.shape[:2]
    resized = cv2.resize(full, (int(64 * width / height), 64), interpolation=cv2.INTER_LINEAR)
    left = round((resized.shape[1] - 56) / 2)
    assert np.abs(exact.astype(int) - resized[4:60, left : left + 56]).max() <= 1


@pytest.mark.parametrize("name", ["bilinear", "cv2-cubic"])
def test_only_the_crop_window_is_resampled_for_huge_images(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Past MAX_INTERMEDIATE_PIXELS the window the crop keeps is all that is computed, with
    the same pixels as resizing the whole image and cropping."""
    config = resolve_preprocess({"resize_size": 48, "crop_size": 40, "interpolation": name})
    image = Image.open(SAMPLES / "cat.jpg").convert("RGB")
    whole = resize.resize_and_crop(image, config)
    monkeypatch.setattr(resize, "MAX_INTERMEDIATE_PIXELS", 100)
    windowed = resize.resize_and_crop(image, config)
    assert np.abs(windowed.astype(int) - whole).max() <= (1 if name == "bilinear" else 0)
