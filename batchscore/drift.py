"""Drift statistics, pure: counts and histograms in, numbers out, no I/O.

The tests check each against scipy (which batchscore does not import):
- `js_distance`: scipy.spatial.distance.jensenshannon(p, q, base=2);
- `psi`: the population stability index, sum of (q - p) * ln(q / p) over bins, with empty
  bins floored at EPSILON so that a class seen on one side only counts instead of dividing by 0;
- `chi_square`: scipy.stats.chi2_contingency on the 2 x k table of counts (no correction);
- `ks_from_histograms`: the two-sample Kolmogorov-Smirnov statistic of two samples given as
  histograms on the same fine bins, and its asymptotic p-value (scipy's ks_2samp with
  method="asymp", up to the bins' resolution).
"""

from __future__ import annotations

import math

import numpy as np

EPSILON = 1e-4


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def js_distance(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, so 0..1) between two count vectors."""
    p, q = _shares(p_counts.astype(np.float64)), _shares(q_counts.astype(np.float64))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of `current` against `reference` (count vectors)."""
    p = np.maximum(_shares(reference.astype(np.float64)), EPSILON)
    q = np.maximum(_shares(current.astype(np.float64)), EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def chi_square(reference: np.ndarray, current: np.ndarray) -> tuple[float, float, int]:
    """(statistic, p-value, degrees of freedom) of the 2 x k contingency table; classes seen
    on neither side are left out."""
    table = np.vstack([reference, current]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0, 0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    dof = table.shape[1] - 1
    return statistic, chi2_sf(statistic, dof), dof


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    if x <= 0:
        return 1.0
    return _gamma_q(dof / 2, x / 2)


def _gamma_q(a: float, x: float) -> float:
    """Q(a, x) by the series (x < a + 1) or Lentz's continued fraction (Numerical Recipes)."""
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


def ks_from_histograms(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """(statistic, asymptotic p-value) of two samples binned on the same edges."""
    n, m = float(reference.sum()), float(current.sum())
    if n == 0 or m == 0:
        return 0.0, 1.0
    statistic = float(np.max(np.abs(np.cumsum(reference) / n - np.cumsum(current) / m)))
    return statistic, kolmogorov_sf(statistic * math.sqrt(n * m / (n + m)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution: 2 * sum (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x <= 0:
        return 1.0
    if x < 0.2:
        return 1.0  # the series converges slowly there, and the value is 1 to 1e-9
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-16:
            break
    return min(1.0, max(0.0, 2 * total))
