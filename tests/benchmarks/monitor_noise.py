"""How often does `batchscore monitor` alert on a night that did not change, and how often does
it catch one that did? Simulated nights, judged by the monitor's own code (`Side`, the signals,
Holm's correction); the figures in docs/monitor.md.

Not a test (tests/test_monitor.py runs a small seeded share of it). A model with 1,000 classes
predicts a Zipf mix of classes (exponent 1.1), each class with its own difficulty; its top-1
probabilities are calibrated, so a labelled row is right with the probability the model gave.
Rows carry what every run records: a status (1% errors), the file format (JPEG 85%, PNG 10%,
WebP 5%), brightness, contrast, saturation and the size of the image. Every night draws a fresh
reference of 20,000 rows, 2,000 of them labelled (a canary), and a window of N rows:

- unchanged: the same process again;
- darker: brightness x 0.6, contrast x 0.8, and the model 15% less sure of itself;
- two classes: half the night from two mid-ranked classes;
- 10% corrupt: 10% more error rows;
- format change: every file a PNG.

It also measures how often the interval of the accuracy estimated without labels covers the
night's true accuracy (known here), on unchanged nights.

    python -m tests.benchmarks.monitor_noise
    python -m tests.benchmarks.monitor_noise --nights 100 --shift-nights 50 --sizes 200 2000 20000
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchscore.monitor import Side, _signals
from batchscore.settings import MonitorSettings

CLASSES = 1_000
REFERENCE_ROWS = 20_000
REFERENCE_LABELLED = 2_000
FORMATS = (("JPEG", 0.85), ("PNG", 0.10), ("WEBP", 0.05))
SIZES_PX = ((1920, 1080), (1280, 720), (4032, 3024), (1080, 1080))
SIZE_SHARES = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class Process:
    """What one night's rows are drawn from."""

    class_shares: np.ndarray
    difficulty: np.ndarray  # per class, 0 (easy) .. 1 (hard)
    error_rate: float = 0.01
    brightness: float = 1.0
    contrast: float = 1.0
    sureness: float = 1.0  # the top-1 probabilities scaled by this
    formats: tuple[tuple[str, float], ...] = FORMATS


def unchanged_process(seed: int = 0) -> Process:
    rng = np.random.default_rng(seed)
    shares = 1 / np.arange(1, CLASSES + 1) ** 1.1
    return Process(shares / shares.sum(), rng.beta(2, 2, CLASSES))


SHIFTS: dict[str, Callable[[Process], Process]] = {
    "darker": lambda p: Process(
        p.class_shares, p.difficulty, brightness=0.6, contrast=0.8, sureness=0.85
    ),
    "two classes": lambda p: Process(
        0.5 * p.class_shares
        + 0.25 * (np.arange(CLASSES) == 40)
        + 0.25 * (np.arange(CLASSES) == 41),
        p.difficulty,
    ),
    "10% corrupt": lambda p: Process(p.class_shares, p.difficulty, error_rate=0.11),
    "format change": lambda p: Process(p.class_shares, p.difficulty, formats=(("PNG", 1.0),)),
}


def rows(process: Process, n: int, rng: np.random.Generator, labelled: int = 0) -> pa.RecordBatch:
    """`n` rows as a run writes them (the columns the monitor reads)."""
    classes = rng.choice(CLASSES, size=n, p=process.class_shares)
    hard = process.difficulty[classes]
    probs = np.clip(rng.beta(2 + 6 * (1 - hard), 2 + 2 * hard) * process.sureness, 1e-3, 1.0)
    correct = rng.random(n) < probs
    ok = rng.random(n) >= process.error_rate
    names, shares = zip(*process.formats, strict=True)
    size = rng.choice(len(SIZES_PX), size=n, p=SIZE_SHARES)
    known = np.arange(n) < labelled
    status = np.where(ok, "ok", "error")
    return pa.RecordBatch.from_pydict(
        {
            "status": status,
            "pred_label": pa.array([f"class_{c:04d}" for c in classes], mask=~ok),
            "pred_prob": pa.array(probs, mask=~ok),
            "model_sha256": ["model"] * n,
            "correct": pa.array(np.where(ok, correct, False), mask=~(known & ok)),
            "label": pa.array(["x"] * n, mask=~known),
            "format": rng.choice(names, size=n, p=shares),
            "brightness": rng.beta(5, 5, n) * process.brightness,
            "contrast": rng.beta(3, 8, n) * process.contrast,
            "saturation": rng.beta(3, 5, n),
            "width": np.array([SIZES_PX[i][0] for i in size]),
            "height": np.array([SIZES_PX[i][1] for i in size]),
        }
    )


def night(
    process: Process,
    shifted: Process,
    n: int,
    seed: int,
    settings: MonitorSettings,
    reference_rows: int = REFERENCE_ROWS,
) -> tuple[set[str], tuple[float, float, float] | None]:
    """The alerting signals of one night, and (low, high, truth) of the accuracy interval."""
    rng = np.random.default_rng(seed)
    base, current = Side(), Side()
    labelled = min(REFERENCE_LABELLED, reference_rows)
    base.add(rows(process, reference_rows, rng, labelled=labelled))
    window = rows(shifted, n, rng, labelled=n)  # labels the monitor ignores: the truth
    current.add(window.drop_columns(["correct", "label"]))
    signals = _signals(base, current, settings)
    alerts = {s.name for s in signals if s.alert}
    accuracy = next((s for s in signals if s.name == "estimated accuracy drop"), None)
    covered = None
    if accuracy is not None and accuracy.p_value is not None:
        truth = window.column("correct").drop_null().to_numpy(zero_copy_only=False).mean()
        low, high = accuracy.details["interval"]
        covered = (low, high, float(truth))
    return alerts, covered


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=100, help="unchanged nights per size")
    parser.add_argument("--shift-nights", type=int, default=50, help="nights per shift and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2_000, 20_000])
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=REFERENCE_ROWS,
        help=f"rows of each reference, at most {REFERENCE_LABELLED:,} of them labelled",
    )
    args = parser.parse_args(argv)
    settings = MonitorSettings()
    process = unchanged_process()
    started = time.perf_counter()
    labelled = min(REFERENCE_LABELLED, args.reference_rows)
    print(f"1,000 classes (Zipf 1.1); reference {args.reference_rows:,} rows, {labelled:,}")
    print(f"labelled, drawn afresh each night; false-alarm rate alpha = {settings.alpha:g}\n")
    print(
        "| night size | unchanged nights that alerted | what alerted"
        " | accuracy interval covered the truth |"
    )
    print("|---|---|---|---|")
    for n in args.sizes:
        alerted = 0
        signals: Counter[str] = Counter()
        covered = tried = 0
        for i in range(args.nights):
            alerts, interval = night(
                process, process, n, 1_000_000 * n + i, settings, args.reference_rows
            )
            alerted += bool(alerts)
            signals.update(alerts)
            if interval is not None:
                low, high, truth = interval
                tried += 1
                covered += low <= truth <= high
        said = ", ".join(f"{name} {k}" for name, k in signals.most_common()) or "-"
        print(
            f"| {n:,} | {alerted} of {args.nights} ({alerted / args.nights:.1%}) | {said} |"
            f" {covered} of {tried} ({covered / max(tried, 1):.0%}) |"
        )
    print("\n| shift | " + " | ".join(f"caught at {n:,}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name, shift in SHIFTS.items():
        caught = []
        for n in args.sizes:
            hits = sum(
                bool(
                    night(
                        process, shift(process), n, 2_000_000 * n + i, settings, args.reference_rows
                    )[0]
                )
                for i in range(args.shift_nights)
            )
            caught.append(f"{hits} of {args.shift_nights}")
        print(f"| {name} | " + " | ".join(caught) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
