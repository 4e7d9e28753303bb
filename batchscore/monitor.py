"""`batchscore monitor`: does tonight's scoring still look like the reference the model was
validated on? Measured on the columns every run already writes, without labels.

Rows are read in Arrow batches with only the columns needed and the window's filter pushed into
the scan; what is kept is counts per predicted class and a 10,000-bin histogram of top-1
probabilities per side, so memory does not grow with the number of rows.

Signals, each an effect (how big the change is), a floor and a p-value: how often a window of
this size drawn from the reference's own distribution would differ at least this much (`drift`
holds the statistics and the tests):
- prediction drift: the predicted-class mix, chi-square test on the counts with rare classes
  pooled; effect the Jensen-Shannon distance (PSI reported);
- confidence drift: the top-1 probabilities, two-sample Kolmogorov-Smirnov;
- the share of predictions below `low_confidence`, overall and for the class whose share rose
  most clearly (one-sided two-proportion tests; Bonferroni over the classes tested);
- the error rate (the same test); a NaN or infinite probability counts as an error;
- estimated accuracy, without labels (confidence-based performance estimation, as NannyML's
  CBPE): when the reference has labels (a canary's predictions, a labelled run), its labelled
  rows calibrate the model's top-1 probabilities by histogram binning; tonight's accuracy is
  the mean calibrated probability of tonight's rows. Its noise, and its interval, come from a
  bootstrap of the labelled rows and of tonight's bins. It holds while the model's calibration
  does: drift in which images come, not in what they mean;
- input drift: brightness, contrast, saturation, width and height (Kolmogorov-Smirnov each) and
  the file format (chi-square, like the classes).

A signal alerts when its Holm-adjusted p-value is below `alpha` (so that at most that share of
unchanged nights alert at all) and its effect passes its floor. A side with fewer than
`MIN_SIGNAL_ROWS` rows leaves a signal "insufficient data": it never alerts, and says so.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchscore import storage
from batchscore.charts import Panel, band_panels, bar_chart
from batchscore.dataset import PARTITION, dataset_parts, dataset_summaries
from batchscore.drift import (
    chi_square,
    holm,
    js_distance,
    ks_from_histograms,
    normal_sf,
    pooled,
    psi,
    rise_p_value,
)
from batchscore.errors import ConfigError
from batchscore.files import atomic_write_text, output_errors
from batchscore.names import is_url, redact_url, written_name
from batchscore.output import STATUS_OK, read_metadata
from batchscore.settings import MonitorSettings
from batchscore.storage import StorageOptions
from batchscore.store import Parts, object_parts

BINS = 10_000
CALIBRATION_BINS = 20
INPUT_BINS = 1_000
TREND_RUNS = 30
MIN_CLASS_ROWS = 20
MIN_SIGNAL_ROWS = 30  # fewer rows on a side: that signal says "insufficient data"
MOVED_CLASSES = 5  # the classes named as having moved most
BOOTSTRAP = 400
INSUFFICIENT = "insufficient data"
PREDICTION_DRIFT = "prediction drift (class mix)"
ERROR_RATE = "error rate rise"
LABEL_RATES = "label positive rate change, worst label"
EMBEDDING_DRIFT = "embedding drift (random projections, Kolmogorov-Smirnov)"
EMBEDDING_LENGTHS = "embedding length drift (Kolmogorov-Smirnov)"
PROJECTIONS = 32  # random directions an embedding's drift is looked for along
LENGTH_DECADES = 4  # vector lengths binned on a log scale from 1e-4 to 1e4
ACCURACY_DROP = "estimated accuracy drop"
EXAMPLES = 3  # files shown per class that moved
NULL_Z = 2.576  # the trend's bands: where 99% of unchanged nights fall
NULL_DRAWS = 200
KS_CRITICAL = 1.628  # the two-sample KS statistic's 1% critical value, times sqrt((n+m)/nm)
TOP_CLASSES = 12
# Input statistics, each binned on [0, 1]: the 0-1 ones as they are, sizes as log2(px) / 16.
INPUT_STATS = ("brightness", "contrast", "saturation", "width", "height")
COLUMNS = ["status", "pred_label", "pred_prob", "model_sha256"]
CANARY_PREDICTIONS = "predictions.parquet"
JSON_FILE = "monitor.json"
TREND_FILE = "trend.svg"
CLASSES_FILE = "classes.svg"
_SINCE = re.compile(r"^(\d+)d$")


@dataclass
class Side:
    """Everything kept about one side (reference or window), whatever its size."""

    n_rows: int = 0
    n_errors: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    models: set[str] = field(default_factory=set)
    # Rows with a label, and those right, per probability bin (for the calibration).
    labelled: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    right: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    formats: Counter[str] = field(default_factory=Counter)
    low_confidence: float = 0.5
    low_by_class: Counter[str] = field(default_factory=Counter)  # predictions below it
    # A multi-label model's rows: how many had each label in pred_labels (None: not one)
    positives: Counter[str] | None = None
    # An embedding model's rows (no predictions): each unit vector's projection on each of
    # PROJECTIONS random directions, and the vectors' lengths, binned (None: not one)
    projections: np.ndarray | None = None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    embedding_size: int = 0

    @property
    def has_predictions(self) -> bool:
        return self.projections is None

    @property
    def n_ok(self) -> int:
        return self.n_rows - self.n_errors

    @property
    def n_low(self) -> int:
        """Predictions below the side's low-confidence threshold."""
        return int(self.confidence[: int(self.low_confidence * BINS)].sum())

    def add(self, batch: pa.RecordBatch) -> None:
        self.n_rows += batch.num_rows
        self.models.update(v for v in batch.column("model_sha256").unique().to_pylist() if v)
        ok = pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False)
        if "embedding" in batch.schema.names:
            self.n_errors += batch.num_rows - int(pc.sum(ok).as_py() or 0)
            self._add_embeddings(pc.filter(batch.column("embedding"), ok))
            self._add_inputs(batch, ok)
            return
        # A row is a prediction only with a finite probability: NaN or Inf counts as an error.
        ok = pc.and_(ok, pc.fill_null(pc.is_finite(batch.column("pred_prob")), False))
        self.n_errors += batch.num_rows - int(pc.sum(ok).as_py() or 0)
        self.classes.update(_value_counts(pc.filter(batch.column("pred_label"), ok)))
        scored = pc.filter(batch.column("pred_prob"), ok)
        self.confidence += np.bincount(_bins(scored.drop_null().to_numpy()), minlength=BINS)
        low = pc.and_(ok, pc.less(batch.column("pred_prob"), self.low_confidence))
        self.low_by_class.update(_value_counts(pc.filter(batch.column("pred_label"), low)))
        self._add_inputs(batch, ok)
        if "pred_labels" in batch.schema.names:
            present = pc.list_flatten(pc.filter(batch.column("pred_labels"), ok))
            self.positives = (self.positives or Counter()) + Counter(_value_counts(present))
        if "correct" in batch.schema.names:
            correct = pc.filter(batch.column("correct"), ok)
            known = correct.is_valid().to_numpy(zero_copy_only=False)
            if "label" in batch.schema.names:  # a canary's unlabelled images are not wrong
                known &= (
                    pc.filter(batch.column("label"), ok).is_valid().to_numpy(zero_copy_only=False)
                )
            scored = scored.to_numpy(zero_copy_only=False)
            hits = correct.fill_null(False).to_numpy(zero_copy_only=False)
            self.labelled += np.bincount(_bins(scored[known]), minlength=BINS)
            self.right += np.bincount(_bins(scored[known & hits]), minlength=BINS)

    def _add_embeddings(self, vectors: pa.Array) -> None:
        """Each vector's direction as its projections on fixed random directions (a drift in
        any direction shows in some of them: Rabanser et al., "Failing Loudly", 2019), and
        its length, each binned: the side's memory is the same for any number of rows."""
        size = vectors.type.list_size
        if self.projections is None:
            self.projections = np.zeros((PROJECTIONS, BINS), dtype=np.int64)
            self.embedding_size = size
        if size != self.embedding_size:
            raise ConfigError(
                f"embeddings of {self.embedding_size} and of {size} numbers: vectors of two"
                " encoders cannot be compared"
            )
        values = np.asarray(pc.list_flatten(vectors).to_numpy(zero_copy_only=False), np.float64)
        values = values.reshape(-1, size)
        lengths = np.linalg.norm(values, axis=1)
        values, lengths = values[lengths > 0], lengths[lengths > 0]
        projected = (values / lengths[:, None]) @ _directions(size).T  # in [-1, 1]
        for k in range(PROJECTIONS):
            self.projections[k] += np.bincount(_bins((projected[:, k] + 1) / 2), minlength=BINS)
        scaled = (np.log10(lengths) + LENGTH_DECADES) / (2 * LENGTH_DECADES)
        self.lengths += np.bincount(_bins(scaled), minlength=BINS)

    def _add_inputs(self, batch: pa.RecordBatch, ok: pa.Array) -> None:
        for name in INPUT_STATS:
            if name not in batch.schema.names:
                continue
            values = pc.filter(batch.column(name), ok).drop_null().to_numpy(zero_copy_only=False)
            values = np.asarray(values, dtype=np.float64)
            if name in ("width", "height"):
                values = np.log2(np.maximum(values, 1)) / 16
            scaled = np.clip((values * INPUT_BINS).astype(np.int64), 0, INPUT_BINS - 1)
            counts = np.bincount(scaled, minlength=INPUT_BINS)
            self.inputs[name] = self.inputs.get(name, np.zeros(INPUT_BINS, np.int64)) + counts
        if "format" in batch.schema.names:
            self.formats.update(_value_counts(pc.filter(batch.column("format"), ok)))

    def low_share(self) -> float:
        """Share of the predictions below the side's low-confidence threshold."""
        return self.n_low / self.n_ok if self.n_ok else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.n_rows,
            "errors": self.n_errors,
            "models": sorted(self.models),
            "top_classes": dict(self.classes.most_common(10)),
        }


@dataclass(frozen=True)
class Signal:
    """One comparison of the window with the reference.

    `value` is the effect (how big the change is) and `threshold` the practical floor it must
    pass; `p_value` is how often a window of this size, drawn from the reference's own
    distribution, would differ at least this much (None: a side has too few rows to tell).
    `adjusted_p` is the p-value after Holm's correction across the night's signals, and the
    signal alerts when that is below the night's false-alarm rate and the effect passes the
    floor: a change both clear and large enough to matter."""

    name: str
    value: float
    threshold: float
    p_value: float | None
    details: dict[str, Any]
    adjusted_p: float | None = None
    alert: bool = False

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return INSUFFICIENT
        return "alert" if self.alert else "ok"

    def line(self) -> str:
        if self.p_value is None:
            return f"n/a   {self.name}: insufficient data ({self.details['why']})"
        verdict = "ALERT" if self.alert else "ok"
        line = (
            f"{verdict:<5} {self.name}: {self.value:.4f} (floor {self.threshold:g},"
            f" p {self.adjusted_p:.2g})"
        )
        if self.alert and self.details.get("moved"):  # what an on-call engineer looks at first
            moved = ", ".join(
                f"{m['name']} {m['reference']:.0%} -> {m['window']:.0%}"
                + (f" (e.g. {m['examples'][0]})" if m.get("examples") else "")
                for m in self.details["moved"][:3]
            )
            line += f"; moved most: {moved}"
        if "window_rate" in self.details:
            line += (
                f"; {self.details['label']} {self.details['reference_rate']:.0%} ->"
                f" {self.details['window_rate']:.0%} of images"
            )
        if "estimated_accuracy" in self.details:  # the estimate itself, not only its drop
            low, high = self.details["interval"]
            line += (
                f"; estimated {self.details['estimated_accuracy']:.3f} [{low:.3f}, {high:.3f}]"
                f" against measured {self.details['reference_accuracy']:.3f}"
            )
        return line


def insufficient(name: str, threshold: float, why: str) -> Signal:
    """A signal that cannot be judged: it never alerts, and says why."""
    return Signal(name, 0.0, threshold, None, {"why": why})


def judged(signals: list[Signal], alpha: float) -> list[Signal]:
    """Each signal's verdict, with Holm's correction across all of them: on nights drawn from
    the reference's distribution, at most `alpha` of them alert at all."""
    tested = [i for i, signal in enumerate(signals) if signal.p_value is not None]
    adjusted = dict(zip(tested, holm([signals[i].p_value or 0.0 for i in tested]), strict=True))
    return [
        replace(
            signal,
            adjusted_p=adjusted.get(i),
            alert=i in adjusted and adjusted[i] < alpha and signal.value > signal.threshold,
        )
        for i, signal in enumerate(signals)
    ]


@dataclass(frozen=True)
class MonitorResult:
    window: str
    reference: str
    signals: list[Signal]
    sides: dict[str, dict[str, Any]]
    trend: list[dict[str, Any]] = field(default_factory=list)  # one entry per night
    classes: dict[str, list[Any]] = field(default_factory=dict)  # top classes, both shares
    alpha: float = 0.01

    @property
    def alert(self) -> bool:
        return any(signal.alert for signal in self.signals)

    @property
    def verdict(self) -> str:
        """alert, ok, or insufficient data (no signal could be judged): never a silent pass."""
        if self.alert:
            return "alert"
        return "ok" if any(s.p_value is not None for s in self.signals) else INSUFFICIENT

    def lines(self) -> list[str]:
        """Alerts first, then the rest, one line per signal."""
        ordered = sorted(self.signals, key=lambda s: not s.alert)
        return [signal.line() for signal in ordered]

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "verdict": self.verdict,
            "false_alarm_rate": self.alpha,
            "window": self.window,
            "reference": self.reference,
            "signals": [{**asdict(s), "verdict": s.verdict} for s in self.signals],
            "sides": self.sides,
            "trend": self.trend,
            "classes": self.classes,
        }


def monitor(
    dataset: str | Path, reference: str | Path, settings: MonitorSettings | None = None
) -> MonitorResult:
    """Compare a window of `dataset` with `reference`; raises ConfigError for bad usage."""
    settings = settings or MonitorSettings()
    options = settings.storage_options
    shown = written_name(str(dataset))
    scored = _scored_runs(dataset, options)
    files, window_filter, window = _window(dataset, settings, scored)
    current = _read(files, window_filter, settings.low_confidence)
    if current.n_rows == 0:
        raise ConfigError(f"nothing scored in {shown} for {window}")
    chosen = _reference_for(reference, current.models)
    base = _read(_reference_parts(chosen, options), None, settings.low_confidence)
    if base.n_rows == 0:
        raise ConfigError(f"no rows in the reference {written_name(str(reference))}")
    if base.models != current.models and not settings.allow_model_change:
        raise ConfigError(
            f"the reference was scored by model {_short_models(base.models)} and {window} by"
            f" {_short_models(current.models)}: give this model its own reference (its canary"
            " report: batchscore canary LABELLED --model MODEL --report DIR), or pass"
            " --allow-model-change"
        )
    signals = [
        _with_examples(signal, files, window_filter) for signal in _signals(base, current, settings)
    ]
    sides = {"reference": base.summary(), "window": current.summary()}
    # The trend keeps models apart: a night of another model is not this model's history.
    runs = _trend_runs([r for r in scored if r.get("model_sha256") in current.models], settings)
    everything = dataset_parts(dataset, options)
    nights = _read_runs(everything, [str(r["run_id"]) for r in runs], settings)
    trend = [_night(run, nights[str(run["run_id"])], base, settings) for run in runs]
    return MonitorResult(
        window,
        written_name(str(chosen)),
        signals,
        sides,
        trend,
        _top_classes(base, current),
        settings.alpha,
    )


def _short_models(models: set[str]) -> str:
    return ", ".join(model[:12] for model in sorted(models))


def _with_examples(signal: Signal, files: Parts, condition: ds.Expression | None) -> Signal:
    """An alerting class mix with a few of tonight's files of each class that moved most, so
    that the engineer on call can open them (one more scan, only on an alert)."""
    moved = signal.details.get("moved")
    if not signal.alert or not moved or signal.name != PREDICTION_DRIFT or not files.paths:
        return signal
    names = [m["name"] for m in moved]
    wanted = pc.field("pred_label").isin(names) & (pc.field("status") == STATUS_OK)
    found: dict[str, list[str]] = {name: [] for name in names}
    scan = files.dataset().to_batches(
        columns=["pred_label", "path"],
        filter=wanted if condition is None else condition & wanted,
        batch_size=4096,
    )
    for batch in scan:
        for label, path in zip(*(batch.column(i).to_pylist() for i in (0, 1)), strict=True):
            if len(found[label]) < EXAMPLES:
                found[label].append(path)
        if all(len(paths) == EXAMPLES for paths in found.values()):
            break
    details = {**signal.details, "moved": [{**m, "examples": found[m["name"]]} for m in moved]}
    return replace(signal, details=details)


def _scored_runs(dataset: str | Path, options: StorageOptions) -> list[dict[str, Any]]:
    """Summaries of the complete runs that scored images, oldest first."""
    return [
        s
        for s in dataset_summaries(dataset, options)
        if s.get("status") == "complete" and s.get("n_images")
    ]


def _since(settings: MonitorSettings) -> tuple[datetime, int] | None:
    """The start of a `--since Nd` window and its N; None without --since."""
    if settings.since is None:
        return None
    match = _SINCE.match(settings.since)
    if match is None:
        raise ConfigError(f"--since takes a number of days such as 30d, got {settings.since!r}")
    days = int(match.group(1))
    return datetime.now(timezone.utc) - timedelta(days=days), days


def _trend_runs(runs: list[dict[str, Any]], settings: MonitorSettings) -> list[dict[str, Any]]:
    """The nights drawn in the trend: the window's runs, or up to TREND_RUNS runs ending with
    the monitored one."""
    if settings.date is not None:
        return [s for s in runs if any(f"{PARTITION}={settings.date}" in p for p in s["parts"])]
    since = _since(settings)
    if since is not None:
        return [s for s in runs if str(s.get("started_at", "")) >= since[0].isoformat()]
    if settings.run is not None:
        ends = [i for i, s in enumerate(runs) if s["run_id"] == settings.run]
        runs = runs[: ends[0] + 1] if ends else runs
    return runs[-TREND_RUNS:]


def _night(
    run: dict[str, Any], night: Side, base: Side, settings: MonitorSettings
) -> dict[str, Any]:
    """One night of the trend: its verdict, and for each signal drawn, its value and the band
    where 99% of unchanged nights of its size fall (before the correction across signals:
    a point outside its band need not alert, the alerts are the night's own verdicts)."""
    judged_night = {s.name: s for s in _signals(base, night, settings)}
    alerts = sorted(name for name, signal in judged_night.items() if signal.alert)
    if not night.has_predictions:
        return _embedding_night(run, night, base, judged_night, alerts)
    accuracy = judged_night.get(ACCURACY_DROP)
    brightness = judged_night.get(_input_name("brightness"))
    n_ok = night.n_ok
    signals = {
        "class mix (Jensen-Shannon)": (
            js_distance(*_aligned(base.classes, night.classes)) if n_ok else None,
            _js_band(base, n_ok),
            PREDICTION_DRIFT in alerts,
        ),
        "low-confidence share": (
            night.low_share() if n_ok else None,
            _share_band(base.n_low, base.n_ok, n_ok),
            _low_name(settings) in alerts,
        ),
        "error rate": _error_rate_point(night, base, alerts),
    }
    if accuracy is not None and accuracy.p_value is not None:
        measured = accuracy.details["reference_accuracy"]
        half = NULL_Z * accuracy.details["spread"]
        signals["estimated accuracy"] = (
            accuracy.details["estimated_accuracy"],
            (max(0.0, measured - half), min(1.0, measured + half)),
            accuracy.alert,
        )
    if brightness is not None and brightness.p_value is not None:
        n, m = int(base.inputs["brightness"].sum()), int(night.inputs["brightness"].sum())
        signals["input drift: brightness (KS)"] = (
            brightness.value,
            (0.0, KS_CRITICAL * ((n + m) / (n * m)) ** 0.5),
            brightness.alert,
        )
    return _trend_night(run, night, alerts, signals)


def _embedding_night(
    run: dict[str, Any], night: Side, base: Side, judged_night: dict[str, Signal], alerts: list[str]
) -> dict[str, Any]:
    """An embedding model's night in the trend: its error rate, and the largest KS statistic
    along the random directions against the band where 99% of unchanged nights put it (the
    KS critical value at 1% over the PROJECTIONS directions, Bonferroni)."""
    drift = judged_night[EMBEDDING_DRIFT]
    n, m = int(base.lengths.sum()), int(night.lengths.sum())
    critical = math.sqrt(-0.5 * math.log(0.01 / (2 * PROJECTIONS)))
    band = (0.0, critical * ((n + m) / (n * m)) ** 0.5) if min(n, m) else None
    signals = {
        "error rate": _error_rate_point(night, base, alerts),
        f"embedding drift (largest KS of {PROJECTIONS} directions)": (
            drift.value if drift.p_value is not None else None,
            band if drift.p_value is not None else None,
            drift.alert,
        ),
    }
    return _trend_night(run, night, alerts, signals)


# (value, band where 99% of unchanged nights fall, whether the night alerted on it)
TrendPoint = tuple[float | None, tuple[float, float] | None, bool]


def _error_rate_point(night: Side, base: Side, alerts: list[str]) -> TrendPoint:
    return (
        night.n_errors / night.n_rows if night.n_rows else None,
        _share_band(base.n_errors, base.n_rows, night.n_rows),
        ERROR_RATE in alerts,
    )


def _trend_night(
    run: dict[str, Any], night: Side, alerts: list[str], signals: dict[str, TrendPoint]
) -> dict[str, Any]:
    """One night of the trend as monitor.json keeps it (`js_distance`: the class mix's)."""
    return {
        "run_id": run["run_id"],
        "started_at": run.get("started_at"),
        "rows": night.n_rows,
        "verdict": "alert" if alerts else "ok",
        "alerts": alerts,
        "js_distance": signals.get("class mix (Jensen-Shannon)", (None, None, False))[0],
        "signals": {
            name: {"value": value, "band": band, "alert": alert}
            for name, (value, band, alert) in signals.items()
        },
    }


def _js_band(base: Side, n: int) -> tuple[float, float] | None:
    """Where 99% of the Jensen-Shannon distances of unchanged nights of `n` rows fall: nights
    drawn from the reference's class shares (`NULL_DRAWS` of them, seeded)."""
    if n < MIN_SIGNAL_ROWS or not base.classes:
        return None
    counts = np.array(list(base.classes.values()), dtype=np.int64)
    drawn = np.random.default_rng(0).multinomial(n, counts / counts.sum(), size=NULL_DRAWS)
    distances = [js_distance(counts, row) for row in drawn]
    return 0.0, float(np.quantile(distances, 0.99))


def _share_band(hits: int, n_ref: int, n: int) -> tuple[float, float] | None:
    """Where 99% of unchanged nights of `n` rows put a share the reference has as hits/n_ref."""
    if n < MIN_SIGNAL_ROWS or not n_ref:
        return None
    share = hits / n_ref
    half = NULL_Z * (share * (1 - share) * (1 / n_ref + 1 / n)) ** 0.5
    return max(0.0, share - half), min(1.0, share + half)


def _top_classes(base: Side, current: Side) -> dict[str, list[Any]]:
    """The classes most predicted on either side, with their share on each."""
    ref_n, cur_n = sum(base.classes.values()) or 1, sum(current.classes.values()) or 1
    combined = Counter({k: v / ref_n for k, v in base.classes.items()})
    combined.update({k: v / cur_n for k, v in current.classes.items()})
    names = [name for name, _ in combined.most_common(TOP_CLASSES)]
    return {
        "names": names,
        "reference": [base.classes[n] / ref_n for n in names],
        "window": [current.classes[n] / cur_n for n in names],
    }


def _value_counts(values: pa.Array) -> dict[str, int]:
    """Counts per distinct non-null value, counted in Arrow: no Python object per row."""
    counted = pc.value_counts(values.drop_null())
    names, counts = counted.field("values").to_pylist(), counted.field("counts").to_pylist()
    return dict(zip(names, counts, strict=True))


def _aligned(a: Counter[str], b: Counter[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two counters as count vectors over the union of their keys, in one order."""
    names = sorted(set(a) | set(b))
    return (
        np.array([a[n] for n in names], dtype=np.int64),
        np.array([b[n] for n in names], dtype=np.int64),
    )


def _bins(probs: np.ndarray) -> np.ndarray:
    scaled = (np.asarray(probs, dtype=np.float64) * BINS).astype(np.int64)
    return np.clip(scaled, 0, BINS - 1)


def _low_name(settings: MonitorSettings) -> str:
    return f"low-confidence share rise (top-1 < {settings.low_confidence:g})"


def _input_name(stat: str) -> str:
    return f"input drift: {stat} (Kolmogorov-Smirnov)"


def _signals(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    if not (base.has_predictions and current.has_predictions):
        return judged(_embedding_signals(base, current, settings), settings.alpha)
    signals = [
        _mix_signal(PREDICTION_DRIFT, base.classes, current.classes, settings.max_js),
        _ks_signal("confidence drift (Kolmogorov-Smirnov)", base.confidence,
                   current.confidence, settings.max_ks),
        _rise_signal(_low_name(settings), (base.n_low, base.n_ok),
                     (current.n_low, current.n_ok), settings.max_low_confidence_rise),
        _rise_signal(ERROR_RATE, (base.n_errors, base.n_rows),
                     (current.n_errors, current.n_rows), settings.max_error_rate_rise),
        _class_low_confidence_signal(base, current, settings),
        *_label_rate_signal(base, current, settings),
        *_accuracy_signal(base, current, settings),
        *_input_signals(base, current, settings),
    ]  # fmt: skip
    return judged(signals, settings.alpha)


def _mix_signal(name: str, reference: Counter[str], window: Counter[str], floor: float) -> Signal:
    """A categorical mix (predicted classes, file formats): the chi-square test on the counts,
    rare categories pooled; the effect is the Jensen-Shannon distance."""
    ref, cur = _aligned(reference, window)
    if min(ref.sum(), cur.sum()) < MIN_SIGNAL_ROWS:
        return insufficient(name, floor, _too_few(ref.sum(), cur.sum()))
    statistic, p_value, dof = chi_square(*pooled(ref, cur))
    ref_share, cur_share = ref / ref.sum(), cur / cur.sum()
    names = sorted(set(reference) | set(window))
    moved = np.argsort(-np.abs(cur_share - ref_share))[:MOVED_CLASSES]
    details = {
        "chi2": statistic,
        "chi2_dof": dof,
        "psi": psi(ref, cur),
        "moved": [
            {"name": names[i], "reference": float(ref_share[i]), "window": float(cur_share[i])}
            for i in moved
        ],
    }
    return Signal(name, js_distance(ref, cur), floor, p_value, details)


def _ks_signal(name: str, reference: np.ndarray, window: np.ndarray, floor: float) -> Signal:
    n_ref, n_cur = int(reference.sum()), int(window.sum())
    if min(n_ref, n_cur) < MIN_SIGNAL_ROWS:
        return insufficient(name, floor, _too_few(n_ref, n_cur))
    statistic, p_value = ks_from_histograms(reference, window)
    return Signal(name, statistic, floor, p_value, {})


def _rise_signal(
    name: str, reference: tuple[int, int], window: tuple[int, int], floor: float
) -> Signal:
    """A share that should not grow (hits among rows): one-sided two-proportion test."""
    (hits_ref, n_ref), (hits_cur, n_cur) = reference, window
    if min(n_ref, n_cur) < MIN_SIGNAL_ROWS:
        return insufficient(name, floor, _too_few(n_ref, n_cur))
    share_ref, share_cur = hits_ref / n_ref, hits_cur / n_cur
    p_value = rise_p_value(hits_ref, n_ref, hits_cur, n_cur)
    details = {"reference": share_ref, "window": share_cur}
    return Signal(name, share_cur - share_ref, floor, p_value, details)


def _too_few(n_ref: int, n_cur: int) -> str:
    return f"{n_ref} rows in the reference and {n_cur} in the window; {MIN_SIGNAL_ROWS} needed"


def _class_low_confidence_signal(base: Side, current: Side, settings: MonitorSettings) -> Signal:
    """The class whose low-confidence share rose most clearly, among classes predicted at
    least MIN_CLASS_ROWS times on both sides (a drift one class hides in the overall share).
    Each class is tested on its own; the family's p-value is Bonferroni's (the number of
    classes times the smallest p-value among those whose rise passes the floor), so looking at
    a thousand classes does not make a thousand chances of a false alarm."""
    name = "low-confidence share rise, worst class"
    floor = settings.max_low_confidence_rise
    eligible = [
        label
        for label in set(base.classes) & set(current.classes)
        if min(base.classes[label], current.classes[label]) >= MIN_CLASS_ROWS
    ]
    if not eligible:
        return insufficient(name, floor, f"no class predicted {MIN_CLASS_ROWS} times on both sides")
    tests = {}
    for label in sorted(eligible):
        ref = (base.low_by_class[label], base.classes[label])
        cur = (current.low_by_class[label], current.classes[label])
        tests[label] = (cur[0] / cur[1] - ref[0] / ref[1], rise_p_value(*ref, *cur))
    large = [label for label in tests if tests[label][0] > floor] or list(tests)
    worst = min(large, key=lambda label: (tests[label][1], -tests[label][0]))
    rise, p_value = tests[worst]
    ranked = sorted(tests.items(), key=lambda item: item[1][1])[:MOVED_CLASSES]
    details = {
        "class": worst,
        "classes_tested": len(tests),
        "by_class": {label: {"rise": r, "p_value": p} for label, (r, p) in ranked},
        "min_rows": MIN_CLASS_ROWS,
    }
    return Signal(name, rise, floor, min(1.0, p_value * len(tests)), details)


def _embedding_signals(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    """An embedding model's night: the direction of its vectors (the KS test along each random
    direction, Bonferroni over them; the effect is the largest KS statistic), their length,
    the error rate and the inputs."""
    if base.projections is None or current.projections is None:
        raise ConfigError(
            "the reference holds class predictions and the window embeddings (or the other way"
            " round): monitor a model against a reference it scored"
        )
    if base.embedding_size != current.embedding_size:
        raise ConfigError(
            f"the reference's embeddings have {base.embedding_size} numbers and the window's"
            f" {current.embedding_size}: vectors of two encoders cannot be compared"
        )
    floor = settings.max_ks
    signals = [
        _rise_signal(ERROR_RATE, (base.n_errors, base.n_rows),
                     (current.n_errors, current.n_rows), settings.max_error_rate_rise),
        _ks_signal(EMBEDDING_LENGTHS, base.lengths, current.lengths, floor),
        *_input_signals(base, current, settings),
    ]  # fmt: skip
    n_ref, n_cur = int(base.projections[0].sum()), int(current.projections[0].sum())
    if min(n_ref, n_cur) < MIN_SIGNAL_ROWS:
        return [insufficient(EMBEDDING_DRIFT, floor, _too_few(n_ref, n_cur)), *signals]
    tests = [
        ks_from_histograms(b, c) for b, c in zip(base.projections, current.projections, strict=True)
    ]
    large = [k for k, (statistic, _) in enumerate(tests) if statistic > floor] or list(
        range(len(tests))
    )
    worst = min(large, key=lambda k: (tests[k][1], -tests[k][0]))
    details = {"direction": worst, "directions": PROJECTIONS, "size": base.embedding_size}
    statistic, p_value = tests[worst]
    drift = Signal(EMBEDDING_DRIFT, statistic, floor, min(1.0, p_value * len(tests)), details)
    return [drift, *signals]


@functools.cache  # drawn once per size, not once per batch read
def _directions(size: int) -> np.ndarray:
    """PROJECTIONS unit vectors in `size` dimensions, the same for every run (seeded by size)."""
    drawn = np.random.default_rng(size).standard_normal((PROJECTIONS, size))
    unit: np.ndarray = drawn / np.linalg.norm(drawn, axis=1, keepdims=True)
    unit.setflags(write=False)  # shared by every caller
    return unit


def _label_rate_signal(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    """A multi-label model: the label whose positive rate (the share of images it was
    predicted for) moved most clearly, up or down. Each label present on either side is tested
    on its own, two-sided (twice the smaller one-sided p-value of the two-proportion test);
    the family's p-value is Bonferroni's, as for the classes' low-confidence shares."""
    if base.positives is None or current.positives is None:
        return []  # not a multi-label model
    name = LABEL_RATES
    floor = settings.max_label_rate_change
    if min(base.n_ok, current.n_ok) < MIN_SIGNAL_ROWS:
        return [insufficient(name, floor, _too_few(base.n_ok, current.n_ok))]
    labels = sorted(set(base.positives) | set(current.positives))
    if not labels:
        return [insufficient(name, floor, "no label was predicted on either side")]
    tests = {}
    for label in labels:
        ref, cur = (base.positives[label], base.n_ok), (current.positives[label], current.n_ok)
        up, down = rise_p_value(*ref, *cur), rise_p_value(*cur, *ref)
        tests[label] = (cur[0] / cur[1] - ref[0] / ref[1], min(1.0, 2 * min(up, down)))
    large = [label for label in tests if abs(tests[label][0]) > floor] or list(tests)
    worst = min(large, key=lambda label: (tests[label][1], -abs(tests[label][0])))
    change, p_value = tests[worst]
    ranked = sorted(tests.items(), key=lambda item: item[1][1])[:MOVED_CLASSES]
    details = {
        "label": worst,
        "reference_rate": base.positives[worst] / base.n_ok,
        "window_rate": current.positives[worst] / current.n_ok,
        "labels_tested": len(tests),
        "by_label": {label: {"change": c, "p_value": p} for label, (c, p) in ranked},
    }
    return [Signal(name, abs(change), floor, min(1.0, p_value * len(tests)), details)]


def _accuracy_signal(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    """The accuracy estimated without labels (CBPE) against the reference's measured one.
    Its noise comes from two places, both resampled (a bootstrap of `BOOTSTRAP` draws, seeded,
    so the same night gets the same verdict): the labelled reference rows behind the
    calibration table and the measured accuracy, and which probability bins tonight's rows
    fell in. The interval for tonight's accuracy adds the chance in tonight's own outcomes."""
    if not base.labelled.sum():
        return []  # no labels in the reference: nothing to calibrate on
    name = ACCURACY_DROP
    floor = settings.max_accuracy_drop
    if current.n_ok < MIN_SIGNAL_ROWS:
        return [insufficient(name, floor, _too_few(int(base.labelled.sum()), current.n_ok))]
    labelled = _coarse(base.labelled)
    right = _coarse(base.right)
    counts = _coarse(current.confidence)
    n = int(counts.sum())
    measured = float(right.sum() / labelled.sum())
    calibration = _calibration(labelled, right)
    estimate = float(counts @ calibration / n)
    rng = np.random.default_rng(0)
    cells = np.concatenate([right, labelled - right]).astype(np.float64)
    drawn = rng.multinomial(int(labelled.sum()), cells / cells.sum(), size=BOOTSTRAP)
    right_b = drawn[:, :CALIBRATION_BINS]
    labelled_b = right_b + drawn[:, CALIBRATION_BINS:]
    calibration_b = _calibration(labelled_b, right_b)
    measured_b = right_b.sum(axis=1) / labelled_b.sum(axis=1)
    weights_b = rng.multinomial(n, counts / n, size=BOOTSTRAP) / n
    drop_b = measured_b - np.sum(weights_b * calibration_b, axis=1)
    spread = float(np.std(drop_b, ddof=1))
    drop = measured - estimate
    p_value = normal_sf(drop / spread) if spread > 0 else float(drop <= 0)
    calibration_var = float(np.var(calibration_b @ counts / n, ddof=1))
    outcome_var = float(np.sum(counts * calibration * (1 - calibration)) / n**2)
    half_width = 1.96 * (calibration_var + outcome_var) ** 0.5
    details = {
        "reference_accuracy": measured,
        "estimated_accuracy": estimate,
        "interval": [estimate - half_width, estimate + half_width],
        "spread": spread,  # of the drop, on unchanged nights of this size
        "reference_labelled": int(labelled.sum()),
    }
    return [Signal(name, drop, floor, p_value, details)]


def _coarse(fine: np.ndarray) -> np.ndarray:
    """Counts on BINS fine probability bins, summed into CALIBRATION_BINS coarse ones."""
    coarse: np.ndarray = fine.reshape(CALIBRATION_BINS, -1).sum(axis=1)
    return coarse


def _calibration(labelled: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Accuracy per coarse bin (along the last axis); a bin with no labelled row takes its own
    mean probability (assumed calibrated)."""
    midpoints = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    return np.where(labelled > 0, right / np.maximum(labelled, 1), midpoints)


def _input_signals(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    """Only for what both sides recorded (datasets older than these columns have none)."""
    signals = [
        _ks_signal(_input_name(name), base.inputs[name], current.inputs[name], settings.max_ks)
        for name in INPUT_STATS
        if name in base.inputs and name in current.inputs
    ]  # fmt: skip
    if base.formats and current.formats:
        signals.append(
            _mix_signal("input drift: format", base.formats, current.formats, settings.max_js)
        )
    return signals


def _window(
    dataset: str | Path, settings: MonitorSettings, scored: list[dict[str, Any]]
) -> tuple[Parts, ds.Expression | None, str]:
    """The files, the row filter and a name of the monitored window."""
    chosen = [k for k in ("run", "date", "since") if getattr(settings, k) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"choose one of --run, --date, --since (got {', '.join(chosen)})")
    options = settings.storage_options
    if settings.date is not None:
        partition = dataset_parts(dataset, options, below=f"{PARTITION}={settings.date}")
        return partition, None, f"date {settings.date}"
    since = _since(settings)
    if since is not None:
        start, days = since
        recent = pc.field("scored_at") >= pa.scalar(start, pa.timestamp("us", tz="UTC"))
        return dataset_parts(dataset, options), recent, f"the last {days} days"
    run = settings.run
    if run is None:
        if not scored:
            shown = written_name(str(dataset))
            raise ConfigError(f"no complete run that scored images in {shown}")
        run = str(scored[-1]["run_id"])
    return dataset_parts(dataset, options), pc.field("run_id") == run, f"run {run}"


def _reference_for(reference: str | Path, models: set[str]) -> str | Path:
    """The reference itself, or, when it is a local folder of canary reports (one sub-folder
    each, as `jobs/canary.sh` keeps them), the report of the window's model: a new model is
    compared with its own canary, never with its predecessor's."""
    if isinstance(reference, str) and is_url(reference):
        return reference
    folder = Path(reference)
    if not folder.is_dir() or (folder / CANARY_PREDICTIONS).is_file():
        return reference
    reports = sorted(folder.glob(f"*/{CANARY_PREDICTIONS}"))
    if not reports:
        return reference  # a dataset directory
    by_model = {str(read_metadata(path).get("model_sha256")): path.parent for path in reports}
    found = [by_model[model] for model in sorted(models) if model in by_model]
    if len(found) == 1:
        return found[0]
    raise ConfigError(
        f"no canary report of model {_short_models(models)} in {reference} (it holds reports"
        f" of {_short_models(set(by_model))}): give the new model its reference"
        f" with `batchscore canary LABELLED --model MODEL --report {reference}/NAME`"
    )


def _reference_parts(reference: str | Path, options: StorageOptions) -> Parts:
    """A predictions file, a canary report folder, or a dataset; on disk or in a bucket."""
    if isinstance(reference, str) and is_url(reference):
        if reference.endswith(".parquet"):
            return object_parts([reference], options)
        report = storage.join(reference, CANARY_PREDICTIONS)
        try:
            storage.stat_object(report, options)
            return object_parts([report], options)
        except FileNotFoundError:
            found = dataset_parts(reference, options)
        if not found.paths:
            raise ConfigError(f"reference not found: {redact_url(reference)}")
        return found
    path = Path(reference)
    if path.is_file():
        return Parts([str(path)])
    if (path / CANARY_PREDICTIONS).is_file():  # a canary report folder
        return Parts([str(path / CANARY_PREDICTIONS)])
    if path.is_dir():
        return dataset_parts(path, options)
    raise ConfigError(f"reference not found: {reference}")


def _read(files: Parts, condition: ds.Expression | None, low_confidence: float) -> Side:
    side = Side(low_confidence=low_confidence)
    for batch in _batches(files, condition):
        side.add(batch)
    return side


def _read_runs(files: Parts, run_ids: list[str], settings: MonitorSettings) -> dict[str, Side]:
    """One side per run, all from a single scan (not one scan per night)."""
    sides = {run_id: Side(low_confidence=settings.low_confidence) for run_id in run_ids}
    if not run_ids:
        return sides
    for batch in _batches(files, pc.field("run_id").isin(run_ids), extra=["run_id"]):
        runs = batch.column("run_id")
        for run_id in runs.unique().to_pylist():
            sides[run_id].add(batch.filter(pc.equal(runs, run_id)))
    return sides


def _batches(
    files: Parts, condition: ds.Expression | None, extra: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The columns monitoring reads (those present), filtered in the scan, with bounded
    readahead so that memory stays flat."""
    if not files.paths:
        return
    dataset = files.dataset()
    names = dataset.schema.names
    optional = ["correct", "label", "format", "pred_labels", *INPUT_STATS]
    required = COLUMNS if "embedding" not in names else ["status", "model_sha256", "embedding"]
    columns = [*required, *(extra or []), *(name for name in optional if name in names)]
    yield from dataset.to_batches(
        columns=columns,
        filter=condition,
        batch_size=65_536,
        batch_readahead=2,
        fragment_readahead=1,
    )


def _night_label(night: Mapping[str, Any]) -> str:
    """A night by when it ran (UTC, to the minute), its run id when that is unknown."""
    started = str(night.get("started_at") or "")
    return started[:16].replace("T", " ") if started else str(night["run_id"])


def _panel(name: str, trend: list[dict[str, Any]]) -> Panel:
    seen = [night["signals"].get(name) for night in trend]
    bands = [None if s is None else s["band"] for s in seen]
    return Panel(
        name,
        values=[None if s is None else s["value"] for s in seen],
        low=[None if b is None else b[0] for b in bands],
        high=[None if b is None else b[1] for b in bands],
        alerts=[bool(s and s["alert"]) for s in seen],
        percent=name in ("low-confidence share", "error rate", "estimated accuracy"),
    )


def check_report_folder(folder: str | Path) -> None:
    """The report goes to a local folder: a URL would become a folder named like one."""
    if is_url(str(folder)):
        raise ConfigError(
            f"--report {redact_url(str(folder))}: monitor writes its report to a local folder"
        )


def write_report(result: MonitorResult, folder: Path) -> None:
    """monitor.json (every number, threshold and verdict) and report.md."""
    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / JSON_FILE, json.dumps(result.as_dict(), indent=2) + "\n")
    lines = [
        f"# Monitor: {result.window} against {result.reference}",
        "",
        {"alert": "**ALERT**", "ok": "No alert."}.get(result.verdict, "Insufficient data."),
        "",
        f"A signal alerts when its change is clear (Holm-adjusted p below {result.alpha:g}) and"
        " larger than its floor.",
        "",
        "| signal | effect | floor | p (adjusted) | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for signal in result.signals:
        p = "-" if signal.adjusted_p is None else f"{signal.adjusted_p:.2g}"
        lines.append(
            f"| {signal.name} | {signal.value:.4f} | {signal.threshold:g} | {p} |"
            f" {signal.verdict} |"
        )
    for signal in result.signals:
        if signal.alert and signal.details.get("moved"):
            lines += [
                "",
                f"## What moved most: {signal.name}",
                "",
                "| | reference | window | files of the window |",
                "| --- | --- | --- | --- |",
            ]
            for moved in signal.details["moved"]:
                files = ", ".join(f"`{path}`" for path in moved.get("examples", []))
                lines.append(
                    f"| {moved['name']} | {moved['reference']:.1%} | {moved['window']:.1%} |"
                    f" {files or '-'} |"
                )
    lines += ["", "| | reference | window |", "| --- | --- | --- |"]
    for key in ("rows", "errors"):
        lines.append(
            f"| {key} | {result.sides['reference'][key]} | {result.sides['window'][key]} |"
        )
    trend = result.trend
    labels = [_night_label(night) for night in trend]
    names = list(dict.fromkeys(name for night in trend for name in night["signals"]))
    panels = [_panel(name, trend) for name in names]
    note = (
        "grey: where 99% of nights without change fall, at each night's size;"
        " red, ringed: the night alerted on it"
    )
    atomic_write_text(
        folder / TREND_FILE, band_panels("The monitored nights", labels, panels, note)
    )
    lines += ["", f"![trend]({TREND_FILE})"]
    if result.classes["names"]:  # an embedding model has none
        atomic_write_text(
            folder / CLASSES_FILE,
            bar_chart(
                f"Top classes: {result.window} against the reference",
                result.classes["names"],
                {"reference": result.classes["reference"], "window": result.classes["window"]},
                percent=True,
            ),
        )
        lines += ["", f"![classes]({CLASSES_FILE})"]
    atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")
