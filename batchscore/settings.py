"""What a run can be told, and the defaults: plain data that imports nothing heavy.

The CLI builds its options from this module alone, so `batchscore --help` starts without
loading ONNX Runtime, NumPy, Pillow or Arrow. Library users build the same dataclasses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("local", "dask")  # batchscore.engines.<name>
FINGERPRINTS = ("size-mtime", "sha256")  # see batchscore.incremental
# Pillow's filters, then OpenCV's (batchscore.resample: no antialiasing, as cv2.resize)
INTERPOLATIONS = ("bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "cv2-linear",
                  "cv2-cubic", "cv2-lanczos4")  # fmt: skip
OUTPUT_KINDS = ("logits", "probabilities")
# What a model's output is (docs/own-models.md, "Heads"): one class of many, any number of
# classes at once, one number for two classes, or a vector with no classes.
HEADS = ("softmax", "multi-label", "binary", "embedding")
DEFAULT_MIN_COSINE = 0.99  # batchscore diff: two vectors of an image less alike have changed
DEFAULT_THRESHOLD = 0.5  # a multi-label class is present at or above this probability
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # batchscore quantize
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default decompression-bomb error threshold
DEFAULT_PART_ROWS = 10_000
DEFAULT_PART_SECONDS = 60.0
DEFAULT_LEASE_S = 300.0  # a dataset in a bucket: a dead run's lock expires this long after
BASELINE_PREFIX = "baseline_"  # column prefix of the baseline model scored beside the main one


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PipelineOptions:
    """How to run: `workers=0` scores in this process (no pool; handy for debugging)."""

    workers: int = field(default_factory=default_workers)
    batch_size: int = 8
    top_k: int = 5
    fast_jpeg: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads_per_worker: int = 1


@dataclass(frozen=True)
class ScoreSettings:
    """Everything a scoring run can be told; defaults are what `batchscore score` uses."""

    model: str | Path | None = None
    baseline_model: str | Path | None = None  # scored on the same decoded images
    labelled_folders: bool = False  # read folders in ImageFolder layout (label = sub-folder)
    preprocess_overrides: Mapping[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    providers: Sequence[str] = ()
    labels: str | Path | None = None  # class-name file (else found beside the model)
    output_name: str | None = None  # which model output holds the class scores (else the first)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    keep_probs: bool = True
    max_error_rate: float | None = None
    progress: bool = False
    run_id: str | None = None
    incremental: bool = False  # dataset output: also rescore images whose content changed
    fingerprint: str = "size-mtime"
    retry_errors: bool = True  # dataset output: images that failed before are tried again
    any_model: bool = False  # dataset output: rows of any model count as done, not only this one's
    wait_lock: bool = False
    engine: str = "local"  # "local" process pool, or "dask" (optional extra)
    dask_address: str | None = None  # None: start a LocalCluster sized to this machine
    part_rows: int = DEFAULT_PART_ROWS
    part_seconds: float = DEFAULT_PART_SECONDS
    lock_lease_s: float = DEFAULT_LEASE_S  # a dataset in a bucket: see batchscore.lease
    # passed to the object store's fsspec backend (endpoint_url=..., anon=true...): URLs only
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize and evaluate. Counts are upper bounds; held-out images never calibrate."""

    calibration_count: int = 200
    holdout_count: int = 200  # used only when no separate held-out source is given
    keep_first_conv: bool = False
    keep_classifier: bool = False
    exclude_nodes: tuple[str, ...] = ()
    method: str = "minmax"
    seed: int = 0
    speed_repeats: int = 20


@dataclass(frozen=True)
class MonitorSettings:
    """What `batchscore monitor` compares and when it alerts (defaults: docs/monitor.md)."""

    run: str | None = None  # the monitored window: one run, one date, or the last N days;
    date: str | None = None  # by default the newest complete run of the dataset
    since: str | None = None
    allow_model_change: bool = False
    # A signal alerts when its change is both clear against the night's noise (Holm-adjusted
    # p-value below `alpha`, the share of unchanged nights allowed to alert) and larger than
    # its floor: max_js, max_ks, and the rises and drop below.
    alpha: float = 0.01
    max_js: float = 0.1
    max_ks: float = 0.1
    low_confidence: float = 0.5
    max_low_confidence_rise: float = 0.1
    max_error_rate_rise: float = 0.05
    max_accuracy_drop: float = 0.05  # estimated without labels, against the reference's
    max_label_rate_change: float = 0.05  # a multi-label model: one label's positive rate
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # for bucket URLs
