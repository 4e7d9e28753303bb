"""Shared fixtures: real image files and tiny real ONNX models in tmp_path."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.models import color_model

pytest_plugins = ["tests.object_store"]  # the loopback S3 server and bucket fixtures

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "artifacts" / "samples"


def noisy(color: tuple[int, int, int], size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A solid colour with mild noise, so encoders and resizers do real work."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(np.array(color, dtype=np.int16), (size[1], size[0], 3))
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture
def color_model_dir(tmp_path: Path) -> Path:
    return color_model(tmp_path / "color_model")


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Write coloured images; returns {absolute path: true colour name}."""

    def make(
        folder: str = "images", colors: list[str] | None = None, ext: str = "png"
    ) -> dict[str, str]:
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        truth = {}
        for i, name in enumerate(colors or ["red", "green", "blue"]):
            path = root / f"img_{i:03d}_{name}.{ext}"
            noisy(COLORS[name], (40 + i, 30), seed=i).save(path)
            truth[str(path)] = name
        return truth

    return make


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A copy of the bundled sample photos."""
    target = tmp_path / "samples"
    shutil.copytree(SAMPLES, target)
    return target
