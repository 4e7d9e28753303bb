"""Classification metrics, pure: class-index arrays in, numbers out, no I/O.

They match scikit-learn's `accuracy_score`, `precision_recall_fscore_support(zero_division=0)`
and `confusion_matrix` (which stays a test oracle: batchscore never imports it); the Wilson
interval and the exact McNemar test are computed with the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

NO_PREDICTION = -1  # y_pred of an image that failed to decode, when errors count as wrong


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass(frozen=True)
class Metrics:
    """Classification metrics over the classes present in the labels or the predictions.

    `classes` holds class-map indices in class-map order; every per-class array and both axes
    of `confusion` (rows true, columns predicted) follow it.
    """

    classes: np.ndarray
    confusion: np.ndarray
    support: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    n: int
    n_correct: int

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n

    def macro_avg(self) -> dict[str, float]:
        return {
            "precision": float(np.average(self.precision)),
            "recall": float(np.average(self.recall)),
            "f1": float(np.average(self.f1)),
        }

    def weighted_avg(self) -> dict[str, float]:
        weights = self.support
        return {
            "precision": float(np.average(self.precision, weights=weights)),
            "recall": float(np.average(self.recall, weights=weights)),
            "f1": float(np.average(self.f1, weights=weights)),
        }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Metrics:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix.

    `y_true` holds class indices (>= 0); `y_pred` too, or NO_PREDICTION for an image that
    counts as wrong without predicting any class: it lowers accuracy and its true class's
    recall, but no class's precision, and has no cell in the confusion matrix.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError("y_true and y_pred must be non-empty 1-d arrays of the same length")
    if (y_true < 0).any() or (y_pred < NO_PREDICTION).any():
        raise ValueError("class indices must be >= 0 (y_pred: or NO_PREDICTION)")
    predicted = y_pred != NO_PREDICTION
    classes = np.union1d(y_true, y_pred[predicted])
    rows = np.searchsorted(classes, y_true)
    cols = np.searchsorted(classes, y_pred[predicted])
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (rows[predicted], cols), 1)
    true_positives = np.diagonal(confusion)
    support = np.bincount(rows, minlength=len(classes))
    predicted_sum = confusion.sum(axis=0)
    return Metrics(
        classes=classes,
        confusion=confusion,
        support=support,
        precision=_divide(true_positives, predicted_sum),
        recall=_divide(true_positives, support),
        f1=_divide(2 * true_positives, support + predicted_sum),
        n=len(y_true),
        n_correct=int((y_true == y_pred).sum()),
    )


@dataclass(frozen=True)
class MultiLabelMetrics:
    """Per-label and averaged metrics of a multi-label model, over the class map's labels.

    They match scikit-learn: per label `precision_recall_fscore_support(average=None,
    zero_division=0)`; micro the same with `average="micro"`; `macro_f1` is `f1_score(
    average="macro", zero_division=np.nan)` (a label neither present nor predicted has no F1
    and is left out, rather than counted as 0); `average_precision` per label is
    `average_precision_score`, and `mean_average_precision` their mean over the labels with at
    least one positive image (a label without one has no precision-recall curve);
    `exact_match` is `accuracy_score` (subset accuracy: every label right).
    """

    support: np.ndarray
    predicted: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    average_precision: np.ndarray | None  # NaN where a label has no positive image
    micro: dict[str, float]
    macro_f1: float | None
    n: int
    n_exact: int

    @property
    def exact_match(self) -> float:
        return self.n_exact / self.n

    @property
    def mean_average_precision(self) -> float | None:
        if self.average_precision is None or np.isnan(self.average_precision).all():
            return None
        return float(np.nanmean(self.average_precision))


def multilabel_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None
) -> MultiLabelMetrics:
    """`y_true`, `y_pred`: [images, labels] booleans; `scores`: the probabilities, or None."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or len(y_true) == 0:
        raise ValueError("y_true and y_pred must be non-empty [images, labels] arrays alike")
    tp = (y_true & y_pred).sum(axis=0)
    support, predicted = y_true.sum(axis=0), y_pred.sum(axis=0)
    defined = (support + predicted) > 0
    f1 = _divide(2 * tp, support + predicted)
    micro_tp, micro_true, micro_pred = int(tp.sum()), int(support.sum()), int(predicted.sum())
    ap = None
    if scores is not None:
        ap = np.array(
            [
                average_precision(y_true[:, j], scores[:, j]) if support[j] else np.nan
                for j in range(y_true.shape[1])
            ]
        )
    return MultiLabelMetrics(
        support=support,
        predicted=predicted,
        precision=_divide(tp, predicted),
        recall=_divide(tp, support),
        f1=f1,
        average_precision=ap,
        micro={
            "precision": micro_tp / micro_pred if micro_pred else 0.0,
            "recall": micro_tp / micro_true if micro_true else 0.0,
            "f1": 2 * micro_tp / (micro_true + micro_pred) if micro_true + micro_pred else 0.0,
        },
        macro_f1=float(f1[defined].mean()) if defined.any() else None,
        n=len(y_true),
        n_exact=int((y_true == y_pred).all(axis=1).sum()),
    )


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The area under the precision-recall curve as a step function (scikit-learn's
    `average_precision_score`): precision at each distinct score, weighted by the recall it
    adds. Tied scores are one threshold."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ranked, hits = np.asarray(scores, dtype=np.float64)[order], np.asarray(y_true)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_positives = np.cumsum(hits)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: sane at 0 and 1 and for small n, unlike
    the normal approximation."""
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(only_candidate_right: int, only_baseline_right: int) -> float:
    """Exact McNemar test: two-sided binomial test (p = 1/2) on the discordant pairs.

    Summed in integers, so it is exact for any count (no scipy needed): C(n, k) from math.comb,
    then each smaller coefficient from the one above, C(n, i-1) = C(n, i) * i / (n - i + 1),
    which keeps tens of thousands of discordant pairs fast.
    """
    n = only_candidate_right + only_baseline_right
    if n == 0:
        return 1.0
    k = min(only_candidate_right, only_baseline_right)
    term = tail = math.comb(n, k)
    for i in range(k, 0, -1):
        term = term * i // (n - i + 1)
        tail += term
    return min(1.0, float(Fraction(2 * tail, 2**n)))


@dataclass(frozen=True)
class PairedComparison:
    """The candidate against the baseline on the same images."""

    both_right: int
    only_candidate_right: int
    only_baseline_right: int
    both_wrong: int
    n_top1_changed: int  # among the images both models scored, whatever their label
    n_compared: int

    @property
    def mcnemar_p(self) -> float:
        return mcnemar_exact_p(self.only_candidate_right, self.only_baseline_right)

    @property
    def top1_changed_share(self) -> float:
        return self.n_top1_changed / self.n_compared if self.n_compared else 0.0

    @property
    def accuracy_drop(self) -> float:
        """Baseline accuracy minus candidate accuracy, as one exactly rounded ratio."""
        n = self.both_right + self.only_candidate_right + self.only_baseline_right
        n += self.both_wrong
        return (self.only_baseline_right - self.only_candidate_right) / n

    def as_dict(self) -> dict[str, Any]:
        return {
            "both_right": self.both_right,
            "only_candidate_right": self.only_candidate_right,
            "only_baseline_right": self.only_baseline_right,
            "both_wrong": self.both_wrong,
            "accuracy_drop": self.accuracy_drop,
            "mcnemar_p": self.mcnemar_p,
            "top1_changed": self.n_top1_changed,
            "top1_changed_share": self.top1_changed_share,
        }


def paired_comparison(
    candidate_correct: np.ndarray, baseline_correct: np.ndarray, n_top1_changed: int, n: int
) -> PairedComparison:
    cand = np.asarray(candidate_correct, dtype=bool)
    base = np.asarray(baseline_correct, dtype=bool)
    return PairedComparison(
        both_right=int((cand & base).sum()),
        only_candidate_right=int((cand & ~base).sum()),
        only_baseline_right=int((~cand & base).sum()),
        both_wrong=int((~cand & ~base).sum()),
        n_top1_changed=n_top1_changed,
        n_compared=n,
    )


# --- one model's evaluation and the gate --------------------------------------------------


CALIBRATION_BINS = 15


def reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """Equal-width confidence bins: each non-empty one's range, count, mean confidence and
    accuracy (sklearn's calibration_curve with strategy="uniform", plus the counts)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(mask.sum()),
                    "confidence": float(confidence[mask].mean()),
                    "accuracy": float(correct[mask].mean()),
                }
            )
    return table


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """Sum over the bins of (share of rows) x |accuracy - mean confidence|."""
    n = len(confidence)
    if n == 0:
        return 0.0
    return float(
        sum(
            r["n"] / n * abs(r["accuracy"] - r["confidence"])
            for r in reliability(confidence, correct, bins)
        )
    )


def brier_score(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Multi-class Brier score: the mean over rows of the squared distance between the
    probability vector and the one-hot truth (0 is perfect, 2 is the worst)."""
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(y_true)), y_true] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
