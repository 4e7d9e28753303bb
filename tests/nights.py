"""Nights drawn from one augmentation recipe, for the monitor's tests and docs/monitor.md: each
night fresh random crops, mirrors, tilts, brightness and contrast of the sample photos. Two
nights with different seeds come from one distribution; neither is the other's photos again.

    python -m tests.nights FOLDER --per-photo 30 --seed 1
    python -m tests.nights FOLDER --per-photo 12 --seed 3 --brightness 0.12
    python -m tests.nights FOLDER --per-photo 48 --seed 5 --only cat
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

SAMPLES = Path(__file__).resolve().parent.parent / "artifacts" / "samples"


def augmented(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One draw of the recipe: a random crop of 60-100% of each side, a mirror half the time, a
    tilt of up to 10 degrees, brightness and contrast within 15%."""
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    picture = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        picture = ImageOps.mirror(picture)
    picture = picture.rotate(float(rng.uniform(-10, 10)))
    picture = ImageEnhance.Brightness(picture).enhance(float(rng.uniform(0.85, 1.15)))
    return ImageEnhance.Contrast(picture).enhance(float(rng.uniform(0.85, 1.15)))


def draw(
    folder: Path, per_photo: int, seed: int, brightness: float = 1.0, only: str | None = None
) -> list[Path]:
    """`per_photo` draws of each sample photo (or of the one named `only`), as JPEGs, darkened
    to `brightness` when asked (a planted shift)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in sorted(SAMPLES.glob("*.jpg")):
        if only is not None and sample.stem != only:
            continue
        photo = Image.open(sample).convert("RGB")
        for i in range(per_photo):
            picture = ImageEnhance.Brightness(augmented(photo, rng)).enhance(brightness)
            path = folder / f"{sample.stem}_{i:02d}.jpg"
            picture.save(path, quality=92)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-photo", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--brightness", type=float, default=1.0)
    parser.add_argument("--only", default=None, help="one sample photo, by name (e.g. cat)")
    args = parser.parse_args(argv)
    written = draw(args.folder, args.per_photo, args.seed, args.brightness, args.only)
    print(f"{len(written)} images in {args.folder}")


if __name__ == "__main__":
    main()
