"""`batchscore monitor`: does tonight's scoring still look like the reference the model was
validated on? Measured on the columns every run already writes, without labels.

Rows are read in Arrow batches with only the columns needed and the window's filter pushed into
the scan; what is kept is counts per predicted class and a 10,000-bin histogram of top-1
probabilities per side, so memory does not grow with the number of rows.

Signals, each a number, a threshold and a verdict (`drift` holds the statistics):
- prediction drift: the predicted-class distribution, Jensen-Shannon distance (alert above
  `max_js`) and PSI (above `max_psi`), with the chi-square test's p-value reported;
- confidence drift: the top-1 probability distribution, Kolmogorov-Smirnov statistic (alert
  above `max_ks` when its p-value is below `alpha`), and the share of predictions below
  `low_confidence` (alert when it rose by more than `max_low_confidence_rise`);
- error rate: the share of error rows (alert when it rose by more than `max_error_rate_rise`);
- estimated accuracy, without labels (confidence-based performance estimation, as NannyML's
  CBPE): when the reference has labels (a canary's predictions, a labelled run), its rows
  calibrate the model's top-1 probabilities by histogram binning (the accuracy of the labelled
  rows in each of `CALIBRATION_BINS` probability bins); tonight's accuracy is estimated as the
  mean calibrated probability of tonight's rows, with a 95% interval, and compared with the
  reference's measured accuracy (alert on a drop of more than `max_accuracy_drop`). It holds
  while the model's calibration does: drift in which images come, not in what they mean;
- input drift: how the images look, from the columns every run records while decoding:
  brightness, contrast, saturation, width and height (two-sample KS each, alert like the
  confidence drift) and the file format (Jensen-Shannon distance, alert like the predictions).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchscore import storage
from batchscore.charts import bar_chart, line_chart
from batchscore.dataset import PARTITION, dataset_parts, dataset_summaries
from batchscore.drift import chi_square, js_distance, ks_from_histograms, psi
from batchscore.errors import ConfigError
from batchscore.files import atomic_write_text, output_errors
from batchscore.names import is_url, redact_url, written_name
from batchscore.output import STATUS_OK
from batchscore.settings import MonitorSettings
from batchscore.storage import StorageOptions
from batchscore.store import Parts, object_parts

BINS = 10_000
CALIBRATION_BINS = 20
INPUT_BINS = 1_000
TREND_RUNS = 30
MIN_CLASS_ROWS = 20
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

    @property
    def n_ok(self) -> int:
        return self.n_rows - self.n_errors

    def add(self, batch: pa.RecordBatch) -> None:
        self.n_rows += batch.num_rows
        ok = pc.equal(batch.column("status"), STATUS_OK)
        self.n_errors += batch.num_rows - int(pc.sum(ok).as_py() or 0)
        self.models.update(v for v in batch.column("model_sha256").unique().to_pylist() if v)
        self.classes.update(_value_counts(pc.filter(batch.column("pred_label"), ok)))
        scored = pc.filter(batch.column("pred_prob"), ok)
        self.confidence += np.bincount(_bins(scored.drop_null().to_numpy()), minlength=BINS)
        low = pc.and_(ok, pc.less(batch.column("pred_prob"), self.low_confidence))
        self.low_by_class.update(_value_counts(pc.filter(batch.column("pred_label"), low)))
        self._add_inputs(batch, ok)
        if "correct" in batch.schema.names:
            correct = pc.filter(batch.column("correct"), ok)
            known = correct.is_valid().to_numpy(zero_copy_only=False)
            scored = scored.to_numpy(zero_copy_only=False)
            hits = correct.fill_null(False).to_numpy(zero_copy_only=False)
            self.labelled += np.bincount(_bins(scored[known]), minlength=BINS)
            self.right += np.bincount(_bins(scored[known & hits]), minlength=BINS)

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

    def calibration(self) -> np.ndarray | None:
        """Accuracy per coarse probability bin, from the labelled rows; None without labels.
        A bin with no labelled row takes its own mean probability (assumed calibrated)."""
        if not self.labelled.sum():
            return None
        labelled = self.labelled.reshape(CALIBRATION_BINS, -1).sum(axis=1)
        right = self.right.reshape(CALIBRATION_BINS, -1).sum(axis=1)
        midpoints = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
        return np.where(labelled > 0, right / np.maximum(labelled, 1), midpoints)

    def estimated_accuracy(self, calibration: np.ndarray) -> tuple[float, float]:
        """(estimate, half-width of its 95% interval) of this side's top-1 accuracy."""
        counts = self.confidence.reshape(CALIBRATION_BINS, -1).sum(axis=1)
        n = counts.sum()
        if not n:
            return 0.0, 0.0
        estimate = float(np.sum(counts * calibration) / n)
        variance = float(np.sum(counts * calibration * (1 - calibration)) / n**2)
        return estimate, 1.96 * variance**0.5

    def low_share(self) -> float:
        """Share of the predictions below the side's low-confidence threshold."""
        below = int(self.confidence[: int(self.low_confidence * BINS)].sum())
        return below / self.n_ok if self.n_ok else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.n_rows,
            "errors": self.n_errors,
            "models": sorted(self.models),
            "top_classes": dict(self.classes.most_common(10)),
        }


@dataclass(frozen=True)
class Signal:
    name: str
    value: float
    threshold: float
    alert: bool
    details: dict[str, Any]

    def line(self) -> str:
        verdict = "ALERT" if self.alert else "ok"
        return f"{verdict:<5} {self.name}: {self.value:.4f} (threshold {self.threshold:g})"


@dataclass(frozen=True)
class MonitorResult:
    window: str
    reference: str
    signals: list[Signal]
    sides: dict[str, dict[str, Any]]
    trend: list[dict[str, Any]] = field(default_factory=list)  # one entry per night
    classes: dict[str, list[Any]] = field(default_factory=dict)  # top classes, both shares

    @property
    def alert(self) -> bool:
        return any(signal.alert for signal in self.signals)

    def lines(self) -> list[str]:
        """Alerts first, then the rest, one line per signal."""
        ordered = sorted(self.signals, key=lambda s: not s.alert)
        return [signal.line() for signal in ordered]

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "window": self.window,
            "reference": self.reference,
            "signals": [asdict(signal) for signal in self.signals],
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
    base = _read(_reference_parts(reference, options), None, settings.low_confidence)
    if base.n_rows == 0:
        raise ConfigError(f"no rows in the reference {written_name(str(reference))}")
    if base.models != current.models and not settings.allow_model_change:
        raise ConfigError(
            f"the reference was scored by model {sorted(base.models)} and {window} by"
            f" {sorted(current.models)}: compare the same model, or pass --allow-model-change"
        )
    signals = _signals(base, current, settings)
    sides = {"reference": base.summary(), "window": current.summary()}
    runs = _trend_runs(scored, settings)
    everything = dataset_parts(dataset, options)
    nights = _read_runs(everything, [str(r["run_id"]) for r in runs], settings)
    trend = [_night(run, nights[str(run["run_id"])], base) for run in runs]
    return MonitorResult(
        window, written_name(str(reference)), signals, sides, trend, _top_classes(base, current)
    )


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


def _night(run: dict[str, Any], night: Side, base: Side) -> dict[str, Any]:
    """One night's numbers for the trend: class drift, low confidence, errors, accuracy."""
    js = js_distance(*_aligned(base.classes, night.classes))
    calibration = base.calibration()
    estimate = None if calibration is None else night.estimated_accuracy(calibration)[0]
    return {
        "run_id": run["run_id"],
        "started_at": run.get("started_at"),
        "rows": night.n_rows,
        "js_distance": js,
        "low_confidence_share": night.low_share(),
        "error_rate": night.n_errors / night.n_rows if night.n_rows else None,
        "estimated_accuracy": estimate,
    }


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


def _accuracy_signal(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    calibration = base.calibration()
    if calibration is None:
        return []  # no labels in the reference: nothing to calibrate on
    measured = float(base.right.sum() / base.labelled.sum())
    estimate, half_width = current.estimated_accuracy(calibration)
    details = {
        "reference_accuracy": measured,
        "estimated_accuracy": estimate,
        "interval": [estimate - half_width, estimate + half_width],
        "reference_labelled": int(base.labelled.sum()),
    }
    drop = measured - estimate
    name = f"estimated accuracy drop (measured {measured:.3f}, estimated {estimate:.3f})"
    return [
        Signal(name, drop, settings.max_accuracy_drop, drop > settings.max_accuracy_drop, details)
    ]


def _class_low_confidence_signal(base: Side, current: Side, settings: MonitorSettings) -> Signal:
    """The class whose low-confidence share rose most, among classes predicted at least
    MIN_CLASS_ROWS times on both sides (a drift one class hides in the overall share)."""
    rises = {
        name: current.low_by_class[name] / current.classes[name]
        - base.low_by_class[name] / base.classes[name]
        for name in set(base.classes) & set(current.classes)
        if min(base.classes[name], current.classes[name]) >= MIN_CLASS_ROWS
    }
    worst = max(rises, key=lambda name: rises[name], default=None)
    value = rises[worst] if worst is not None else 0.0
    top = dict(sorted(rises.items(), key=lambda item: -item[1])[:10])
    return Signal(
        "low-confidence share rise, worst class",
        value,
        settings.max_low_confidence_rise,
        value > settings.max_low_confidence_rise,
        {"class": worst, "by_class": top, "min_rows": MIN_CLASS_ROWS},
    )


def _input_signals(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    """Only for what both sides recorded (datasets older than these columns have none)."""
    signals = []
    for name in INPUT_STATS:
        if name in base.inputs and name in current.inputs:
            ks, p_value = ks_from_histograms(base.inputs[name], current.inputs[name])
            alert = ks > settings.max_ks and p_value < settings.alpha
            signals.append(
                Signal(f"input drift: {name} (Kolmogorov-Smirnov)", ks, settings.max_ks, alert,
                       {"p_value": p_value})
            )  # fmt: skip
    if base.formats and current.formats:
        js = js_distance(*_aligned(base.formats, current.formats))
        details = {"reference": dict(base.formats), "window": dict(current.formats)}
        signals.append(
            Signal("input drift: format (Jensen-Shannon)", js, settings.max_js,
                   js > settings.max_js, details)
        )  # fmt: skip
    return signals


def _signals(base: Side, current: Side, settings: MonitorSettings) -> list[Signal]:
    ref_counts, cur_counts = _aligned(base.classes, current.classes)
    js = js_distance(ref_counts, cur_counts)
    stability = psi(ref_counts, cur_counts)
    statistic, p_value, dof = chi_square(ref_counts, cur_counts)
    prediction = {"chi2": statistic, "chi2_p": p_value, "chi2_dof": dof}
    ks, ks_p = ks_from_histograms(base.confidence, current.confidence)
    low_ref, low_cur = base.low_share(), current.low_share()
    err_ref = base.n_errors / base.n_rows
    err_cur = current.n_errors / current.n_rows
    return [
        Signal("prediction drift (Jensen-Shannon)", js, settings.max_js, js > settings.max_js,
               prediction),
        Signal("prediction drift (PSI)", stability, settings.max_psi,
               stability > settings.max_psi, prediction),
        Signal("confidence drift (Kolmogorov-Smirnov)", ks, settings.max_ks,
               ks > settings.max_ks and ks_p < settings.alpha, {"p_value": ks_p}),
        Signal(f"low-confidence share rise (top-1 < {settings.low_confidence:g})",
               low_cur - low_ref, settings.max_low_confidence_rise,
               low_cur - low_ref > settings.max_low_confidence_rise,
               {"reference": low_ref, "window": low_cur}),
        Signal("error rate rise", err_cur - err_ref, settings.max_error_rate_rise,
               err_cur - err_ref > settings.max_error_rate_rise,
               {"reference": err_ref, "window": err_cur}),
        _class_low_confidence_signal(base, current, settings),
        *_accuracy_signal(base, current, settings),
        *_input_signals(base, current, settings),
    ]  # fmt: skip


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
    optional = ["correct", "format", *INPUT_STATS]
    names = dataset.schema.names
    columns = [*COLUMNS, *(extra or []), *(name for name in optional if name in names)]
    yield from dataset.to_batches(
        columns=columns,
        filter=condition,
        batch_size=65_536,
        batch_readahead=2,
        fragment_readahead=1,
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
        "**ALERT**" if result.alert else "No alert.",
        "",
        "| signal | value | threshold | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for signal in result.signals:
        verdict = "alert" if signal.alert else "ok"
        lines.append(f"| {signal.name} | {signal.value:.4f} | {signal.threshold:g} | {verdict} |")
    lines += ["", "| | reference | window |", "| --- | --- | --- |"]
    for key in ("rows", "errors"):
        lines.append(
            f"| {key} | {result.sides['reference'][key]} | {result.sides['window'][key]} |"
        )
    trend = result.trend
    labels = [str(night["run_id"]) for night in trend]
    series = {
        "Jensen-Shannon distance": [night["js_distance"] for night in trend],
        "low-confidence share": [night["low_confidence_share"] for night in trend],
        "error rate": [night["error_rate"] for night in trend],
        "estimated accuracy": [night["estimated_accuracy"] for night in trend],
    }
    atomic_write_text(
        folder / TREND_FILE, line_chart("The monitored nights", labels, series, top=1.0)
    )
    atomic_write_text(
        folder / CLASSES_FILE,
        bar_chart(
            f"Top classes: {result.window} against the reference",
            result.classes["names"],
            {"reference": result.classes["reference"], "window": result.classes["window"]},
        ),
    )
    lines += ["", f"![trend]({TREND_FILE})", "", f"![classes]({CLASSES_FILE})"]
    atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")
