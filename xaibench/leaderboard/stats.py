"""Statistics of leaderboards: seeded bootstrap confidence intervals of a mean, paired Wilcoxon
signed-rank tests and Holm's step-down correction of a family of p-values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def bootstrap_ci(
    values: np.ndarray, seed: int = 0, resamples: int = 9999, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI (low, high) of the mean of ``values`` (finite values only):
    ``scipy.stats.bootstrap`` with ``method="percentile"``, ``resamples`` resamples drawn by
    ``numpy.random.default_rng(seed)``, a fresh generator per call, so a group's interval does
    not depend on which other groups were computed. NaN for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    result = stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class PairedTest:
    """A two-sided Wilcoxon signed-rank test of paired values a - b (``n`` pairs, zero
    differences dropped as ``zero_method="wilcox"`` does); ``p`` NaN with a ``reason`` where
    the test is undefined. ``mean_difference`` = mean(a - b)."""

    n: int
    statistic: float
    p: float
    mean_difference: float
    reason: str = ""


def paired_wilcoxon(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """``scipy.stats.wilcoxon(a, b)`` on the pairs where both values are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = len(a)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, "no shared instances with values")
    difference = float(np.mean(a - b))
    if np.all(a == b):
        return PairedTest(n, math.nan, math.nan, difference, "all paired differences are zero")
    result = stats.wilcoxon(a, b)
    return PairedTest(n, float(result.statistic), float(result.pvalue), difference)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family: with the m finite p-values sorted
    p(1) <= ... <= p(m), adjusted p(i) = max over j <= i of min(1, (m - j + 1) p(j)).
    NaN entries stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
