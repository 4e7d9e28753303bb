"""What a run adds up to: counts gathered while rows stream past, and the one-line summary.

`RunStats.add` reads only `STATS_COLUMNS` of each written batch (an embedding head's rows have
no predictions), so an engine that scores elsewhere (Dask) sends back just those columns.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batchscore.output import STATUS_OK, STATUS_UNAVAILABLE

STATS_COLUMNS = ("status", "error", "pred_label", "pred_prob")
LOW_CONFIDENCE = 0.5  # top-1 probability below this counts as low-confidence (drift signal)


_MANIFEST_ROW = re.compile(r"^[^:]* (?:line|row) \d+: ")


@dataclass
class RunStats:
    """Counts gathered while streaming; everything the summary needs, nothing per row."""

    n_ok: int = 0
    n_errors: int = 0
    n_unavailable: int = 0  # of the errors, those the store failed: tried again by every run
    error_reasons: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    top1_prob_sum: float = 0.0
    n_low_confidence: int = 0
    n_predicted: int = 0  # ok rows with a top-1 probability (an embedding's have none)

    @property
    def n_images(self) -> int:
        return self.n_ok + self.n_errors

    def add(self, batch: pa.RecordBatch) -> None:
        """Count a written batch; reads `STATS_COLUMNS` and nothing else."""
        batch = batch.select(stats_columns(batch.schema.names))
        status = batch.column("status").to_numpy(zero_copy_only=False)
        ok = status == STATUS_OK
        self.n_ok += int(ok.sum())
        self.n_errors += int((~ok).sum())
        self.n_unavailable += int((status == STATUS_UNAVAILABLE).sum())
        for reason in batch.column("error").drop_null().to_pylist():
            self.error_reasons[reason_kind(reason)] += 1
        if ok.any() and "pred_label" in batch.schema.names:  # an embedding has no classes
            labels = batch.column("pred_label").drop_null().to_pylist()
            self.classes.update(labels)
            probs = batch.column("pred_prob").drop_null().to_numpy()
            self.n_predicted += len(probs)
            self.top1_prob_sum += float(probs.sum())
            self.n_low_confidence += int((probs < LOW_CONFIDENCE).sum())

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "n_ok": self.n_ok,
            "n_errors": self.n_errors,
            "n_unavailable": self.n_unavailable,
            "error_reasons": dict(self.error_reasons.most_common()),
            "mean_top1_prob": self.top1_prob_sum / self.n_predicted if self.n_predicted else None,
            "low_confidence_share": (
                self.n_low_confidence / self.n_predicted if self.n_predicted else None
            ),
            "low_confidence_threshold": LOW_CONFIDENCE,
            "class_distribution": dict(self.classes.most_common()),
        }


def stats_columns(names: list[str]) -> list[str]:
    """The `STATS_COLUMNS` among `names`: an embedding head writes no predictions."""
    return [name for name in STATS_COLUMNS if name in names]


def reason_kind(reason: str) -> str:
    """Group error reasons by kind: 'corrupt or truncated image: <details>' -> its prefix;
    a manifest row's reason is grouped without the row it names ('list.csv line 7: ...')."""
    return _MANIFEST_ROW.sub("", reason, count=1).split(":", 1)[0]


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    model_sha256: str
    stats: dict[str, Any]
    elapsed_s: float
    warnings: tuple[str, ...] = ()  # what the run assumed: also in the output's metadata

    @property
    def images_per_s(self) -> float:
        return self.stats["n_images"] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        s = self.stats
        skipped = s.get("n_skipped", 0)
        if s["n_images"] == 0:
            noun = "image" if skipped == 1 else "images"
            return f"nothing new to score ({skipped} {noun} already scored) -> {self.output}"
        by = s.get("skipped_by", "this model")
        already = f" ({skipped} already scored by {by}, skipped)" if skipped else ""
        noun = "image" if s["n_images"] == 1 else "images"
        unavailable = s.get("n_unavailable", 0)
        store = f" ({unavailable} the store's, tried again next run)" if unavailable else ""
        return (
            f"{s['n_images']} {noun}: {s['n_ok']} ok, {s['n_errors']} errors{store}{already},"
            f" {self.images_per_s:.1f} images/s, {self.elapsed_s:.1f} s -> {self.output}"
        )
