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
