"""
The statistics every published nanoCEP number goes through (numpy and scipy only, no torch): Student-t intervals of a
mean over seeds, paired differences between two cells run on the same seeds, Holm and Bonferroni adjustments when
several endpoints are tested at once, and the Wilson interval of a share (e.g. the memorized share of N samples).

Nothing to run; sweep.py and tools/results.py import it. tests/test_stats.py checks it against scipy.
"""
import math

import numpy as np
from scipy import stats


def t_interval(values, level: float = 0.95) -> tuple:
    """(mean, half-width) of the Student-t confidence interval of the mean; half-width nan below 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def paired(a, b, level: float = 0.95) -> dict:
    """The paired difference a - b (a[i], b[i] from the same seed): {"diff": mean, "half": t-interval half-width,
    "t": statistic, "p": two-sided p-value, "n": pairs}; the paired t-test of scipy.stats.ttest_rel."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.shape} values against {b.shape}; each needs its partner from the same seed")
    d = a - b
    mean, half = t_interval(d, level)
    t = p = math.nan
    if len(d) >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):       # identical pairs: t = ±inf or nan, as scipy's
            t = float(np.float64(mean) / (d.std(ddof=1) / math.sqrt(len(d))))
        p = float(2 * stats.t.sf(abs(t), len(d) - 1)) if not math.isnan(t) else math.nan
    return {"diff": mean, "half": half, "t": t, "p": p, "n": int(len(d))}


def holm(pvalues) -> list:
    """Holm-Bonferroni step-down adjusted p-values, in the input order: the i-th smallest p times (m - i + 1), made
    non-decreasing along the sorted order and capped at 1. Reject where adjusted p <= alpha (family-wise error alpha)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted.tolist()


def bonferroni(pvalues) -> list:
    """Bonferroni adjusted p-values: each p times the number of tests, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    return np.minimum(1.0, len(p) * p).tolist()


def wilson(k: int, n: int, level: float = 0.95) -> tuple:
    """(low, high): the Wilson score interval of a binomial share k/n; unlike p ± z·se it stays inside [0, 1] and is
    not empty at k = 0 or k = n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = stats.norm.ppf(0.5 + level / 2)
    share = k / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def binomial_se(p: float, n: int) -> float:
    """The standard error of a share p measured on n independent draws, sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)
