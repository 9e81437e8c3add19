"""Tests for scoring/stats.py: intervals and paired tests against scipy, Holm against a hand-computed example and its
step-down definition, Wilson against a hand-computed value and scipy."""

import math

import numpy as np
import pytest
import scipy.stats

from scoring import stats


def test_t_interval_is_the_student_t_interval():
    rng = np.random.default_rng(0)
    for n, level in ((2, 0.95), (5, 0.9), (30, 0.99)):
        x = rng.normal(3.0, 2.0, size=n)
        mean, half = stats.t_interval(x, level)
        assert mean == pytest.approx(x.mean())
        assert half == pytest.approx(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
        assert (mean - half, mean + half) == pytest.approx(scipy.stats.ttest_1samp(x, 0).confidence_interval(level))
    assert math.isnan(stats.t_interval([1.0])[1]) and math.isnan(stats.t_interval([])[0])


def test_paired_matches_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    for n in (2, 3, 10):
        a, b = rng.normal(1.0, 1.0, n), rng.normal(0.5, 1.0, n)
        got, ref = stats.paired(a, b), scipy.stats.ttest_rel(a, b)
        assert got["n"] == n and got["diff"] == pytest.approx(np.mean(a - b))
        assert got["t"] == pytest.approx(ref.statistic, rel=1e-12) and got["p"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert (got["diff"] - got["half"], got["diff"] + got["half"]) == pytest.approx(ref.confidence_interval(0.95))
    one = stats.paired([1.0], [0.5])
    assert one["diff"] == 0.5 and all(math.isnan(one[k]) for k in ("half", "t", "p"))
    with pytest.raises(ValueError, match="same seed"):
        stats.paired([1.0, 2.0], [1.0])


def test_holm_by_hand_and_by_its_step_down_definition():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]                             # 2 x 0.5 = 1, and capped
    assert stats.holm([]) == [] and stats.holm([0.2]) == [0.2]
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = rng.uniform(0, 0.1, size=rng.integers(1, 8))
        alpha, adjusted = 0.05, np.array(stats.holm(p))
        rejected, m = set(), len(p)                   # Holm 1979: reject the j-th smallest while p <= alpha / (m - j)
        for j, i in enumerate(np.argsort(p, kind="stable")):
            if p[i] > alpha / (m - j):
                break
            rejected.add(int(i))
        assert set(np.flatnonzero(adjusted <= alpha).tolist()) == rejected
        assert np.all(adjusted >= p) and np.all(adjusted <= np.array(stats.bonferroni(p)) + 1e-15)


def test_bonferroni_multiplies_by_the_count_and_caps_at_one():
    assert stats.bonferroni([0.01, 0.2, 0.6]) == pytest.approx([0.03, 0.6, 1.0])


def test_wilson_interval_by_hand_and_against_scipy():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.71672, half z sqrt(0.016 + z²/400) / (1 + z²/10)
    low, high = stats.wilson(8, 10)
    assert (low, high) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    for k, n, level in ((0, 10, 0.95), (3, 7, 0.9), (50, 50, 0.99), (137, 300, 0.95)):
        ref = scipy.stats.binomtest(k, n).proportion_ci(level, method="wilson")
        assert stats.wilson(k, n, level) == pytest.approx((ref.low, ref.high), rel=1e-12, abs=1e-15)
    assert stats.binomial_se(0.2, 100) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="wilson"):
        stats.wilson(3, 2)


def test_the_module_needs_no_torch():
    import subprocess
    import sys
    code = "import sys, scoring.stats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=stats.__file__.rsplit("/scoring/", 1)[0]).returncode == 0
