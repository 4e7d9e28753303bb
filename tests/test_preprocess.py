"""Preprocessing: torchvision eval semantics, modes, orientation, bombs, config precedence."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchscore.errors import ModelError
from batchscore.preprocess import ImageError, load_image, normalization_lut
from batchscore.preprocess_config import PreprocessConfig, resolve_preprocess
from batchscore.resize import center_crop, resized_size
from tests.conftest import REPO, SAMPLES, noisy


def reference_tensor(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """torchvision Resize -> CenterCrop -> ToTensor -> Normalize, written out independently."""
    width, height = image.size
    size = config.resize_size
    if isinstance(size, int):
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
    else:
        new = (size[1], size[0])
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    image = image.resize(new, resample[config.interpolation])
    if config.crop_size is not None:
        crop_h, crop_w = (
            (config.crop_size, config.crop_size)
            if isinstance(config.crop_size, int)
            else config.crop_size
        )
        top = round((image.height - crop_h) / 2.0)
        left = round((image.width - crop_w) / 2.0)
        image = image.crop((left, top, left + crop_w, top + crop_h))
    tensor = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None, None]
    return (tensor - mean) / std


def normalised(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    lut = normalization_lut(config)
    return np.stack([lut[c][pixels[:, :, c]] for c in range(3)])


CONFIGS = [
    resolve_preprocess({"resize_size": 256, "crop_size": 224}),
    resolve_preprocess({"resize_size": [320, 320]}),
    resolve_preprocess({"resize_size": 64, "crop_size": [48, 40], "interpolation": "bicubic"}),
    resolve_preprocess({"resize_size": [30, 50], "interpolation": "nearest"}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.resize_size}-{c.crop_size}")
@pytest.mark.parametrize("size", [(640, 480), (333, 517), (224, 224)])
def test_matches_torchvision_semantics_on_png(
    tmp_path: Path, config: PreprocessConfig, size: tuple[int, int]
) -> None:
    image = noisy((120, 90, 200), size, seed=3)
    path = tmp_path / "x.png"
    image.save(path)
    decoded = load_image(str(path), config)
    got = normalised(decoded.pixels, config)
    want = reference_tensor(image, config)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    assert (decoded.width, decoded.height) == size


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    resize=st.integers(1, 300),
)
def test_resize_keeps_aspect_like_torchvision(width: int, height: int, resize: int) -> None:
    new_w, new_h = resized_size(width, height, resize)
    assert min(new_w, new_h) == resize
    long_in, short_in = max(width, height), min(width, height)
    assert max(new_w, new_h) == int(resize * long_in / short_in)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    crop_h=st.integers(1, 40),
    crop_w=st.integers(1, 40),
)
def test_center_crop_pads_like_torchvision(
    height: int, width: int, crop_h: int, crop_w: int
) -> None:
    pixels = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3) % 251 + 1
    out = center_crop(pixels.astype(np.uint8), (crop_h, crop_w))
    assert out.shape == (crop_h, crop_w, 3)
    # torchvision pads (left, top) = floor(diff / 2) before cropping at round((h - ch) / 2).
    pad_top = (crop_h - height) // 2 if crop_h > height else 0
    pad_left = (crop_w - width) // 2 if crop_w > width else 0
    padded_h, padded_w = max(height, crop_h), max(width, crop_w)
    top = round((padded_h - crop_h) / 2.0) - pad_top
    left = round((padded_w - crop_w) / 2.0) - pad_left
    for y, x in [(0, 0), (crop_h - 1, crop_w - 1), (crop_h // 2, crop_w // 2)]:
        sy, sx = top + y, left + x
        inside = 0 <= sy < height and 0 <= sx < width
        expected = pixels[sy, sx] if inside else np.zeros(3)
        assert np.array_equal(out[y, x], expected)


PHOTOS = [*sorted(SAMPLES.glob("*.jpg")), *sorted((REPO / "tests/exported/images").glob("*.jpg"))]


@pytest.mark.parametrize(
    "config",
    [{"resize_size": 256, "crop_size": 224}, {"resize_size": 109, "crop_size": 96},
     {"resize_size": [64, 64], "interpolation": "bicubic"}],
)  # fmt: skip
def test_fast_jpeg_path_is_close_to_exact(tmp_path: Path, config: dict[str, object]) -> None:
    """The draft decode keeps twice the resized size: 0.1-0.4 levels off on average here, 1.03
    on the worst photo (before, decoding down to the resized size itself: up to 3.3)."""
    image = noisy((150, 120, 90), (2000, 1500), seed=1).resize((2000, 1500))
    image.save(tmp_path / "big.jpg", quality=90)
    resolved = resolve_preprocess(config)
    errors = []
    for path in [*PHOTOS, tmp_path / "big.jpg"]:
        fast = load_image(str(path), resolved, fast_jpeg=True).pixels.astype(np.float64)
        exact = load_image(str(path), resolved, fast_jpeg=False).pixels.astype(np.float64)
        assert fast.shape == exact.shape
        errors.append(np.abs(fast - exact).mean())
    assert np.mean(errors) < 0.5 and max(errors) < 1.2, errors


@pytest.mark.parametrize("interpolation", ["nearest", "cv2-linear"])
def test_filters_that_pick_source_pixels_get_a_full_jpeg_decode(interpolation: str) -> None:
    """A draft decode moved nearest's pixels by 5 levels on average (up to 166)."""
    config = resolve_preprocess({"resize_size": [64, 64], "interpolation": interpolation})
    for path in PHOTOS:
        fast = load_image(str(path), config, fast_jpeg=True).pixels
        np.testing.assert_array_equal(fast, load_image(str(path), config, fast_jpeg=False).pixels)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # A 60x40 image whose left half is red, stored with orientation 6 (rotate 90 degrees CW).
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    config = resolve_preprocess({"resize_size": [60, 40]})
    decoded = load_image(str(path), config)
    assert (decoded.width, decoded.height) == (40, 60)
    top, bottom = decoded.pixels[5, 20], decoded.pixels[-5, 20]
    assert top[0] > 200 and top[2] < 60  # red ends up on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (20, 20), 100), (100, 100, 100)),
        ("LA", lambda: Image.new("LA", (20, 20), (100, 0)), (255, 255, 255)),
        ("RGBA", lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 128)), (255, 127, 127)),
        ("CMYK", lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)), (255, 0, 0)),
        ("1", lambda: Image.new("1", (20, 20), 1), (255, 255, 255)),
        (
            "I;16",
            lambda: Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)),
            (255, 255, 255),
        ),
        (
            "I;16-mid",
            lambda: Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)),
            (128, 128, 128),
        ),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, make: object, expected: tuple) -> None:
    image = make()  # type: ignore[operator]
    fmt, ext = ("TIFF", "tif") if image.mode in ("CMYK",) else ("PNG", "png")
    path = tmp_path / f"m.{ext}"
    image.save(path, fmt)
    pixels = load_image(str(path), resolve_preprocess({"resize_size": [20, 20]})).pixels
    assert pixels.shape == (20, 20, 3)
    assert np.abs(pixels[10, 10].astype(int) - np.array(expected)).max() <= 1


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 5, 10))
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    pixels = load_image(str(path), resolve_preprocess({"resize_size": [10, 10]})).pixels
    assert tuple(pixels[5, 2]) == (255, 0, 0)
    assert tuple(pixels[5, 8]) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    pixels = load_image(str(path), resolve_preprocess({"resize_size": [16, 16]})).pixels
    assert pixels[8, 8, 0] > 200 and pixels[8, 8, 2] < 50


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path, optimize=True)
    with pytest.raises(ImageError, match="decompression bomb: 3000x3000"):
        load_image(str(path), resolve_preprocess(), max_pixels=1_000_000)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a recognised image format"),
        (None, "corrupt or truncated image"),
    ],
)
def test_bad_files_raise_image_error_with_reason(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "bad.jpg"
    if content is None:
        content = _encode(noisy((1, 2, 3), (300, 200)), "JPEG")[:600]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(str(path), resolve_preprocess())


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        load_image(str(tmp_path / "nope.png"), resolve_preprocess())
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path / "dir.png"), resolve_preprocess())
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(str(tmp_path / "link.png"), resolve_preprocess())


def test_precedence_overrides_beat_model_config_beat_defaults() -> None:
    model = {"resize_size": 256, "crop_size": 224, "mean": [0.5, 0.5, 0.5]}
    config = resolve_preprocess({"crop_size": 200}, model)
    assert config.resize_size == 256
    assert config.crop_size == 200
    assert config.mean == (0.5, 0.5, 0.5)
    assert config.std == (0.229, 0.224, 0.225)  # default
    default = resolve_preprocess()
    assert default.resize_size == (320, 320)
    assert default.input_size == (320, 320)


@pytest.mark.parametrize(
    "bad",
    [
        {"interpolation": "cubic-ish"},
        {"mean": [0.5, 0.5]},
        {"std": [0.5, 0, 0.5]},
        {"resize_size": 256},
        {"resize_size": -3},
        {"colour": "yes"},
        {"output": "softmaxed"},
    ],
)
def test_bad_config_is_a_model_error(bad: dict[str, object]) -> None:
    with pytest.raises(ModelError):
        resolve_preprocess(None, bad)
