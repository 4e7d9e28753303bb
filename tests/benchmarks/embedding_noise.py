"""How often `batchscore monitor` alerts on an encoder's unchanged nights, and how often it
catches a shift: the embedding signals judged by the monitor's own code, on simulated vectors.

Not a test (tests/test_heads.py runs a small seeded share of it). An encoder's vectors are a
mixture of 8 clusters in 64 dimensions around a shared mean (as CLIP's vectors share one); a
fresh 20,000-row reference is drawn each night. A shift gives one cluster more of the night
(its share from 12.5% to 30%, or to 42%).

    python -m tests.benchmarks.embedding_noise --nights 200 --shift-nights 50
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from batchscore.monitor import Side, _signals
from batchscore.settings import MonitorSettings

SIZE, CLUSTERS, REFERENCE_ROWS = 64, 8, 20_000
SHIFTS = {"one cluster 12.5% -> 30%": 0.25, "one cluster 12.5% -> 42%": 0.5}


def vectors(n: int, rng: np.random.Generator, shift: float = 0.0) -> pa.RecordBatch:
    """`n` rows of an encoder's output, as a run writes them (the columns the monitor reads)."""
    centres = np.random.default_rng(7).standard_normal((CLUSTERS, SIZE)) * 0.6 + 1.0
    shares = np.full(CLUSTERS, 1 / CLUSTERS)
    shares[0] += shift
    which = rng.choice(CLUSTERS, n, p=shares / shares.sum())
    drawn = (centres[which] + rng.standard_normal((n, SIZE))).astype(np.float32)
    return pa.RecordBatch.from_pydict(
        {
            "status": ["ok"] * n,
            "model_sha256": ["encoder"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(drawn.reshape(-1)), SIZE),
        }
    )


def night_alerts(n: int, seed: int, shift: float = 0.0) -> set[str]:
    """The signals that alert on one night of `n` rows against a fresh reference."""
    rng = np.random.default_rng(seed)
    base, current = Side(), Side()
    base.add(vectors(REFERENCE_ROWS, rng))
    current.add(vectors(n, rng, shift))
    return {s.name for s in _signals(base, current, MonitorSettings()) if s.alert}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=200)
    parser.add_argument("--shift-nights", type=int, default=50)
    args = parser.parse_args(argv)
    for n in (200, 2_000, 20_000):
        alarms = sum(bool(night_alerts(n, seed)) for seed in range(args.nights))
        caught = {
            name: sum(
                any(a.startswith("embedding drift") for a in night_alerts(n, 10_000 + s, shift))
                for s in range(args.shift_nights)
            )
            for name, shift in SHIFTS.items()
        }
        shown = ", ".join(f"{name}: {k} of {args.shift_nights}" for name, k in caught.items())
        print(f"{n} rows: unchanged nights that alerted {alarms} of {args.nights}; caught {shown}")


if __name__ == "__main__":
    main()
