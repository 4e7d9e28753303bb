"""The canary gate: score a labelled set, measure the model, bless or block it.

Scoring is the ordinary job (`batchscore.score.score`, same sources, preprocessing, pipeline
and Parquet output); this module reads back only the columns it needs, measures with
`batchscore.metrics` and applies the gate. Showing the result (terminal table, canary.json,
report.md, heatmap) is `batchscore.report`'s job, called by whoever runs the canary.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchscore import storage
from batchscore.errors import ConfigError, OutputError, SourceError
from batchscore.files import output_errors
from batchscore.metrics import (
    NO_PREDICTION,
    Metrics,
    MultiLabelMetrics,
    PairedComparison,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    multilabel_metrics,
    paired_comparison,
    reliability,
    wilson_interval,
)
from batchscore.names import is_url, redact_url
from batchscore.output import STATUS_OK, read_metadata
from batchscore.score import score
from batchscore.scorer import NOT_FINITE
from batchscore.settings import BASELINE_PREFIX, DEFAULT_THRESHOLD, ScoreSettings
from batchscore.sources import open_sources

PREDICTIONS_FILE = "predictions.parquet"
LISTED_CLASSES = 10  # a failed class-recall check names at most this many classes
UNMEASURED_HEADS = {
    "embedding": "an embedding model has no classes to measure: the canary gates classifiers"
    " (compare two encoders' vectors with batchscore diff)",
}
LABEL_SEPARATOR = "|"  # a multi-label image's labels in a CSV or TXT cell: cat|dog
MULTI_LABEL_GATES = ("min_micro_f1", "min_macro_f1", "min_map")


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's metrics on the canary set, with the names its indices stand for."""

    model_file: str
    model_sha256: str
    class_names: tuple[str, ...]
    metrics: Metrics
    n_topk_correct: int
    top_k: int
    # Calibration, on the images with a prediction: None when no image had one (or, for the
    # Brier score, when the predictions were written without --no-probs' probability vectors).
    ece: float | None = None
    brier: float | None = None
    reliability: tuple[dict[str, float], ...] = ()

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def accuracy_ci(self) -> tuple[float, float]:
        return wilson_interval(self.metrics.n_correct, self.metrics.n)

    @property
    def topk_accuracy(self) -> float:
        return self.n_topk_correct / self.metrics.n

    @property
    def labels(self) -> list[str]:
        """Names of the classes present, in class-map order."""
        return [self.class_names[i] for i in self.metrics.classes]

    def per_class(self) -> dict[str, dict[str, float]]:
        m = self.metrics
        return {
            label: {
                "precision": float(m.precision[i]),
                "recall": float(m.recall[i]),
                "f1": float(m.f1[i]),
                "support": int(m.support[i]),
            }
            for i, label in enumerate(self.labels)
        }

    def recalls(self) -> list[tuple[str, float, int]]:
        """(class, recall, support) for each class present, for --min-class-recall."""
        m = self.metrics
        return [
            (label, float(m.recall[i]), int(m.support[i])) for i, label in enumerate(self.labels)
        ]

    def most_confused(self, limit: int = 10) -> list[tuple[str, str, int, float]]:
        """(true, predicted, count, share of the true class's predictions) for the largest
        off-diagonal cells, largest first."""
        confusion = self.metrics.confusion
        row_totals = confusion.sum(axis=1)
        off = confusion.copy()
        np.fill_diagonal(off, 0)
        rows, cols = np.nonzero(off)
        order = sorted(zip(rows, cols, strict=True), key=lambda rc: -off[rc])[:limit]
        labels = self.labels
        return [
            (labels[r], labels[c], int(off[r, c]), float(off[r, c] / row_totals[r]))
            for r, c in order
        ]

    def as_dict(self) -> dict[str, Any]:
        low, high = self.accuracy_ci
        return {
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "accuracy": self.accuracy,
            "accuracy_ci": [low, high],
            "n_correct": self.metrics.n_correct,
            "top_k": self.top_k,
            "topk_accuracy": self.topk_accuracy,
            "per_class": self.per_class(),
            "macro_avg": self.metrics.macro_avg(),
            "weighted_avg": self.metrics.weighted_avg(),
            "confusion_matrix": {
                "labels": self.labels,
                "matrix": self.metrics.confusion.tolist(),
            },
            "calibration": {
                "ece": self.ece,
                "brier": self.brier,
                "reliability": list(self.reliability),
            },
        }


@dataclass(frozen=True)
class MultiLabelEvaluation:
    """A multi-label model's metrics on the canary set: per label, micro and macro, and mAP.
    Its `accuracy` is the exact-match share (every label right), scikit-learn's
    `accuracy_score` on label sets."""

    model_file: str
    model_sha256: str
    class_names: tuple[str, ...]
    metrics: MultiLabelMetrics
    thresholds: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        return self.metrics.exact_match

    @property
    def accuracy_ci(self) -> tuple[float, float]:
        return wilson_interval(self.metrics.n_exact, self.metrics.n)

    def summary(self) -> dict[str, float | None]:
        """The averages a gate can hold the model to."""
        return {
            "micro_f1": self.metrics.micro["f1"],
            "macro_f1": self.metrics.macro_f1,
            "map": self.metrics.mean_average_precision,
        }

    def per_label(self) -> dict[str, dict[str, float | int | None]]:
        m = self.metrics
        ap = m.average_precision
        return {
            label: {
                "precision": float(m.precision[i]),
                "recall": float(m.recall[i]),
                "f1": float(m.f1[i]),
                "support": int(m.support[i]),
                "predicted": int(m.predicted[i]),
                "average_precision": None if ap is None or np.isnan(ap[i]) else float(ap[i]),
                "threshold": self.thresholds[i] if self.thresholds else None,
            }
            for i, label in enumerate(self.class_names)
        }

    def recalls(self) -> list[tuple[str, float, int]]:
        m = self.metrics
        return [
            (label, float(m.recall[i]), int(m.support[i]))
            for i, label in enumerate(self.class_names)
            if m.support[i]
        ]

    def as_dict(self) -> dict[str, Any]:
        low, high = self.accuracy_ci
        return {
            "head": "multi-label",
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "accuracy": self.accuracy,
            "accuracy_is": "exact match: every label of the image right",
            "accuracy_ci": [low, high],
            "n_exact": self.metrics.n_exact,
            "micro": self.metrics.micro,
            "macro_f1": self.metrics.macro_f1,
            "map": self.metrics.mean_average_precision,
            "per_label": self.per_label(),
        }


Evaluation = ModelEvaluation | MultiLabelEvaluation


@dataclass(frozen=True)
class Check:
    """One gate check; `value` is None when nothing was eligible (the check then passes)."""

    name: str  # the flag that asked for it, without dashes
    operator: str  # ">=" or "<=": what the value must be against the threshold to pass
    threshold: float
    value: float | None
    passed: bool
    detail: str = ""

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4f}"
        failed = {">=": "<", "<=": ">"}[self.operator]
        sense = self.operator if self.passed else failed
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name}: {value} {sense} {self.threshold:g}{detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "operator": self.operator,
            "threshold": self.threshold,
            "value": self.value,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class CanarySettings:
    """The scoring settings plus the gate. No gate threshold at all: report only."""

    score: ScoreSettings = field(default_factory=ScoreSettings)
    # None: predictions go to a temporary dir, no report; a URL: uploaded to that prefix
    report_dir: str | Path | None = None
    min_accuracy: float | None = None
    max_drop: float | None = None  # needs score.baseline_model
    require_significant: bool = False  # max_drop fails only when McNemar p < alpha
    alpha: float = 0.05
    min_class_recall: float | None = None
    min_support: int = 5  # classes with fewer images are not held to min_class_recall
    errors_count_as_wrong: bool = False
    # multi-label models only
    min_micro_f1: float | None = None
    min_macro_f1: float | None = None
    min_map: float | None = None


def check_canary_settings(settings: CanarySettings) -> None:
    """Flags that only make sense together, and thresholds out of range (exit 2)."""
    for name, value in (
        ("--min-accuracy", settings.min_accuracy),
        ("--max-drop", settings.max_drop),
        ("--min-class-recall", settings.min_class_recall),
        ("--min-micro-f1", settings.min_micro_f1),
        ("--min-macro-f1", settings.min_macro_f1),
        ("--min-map", settings.min_map),
    ):
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{name} must be between 0 and 1, got {value}")
    if not 0 < settings.alpha < 1:
        raise ConfigError(f"--alpha must be between 0 and 1 (exclusive), got {settings.alpha}")
    if settings.min_support < 1:
        raise ConfigError("--min-support must be at least 1")
    if settings.max_drop is not None and settings.score.baseline_model is None:
        raise ConfigError("--max-drop compares against a baseline: pass --baseline MODEL")
    if settings.require_significant and settings.max_drop is None:
        raise ConfigError("--require-significant qualifies --max-drop: pass --max-drop too")


def gate_checks(
    settings: CanarySettings,
    candidate: Evaluation,
    comparison: PairedComparison | None,
) -> list[Check]:
    """The checks the settings ask for, in flag order; an empty list means report only."""
    checks = []
    if settings.min_accuracy is not None:
        accuracy = candidate.accuracy
        checks.append(
            Check(
                "min-accuracy",
                ">=",
                settings.min_accuracy,
                accuracy,
                accuracy >= settings.min_accuracy,
            )
        )
    if settings.max_drop is not None and comparison is not None:
        drop = comparison.accuracy_drop
        too_big = drop > settings.max_drop
        p = comparison.mcnemar_p
        detail = f"McNemar p = {p:.4g}"
        if settings.require_significant:
            significant = p < settings.alpha
            detail += f", {'' if significant else 'not '}significant at alpha {settings.alpha:g}"
            too_big = too_big and significant
        checks.append(Check("max-drop", "<=", settings.max_drop, drop, not too_big, detail))
    if settings.min_class_recall is not None:
        checks.append(_class_recall_check(candidate, settings.min_class_recall, settings))
    if isinstance(candidate, MultiLabelEvaluation):
        values = candidate.summary()
        for name, key in (("min-micro-f1", "micro_f1"), ("min-macro-f1", "macro_f1"),
                          ("min-map", "map")):  # fmt: skip
            threshold = getattr(settings, name.replace("-", "_"))
            if threshold is not None:
                value = values[key]
                passed = value is not None and value >= threshold
                detail = "" if value is not None else "nothing to measure it on"
                checks.append(Check(name, ">=", threshold, value, passed, detail))
    return checks


def _class_recall_check(candidate: Evaluation, threshold: float, settings: CanarySettings) -> Check:
    eligible = [(c, r, n) for c, r, n in candidate.recalls() if n >= settings.min_support]
    if not eligible:
        detail = f"no class has {settings.min_support} or more images"
        return Check("min-class-recall", ">=", threshold, None, True, detail)
    failing = [
        f"{label} {recall:.4f} (n={n})" for label, recall, n in eligible if recall < threshold
    ]
    if len(failing) > LISTED_CLASSES:
        failing[LISTED_CLASSES:] = [f"and {len(failing) - LISTED_CLASSES} more"]
    detail = ", ".join(failing)
    lowest = min(recall for _, recall, _ in eligible)
    return Check("min-class-recall", ">=", threshold, lowest, not failing, detail)


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedImage:
    """An image that failed to decode, with its label and the reason."""

    path: str | None
    label: str | None
    error: str | None


@dataclass(frozen=True)
class CanaryResult:
    """Everything the canary found: the verdict, both models' metrics, what was left out."""

    candidate: Evaluation
    baseline: Evaluation | None
    comparison: PairedComparison | None
    checks: list[Check]
    n_images: int
    excluded_labels: dict[str, int]  # label -> images, for labels the class map lacks
    n_unlabelled: int  # images without any label (also excluded)
    errors: list[FailedImage]
    errors_count_as_wrong: bool
    report_dir: str | Path | None = None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed_checks(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    @property
    def n_scored(self) -> int:
        """Images in the metrics."""
        return self.candidate.metrics.n

    @property
    def n_excluded(self) -> int:
        return sum(self.excluded_labels.values()) + self.n_unlabelled

    def failure_message(self) -> str:
        failed = self.failed_checks
        lines = [f"canary gate failed ({len(failed)} of {len(self.checks)} checks):"]
        return "\n  ".join(lines + [check.line() for check in failed])

    def as_dict(self) -> dict[str, Any]:
        baseline = None
        if self.baseline is not None and self.comparison is not None:
            baseline = {**self.baseline.as_dict(), "comparison": self.comparison.as_dict()}
        return {
            "passed": self.passed,
            "checks": [check.as_dict() for check in self.checks],
            "n_images": self.n_images,
            "n_scored": self.n_scored,
            "n_errors": len(self.errors),
            "n_excluded": self.n_excluded,
            "n_unlabelled": self.n_unlabelled,
            "excluded_labels": self.excluded_labels,
            "errors_count_as_wrong": self.errors_count_as_wrong,
            **self.candidate.as_dict(),
            "baseline": baseline,
            "errors": [asdict(error) for error in self.errors],
        }


def run_canary(
    sources: Sequence[str | Path], settings: CanarySettings | None = None
) -> CanaryResult:
    """Score a labelled canary set with the ordinary job, then measure and gate the model.

    Folders are read in ImageFolder layout (label = first sub-folder); manifests need a
    `label` column. With `report_dir`, predictions.parquet is kept there (the caller writes
    the report beside it: `batchscore.report.write_report`), whatever the verdict. Raises
    ConfigError before scoring for contradictory settings or a set without labels, and after
    scoring when no image could be measured. A failed gate is not an exception here: see
    `result.passed`.
    """
    settings = settings or CanarySettings()
    check_canary_settings(settings)
    options = settings.score.storage_options
    report_dir = settings.report_dir
    if isinstance(report_dir, str) and storage.scheme(report_dir) in ("http", "https"):
        raise OutputError(
            f"--report {redact_url(report_dir)}: a web server is a source only; write to a"
            " bucket (s3://, gs://, az://) or a local folder"
        )
    opened = open_sources(sources, labelled_folders=True, storage_options=options)
    if not any(source.has_labels for source in opened):
        raise SourceError(
            "the canary set has no labels: pass folders in ImageFolder layout (one sub-folder"
            " per class) or manifests with a 'label' column"
        )
    score_settings = replace(settings.score, labelled_folders=True)
    remote = isinstance(report_dir, str) and is_url(report_dir)
    if report_dir is not None and remote:
        storage.check_reachable(str(report_dir), options)
    local = None if report_dir is None or remote else Path(report_dir)
    with _predictions_folder(local) as folder:
        predictions = folder / PREDICTIONS_FILE
        score(sources, predictions, score_settings)
        result = evaluate_predictions(predictions, settings)
        if remote:
            url = storage.join(str(report_dir), PREDICTIONS_FILE)
            storage.put_file(str(predictions), url, options)
    if settings.report_dir is not None:
        result = replace(result, report_dir=settings.report_dir)
    return result


@contextmanager
def _predictions_folder(report_dir: Path | None) -> Iterator[Path]:
    if report_dir is None:
        with tempfile.TemporaryDirectory(prefix="batchscore-canary-") as tmp:
            yield Path(tmp)
        return
    with output_errors(report_dir):
        report_dir.mkdir(parents=True, exist_ok=True)
    yield report_dir


def evaluate_predictions(predictions: Path, settings: CanarySettings) -> CanaryResult:
    """Metrics and gate from a predictions file written by `score` with labels (and, when it
    has `baseline_` columns, the baseline's class names in its metadata).

    An image counts when its label is in the class map (with a baseline: in both class maps,
    so both models are measured on exactly the same images) and it decoded, or when
    `errors_count_as_wrong` (then it is wrong for both models).
    """
    meta = read_metadata(predictions)
    if meta.get("head") in UNMEASURED_HEADS:
        raise ConfigError(UNMEASURED_HEADS[meta["head"]])
    head = meta.get("head", "softmax")
    baseline_head = meta.get("baseline_head", "softmax")
    if "baseline_class_map" in meta and (head == "multi-label") != (baseline_head == "multi-label"):
        raise ConfigError(
            f"the candidate is a {head} model and the baseline a {baseline_head} one: compare"
            " models of one kind"
        )
    if head == "multi-label":
        return _evaluate_multilabel(predictions, meta, settings)
    misplaced = [f"--{g.replace('_', '-')}" for g in MULTI_LABEL_GATES if getattr(settings, g)]
    if misplaced:
        raise ConfigError(
            f"{', '.join(misplaced)} gate multi-label models; this one predicts one class per"
            " image: use --min-accuracy or --min-class-recall"
        )
    models = [("", tuple(meta["class_map"]))]
    if "baseline_class_map" in meta:
        models.append((BASELINE_PREFIX, tuple(meta["baseline_class_map"])))
    columns = ["path", "status", "error", "label"]
    names_in_file = pq.read_schema(predictions).names
    for prefix, _ in models:
        columns += [f"{prefix}pred_index", f"{prefix}pred_label", f"{prefix}topk_labels"]
        columns += [c for c in (f"{prefix}pred_prob", f"{prefix}probs") if c in names_in_file]
    table = pq.read_table(predictions, columns=columns)

    labels: list[str | None] = table.column("label").to_pylist()
    ok = pc.equal(table.column("status"), STATUS_OK).to_numpy(zero_copy_only=False)
    indexes = [_index(names) for _, names in models]
    known = np.array(
        [label is not None and all(label in index for index in indexes) for label in labels],
        dtype=bool,
    )
    excluded = Counter(
        label for label, k in zip(labels, known, strict=True) if label is not None and not k
    )
    errors, rows = _counted(
        table, labels, known=known, ok=ok, settings=settings, unknown="have no label"
    )
    counted_labels = [str(labels[i]) for i in rows]
    taken = table.take(rows)
    evaluations = []
    correct = []
    for model, index in zip(models, indexes, strict=True):
        evaluation, right = _evaluate(taken, model, index, counted_labels, meta)
        evaluations.append(evaluation)
        correct.append(right)
    n_changed = 0
    if len(evaluations) > 1:
        changed = pc.and_(
            pc.not_equal(table.column("pred_label"), table.column(f"{BASELINE_PREFIX}pred_label")),
            pa.array(ok),
        )
        n_changed = int(pc.sum(changed).as_py() or 0)
    return _result(
        settings,
        evaluations,
        correct,
        n_changed=n_changed,
        ok=ok,
        labels=labels,
        excluded=excluded,
        errors=errors,
    )


def _counted(
    table: pa.Table,
    labels: list[str | None],
    *,
    known: np.ndarray,
    ok: np.ndarray,
    settings: CanarySettings,
    unknown: str,
) -> tuple[list[FailedImage], np.ndarray]:
    """The images that failed, and the rows the metrics count: a known label, and decoded (or
    errors count as wrong). A model that answered NaN or Inf failed that image: wrong,
    whatever errors usually count. Nothing to count is a configuration error; `unknown` says
    what the left-out images lack."""
    paths, reasons = table.column("path").to_pylist(), table.column("error").to_pylist()
    errors = [FailedImage(paths[i], labels[i], reasons[i]) for i in np.flatnonzero(~ok).tolist()]
    model_failed = np.array([reason == NOT_FINITE for reason in reasons], dtype=bool)
    counted = known & (ok | model_failed | settings.errors_count_as_wrong)
    if not counted.any():
        raise ConfigError(
            f"nothing to measure: of {len(labels)} images, {int((~known).sum())} {unknown}"
            f" in the model's class map and {len(errors)} failed to decode"
        )
    return errors, np.flatnonzero(counted)


def _result(
    settings: CanarySettings,
    evaluations: Sequence[Evaluation],
    correct: Sequence[np.ndarray],
    *,
    n_changed: int,
    ok: np.ndarray,
    labels: list[str | None],
    excluded: Counter[str],
    errors: list[FailedImage],
) -> CanaryResult:
    """The verdict on the candidate (`evaluations[0]`), paired with the baseline when there is
    one: `correct` says which counted images each got right, `n_changed` on how many of the
    images both scored (`ok`) their predictions differ."""
    candidate, comparison = evaluations[0], None
    if len(evaluations) > 1:
        comparison = paired_comparison(correct[0], correct[1], n_changed, int(ok.sum()))
    return CanaryResult(
        candidate=candidate,
        baseline=evaluations[1] if len(evaluations) > 1 else None,
        comparison=comparison,
        checks=gate_checks(settings, candidate, comparison),
        n_images=len(labels),
        excluded_labels=dict(excluded.most_common()),
        n_unlabelled=sum(1 for label in labels if label is None),
        errors=errors,
        errors_count_as_wrong=settings.errors_count_as_wrong,
    )


def label_set(text: str) -> tuple[str, ...] | None:
    """A multi-label image's labels from its manifest cell: a JSON list (`[]`: none of the
    labels), or names separated by `|` (CSV, TXT); None when a JSON list is malformed."""
    if not text.lstrip().startswith("["):
        return tuple(dict.fromkeys(p.strip() for p in text.split(LABEL_SEPARATOR) if p.strip()))
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return tuple(dict.fromkeys(value))


def _evaluate_multilabel(
    predictions: Path, meta: dict[str, Any], settings: CanarySettings
) -> CanaryResult:
    """`evaluate_predictions` for multi-label models: an image counts when all its labels are
    in the class map (of both models, with a baseline), with the same rules for errors."""
    models = [("", tuple(meta["class_map"]), meta.get("thresholds") or {})]
    if "baseline_class_map" in meta:
        baseline = (BASELINE_PREFIX, tuple(meta["baseline_class_map"]))
        models.append((*baseline, meta.get("baseline_thresholds") or {}))
    names_in_file = pq.read_schema(predictions).names
    columns = ["path", "status", "error", "label"]
    for prefix, _, _ in models:
        columns += [c for c in (f"{prefix}pred_labels", f"{prefix}probs") if c in names_in_file]
    table = pq.read_table(predictions, columns=columns)
    labels: list[str | None] = table.column("label").to_pylist()
    truths = [None if label is None else label_set(label) for label in labels]
    indexes = [_index(names) for _, names, _ in models]
    excluded: Counter[str] = Counter()
    known = np.zeros(len(labels), dtype=bool)
    for i, (label, truth) in enumerate(zip(labels, truths, strict=True)):
        if label is None:
            continue
        unknown = (
            [label] if truth is None else [t for t in truth if any(t not in x for x in indexes)]
        )
        excluded.update(unknown)
        known[i] = not unknown
    ok = pc.equal(table.column("status"), STATUS_OK).to_numpy(zero_copy_only=False)
    errors, rows = _counted(
        table, labels, known=known, ok=ok, settings=settings, unknown="have no labels, or some not"
    )
    evaluations: list[Evaluation] = []
    correct, predicted_sets = [], []
    for (prefix, names, thresholds), index in zip(models, indexes, strict=True):
        y_true = _indicator([truths[i] or () for i in rows], index)
        predicted = table.column(f"{prefix}pred_labels").take(pa.array(rows)).to_pylist()
        y_pred = _indicator([p or () for p in predicted], index)
        scores = None
        if f"{prefix}probs" in table.column_names:
            probs = table.column(f"{prefix}probs").take(pa.array(rows)).to_pylist()
            scores = np.array([p or [0.0] * len(names) for p in probs], dtype=np.float64)
        evaluations.append(
            MultiLabelEvaluation(
                model_file=str(meta[f"{prefix}model_file"]),
                model_sha256=str(meta[f"{prefix}model_sha256"]),
                class_names=names,
                metrics=multilabel_metrics(y_true, y_pred, scores),
                thresholds=tuple(float(thresholds.get(n, DEFAULT_THRESHOLD)) for n in names),
            )
        )
        correct.append((y_true == y_pred).all(axis=1))
        predicted_sets.append(
            [frozenset(p or ()) for p in table.column(f"{prefix}pred_labels").to_pylist()]
        )
    n_changed = 0
    if len(evaluations) > 1:
        n_changed = sum(
            1 for i in np.flatnonzero(ok) if predicted_sets[0][i] != predicted_sets[1][i]
        )
    return _result(
        settings,
        evaluations,
        correct,
        n_changed=n_changed,
        ok=ok,
        labels=labels,
        excluded=excluded,
        errors=errors,
    )


def _indicator(sets: Sequence[Sequence[str]], index: dict[str, int]) -> np.ndarray:
    """[images, classes] booleans: which of the class map's labels each image has."""
    matrix = np.zeros((len(sets), len(index)), dtype=bool)
    for row, names in enumerate(sets):
        matrix[row, [index[name] for name in names if name in index]] = True
    return matrix


def _evaluate(
    taken: pa.Table,
    model: tuple[str, tuple[str, ...]],
    index: dict[str, int],
    labels: list[str],
    meta: dict[str, Any],
) -> tuple[ModelEvaluation, np.ndarray]:
    """One model's metrics on the counted rows, and which of them it got right."""
    prefix, names = model
    y_true = np.array([index[label] for label in labels], dtype=np.int64)
    y_pred = pc.fill_null(taken.column(f"{prefix}pred_index"), NO_PREDICTION).to_numpy()
    topk = taken.column(f"{prefix}topk_labels").to_pylist()
    hits = sum(1 for label, top in zip(labels, topk, strict=True) if label in (top or ()))
    ece, brier, bins = _calibration(taken, prefix, y_true, y_pred)
    evaluation = ModelEvaluation(
        model_file=str(meta[f"{prefix}model_file"]),
        model_sha256=str(meta[f"{prefix}model_sha256"]),
        class_names=names,
        metrics=classification_metrics(y_true, y_pred),
        n_topk_correct=hits,
        top_k=min(int(meta["top_k"]), len(names)),
        ece=ece,
        brier=brier,
        reliability=bins,
    )
    return evaluation, y_true == y_pred


def _calibration(
    taken: pa.Table, prefix: str, y_true: np.ndarray, y_pred: np.ndarray
) -> tuple[float | None, float | None, tuple[dict[str, float], ...]]:
    """ECE, Brier score and the reliability table on the rows with a prediction."""
    if f"{prefix}pred_prob" not in taken.column_names:
        return None, None, ()
    predicted = y_pred != NO_PREDICTION
    if not predicted.any():
        return None, None, ()
    confidence = np.asarray(taken.column(f"{prefix}pred_prob").to_numpy(zero_copy_only=False))
    right = (y_true == y_pred)[predicted]
    ece = expected_calibration_error(confidence[predicted].astype(np.float64), right)
    bins = tuple(reliability(confidence[predicted].astype(np.float64), right))
    brier = None
    if f"{prefix}probs" in taken.column_names:
        rows = taken.column(f"{prefix}probs").to_pylist()
        probs = np.array([rows[i] for i in np.flatnonzero(predicted)], dtype=np.float64)
        brier = brier_score(probs, y_true[predicted])
    return ece, brier, bins


def _index(names: Sequence[str]) -> dict[str, int]:
    """Label -> class index; a name listed twice keeps its first index."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return index
