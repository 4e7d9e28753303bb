"""Write the calibration and held-out photo folders that artifacts/model_int8.onnx was made from.

Needs scikit-image (its bundled `skimage.data` photos; not a batchscore dependency), so run it
with a Python that has it, outside the repository:

    python tests/benchmarks/calibration_set.py /tmp/calib \\
        --sklearn-images "$(python -c 'import sklearn.datasets, os; \\
            print(os.path.dirname(sklearn.datasets.__file__))')/images"

Calibration: the four artifacts/samples photos and six other skimage photos. Held-out: ten
different photos (eight from skimage, scikit-learn's china.jpg and flower.jpg), so that no
held-out image shares a photo with the calibration set. Each photo gives several variants: the
whole photo once, then random crops (30-100% of the area, aspect 3:4..4:3), each flipped with
probability 1/2; all saved as JPEG quality 92. Seeded: the same folders every time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "artifacts" / "samples"
CALIBRATION_VARIANTS = 16
HOLDOUT_VARIANTS = 24
SEED = 2024

Loader = Callable[[], Image.Image]


def photos(sklearn_images: Path | None) -> tuple[dict[str, Loader], dict[str, Loader]]:
    from skimage import data  # only this script needs scikit-image

    def sk(name: str) -> Loader:
        return lambda: Image.fromarray(getattr(data, name)())

    def file(path: Path) -> Loader:
        return lambda: Image.open(path)

    calibration = {p.stem: file(p) for p in sorted(SAMPLES.glob("*.jpg"))}
    for name in ("astronaut", "coins", "hubble_deep_field", "brick", "grass", "page"):
        calibration[name] = sk(name)
    holdout: dict[str, Loader] = {
        "motorcycle": lambda: Image.fromarray(data.stereo_motorcycle()[0]),
        "horse": lambda: Image.fromarray((~data.horse()).astype(np.uint8) * 255),
    }
    for name in ("clock", "moon", "retina", "immunohistochemistry", "gravel", "text"):
        holdout[name] = sk(name)
    if sklearn_images is not None:
        for name in ("china", "flower"):
            holdout[name] = file(sklearn_images / f"{name}.jpg")
    return calibration, holdout


def write_variants(
    name: str, image: Image.Image, folder: Path, count: int, rng: np.random.Generator
) -> None:
    image = image.convert("RGB")
    width, height = image.size
    for i in range(count):
        area = rng.uniform(0.3, 1.0) * width * height
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        variant = image if i == 0 else image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        variant.save(folder / f"{name}_{i:02d}.jpg", quality=92)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("root", type=Path, help="writes ROOT/calibration and ROOT/holdout")
    parser.add_argument("--sklearn-images", type=Path, help="scikit-learn's datasets/images")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    calibration, holdout = photos(args.sklearn_images)
    for split, chosen, count in (
        ("calibration", calibration, CALIBRATION_VARIANTS),
        ("holdout", holdout, HOLDOUT_VARIANTS),
    ):
        folder = args.root / split
        folder.mkdir(parents=True, exist_ok=True)
        for name, load in chosen.items():
            write_variants(name, load(), folder, count, rng)
        print(f"{folder}: {len(chosen)} photos, {len(chosen) * count} images")


if __name__ == "__main__":
    main()
