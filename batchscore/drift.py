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


# ---------------------------------------------------------------- significance (the noise model)
# Each signal of `batchscore monitor` gets a p-value: how often a night drawn from the
# reference's own distribution, at tonight's size, would look at least this different. The
# tests check each against scipy (chi2_contingency on pooled columns, fisher_exact,
# statsmodels-free two-proportion z, false_discovery_control / Holm by hand).

MIN_EXPECTED = 5.0  # the chi-square approximation's usual rule, per cell


def pooled(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two count vectors with every category too rare for the chi-square approximation
    (an expected count below MIN_EXPECTED on either side) merged into one "other" column:
    1,000 classes and a night of 200 images leave most cells with a fraction of a row."""
    total = reference.sum() + current.sum()
    if total == 0:
        return reference[:0], current[:0]
    columns = reference + current
    smaller_side = min(reference.sum(), current.sum())
    common = columns * smaller_side / total >= MIN_EXPECTED
    ref = np.append(reference[common], reference[~common].sum())
    cur = np.append(current[common], current[~common].sum())
    keep = (ref + cur) > 0
    return ref[keep], cur[keep]


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def rise_p_value(hits_ref: int, n_ref: int, hits_cur: int, n_cur: int) -> float:
    """One-sided p-value that the current share of hits is above the reference's: Fisher's
    exact test when a cell is small, else the pooled two-proportion z-test."""
    if n_ref == 0 or n_cur == 0:
        return 1.0
    hits = hits_ref + hits_cur
    n = n_ref + n_cur
    expected = min(hits, n - hits) * min(n_ref, n_cur) / n
    if expected < MIN_EXPECTED:
        return _fisher_greater(hits_cur, n_cur, hits, n)
    share = hits / n
    spread = math.sqrt(share * (1 - share) * (1 / n_ref + 1 / n_cur))
    return normal_sf((hits_cur / n_cur - hits_ref / n_ref) / spread) if spread else 1.0


def _fisher_greater(hits_cur: int, n_cur: int, hits: int, n: int) -> float:
    """P(X >= hits_cur) for X hypergeometric: `n_cur` drawn from `n` rows of which `hits` hit."""
    top = min(hits, n_cur)
    if hits_cur > top:
        return 0.0

    def log_pmf(k: int) -> float:
        return _log_choose(hits, k) + _log_choose(n - hits, n_cur - k) - _log_choose(n, n_cur)

    return min(1.0, sum(math.exp(log_pmf(k)) for k in range(hits_cur, top + 1)))


def _log_choose(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting those below alpha keeps the chance of any
    false alarm among them at most alpha, however the tests depend on each other."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
