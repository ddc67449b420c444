"""Statistics against numpy/scipy on known samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.stats import ci_relative_halfwidth, median_ci, spearman_trend_p, summarize


@pytest.mark.parametrize("n", [6, 7, 10, 25, 50, 101, 1000])
def test_median_ci_matches_scipy_quantile_test(n):
    x = np.random.default_rng(n).lognormal(size=n)
    lo, hi, coverage = median_ci(x, 0.95)
    ci = sps.quantile_test(x, q=float(np.median(x)), p=0.5).confidence_interval(0.95)
    assert (lo, hi) == (ci.low, ci.high)
    assert coverage >= 0.95


@pytest.mark.parametrize("n", [10, 11, 40, 333])
@pytest.mark.parametrize("trend", [0.0, 0.003, 0.05, -0.05])
@pytest.mark.parametrize("decimals", [None, 1])
def test_drift_test_matches_scipy_spearmanr(n, trend, decimals):
    """The drift test's p-value is scipy.stats.spearmanr's (average ranks for ties, Student's t)."""
    x = np.random.default_rng(n).normal(size=n) + trend * np.arange(n)
    x = x if decimals is None else np.round(x, decimals)
    assert spearman_trend_p(x) == pytest.approx(sps.spearmanr(np.arange(n), x).pvalue, rel=1e-9, abs=1e-300)
    falling = np.arange(n, 0, -1.0)  # a perfect trend
    assert spearman_trend_p(falling) == pytest.approx(sps.spearmanr(np.arange(n), falling).pvalue, abs=1e-12)


def test_median_ci_coverage_is_exact_binomial():
    # n=10: [x(2), x(9)] covers the median with probability 1 - 2 * P(Bin(10, .5) <= 1) = 1 - 22/1024
    lo, hi, coverage = median_ci(list(range(10)))
    assert (lo, hi) == (1.0, 8.0)
    assert coverage == pytest.approx(1 - 22 / 1024)


def test_median_ci_with_too_few_samples_is_the_range_with_its_real_coverage():
    lo, hi, coverage = median_ci([3.0, 1.0, 2.0])
    assert (lo, hi) == (1.0, 3.0)
    assert coverage == pytest.approx(0.75)
    assert median_ci([])[2] == 0.0


@pytest.mark.parametrize(("n", "coverage"), [(1, 0.0), (2, 0.5), (5, 1 - 2 / 32), (6, 1 - 2 / 64)])
def test_median_ci_coverage_below_six_samples_misses_95_percent(n, coverage):
    # what adaptive repetition relies on to never call a sub-95% interval converged: 6 is the first n that reaches it
    lo, hi, got = median_ci(np.arange(n, dtype=float), 0.95)
    assert got == pytest.approx(coverage) and (got >= 0.95) == (n >= 6)
    assert (lo, hi) == (0.0, float(n - 1))


def test_summarize_matches_numpy():
    x = np.random.default_rng(0).gamma(2.0, 3.0, size=257)
    s = summarize(x)
    assert s["n"] == 257
    for p in (50, 90, 95, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(x, p))
    assert s["median"] == pytest.approx(np.median(x))
    assert s["mean"] == pytest.approx(x.mean())
    assert s["std"] == pytest.approx(x.std(ddof=1))
    assert (s["min"], s["max"]) == (x.min(), x.max())
    assert s["iqr"] == pytest.approx(sps.iqr(x))
    assert s["ci_low"] <= s["median"] <= s["ci_high"]
    assert s["ci_rel_halfwidth"] == pytest.approx((s["ci_high"] - s["ci_low"]) / 2 / s["median"])


def test_p99_of_fewer_than_100_samples_is_flagged_thin():
    """Under 100 samples none lies above the p99: it sits between the two largest, in effect the maximum."""
    x = np.random.default_rng(1).gamma(2.0, 3.0, size=99)
    thin = summarize(x)
    top2 = np.sort(x)[-2:]
    assert thin["p99_thin"] is True and top2[0] <= thin["p99"] <= top2[1]
    full = summarize(np.append(x, 1.0))
    assert full["p99_thin"] is False and (full["n"], np.sum(np.append(x, 1.0) > full["p99"])) == (100, 1)


def test_noise_flag_follows_iqr_over_median():
    steady = summarize([10.0, 10.1, 9.9, 10.0, 10.2, 9.8])
    assert steady["noisy"] is False
    noisy = summarize([10.0, 13.0, 7.0, 10.0, 14.0, 6.0])
    assert noisy["noisy"] is True


def test_drift_flag_marks_a_trend_through_the_window_not_noise_around_a_level():
    """A warm-up that ended inside a slow transient (30% decaying over ~10 repetitions): the timings trend, and
    their median stands for neither end. Noise of the same spread in no order is not drift."""
    rng = np.random.default_rng(0)
    k = np.arange(40)
    transient = 10 * (1 + 0.3 * np.exp(-k / 10)) * rng.lognormal(0, 0.01, k.size)
    out = summarize(transient.tolist())
    assert out["drifting"] is True and out["drift_p"] < 1e-6 and out["drift_halves_ratio"] < 0.95
    shuffled = summarize(rng.permutation(transient).tolist())
    assert shuffled["drifting"] is False and 0.95 < shuffled["drift_halves_ratio"] < 1.05
    steady = summarize((10 * rng.lognormal(0, 0.05, 40)).tolist())
    assert steady["drifting"] is False
    # a significant but tiny trend (0.5% over the window) is below the 2% that would move a verdict
    assert summarize((10 * (1 + 0.005 * k / 40) * rng.lognormal(0, 0.0005, 40)).tolist())["drifting"] is False
    assert summarize([1.0] * 9 + [2.0])["drifting"] is False and summarize([3.0] * 20)["drift_p"] is None


def test_degenerate_inputs():
    assert summarize([]) == {"n": 0}
    one = summarize([4.0])
    assert one["median"] == 4.0 and one["std"] == 0.0 and one["ci_coverage"] == 0.0
    assert math.isinf(ci_relative_halfwidth(math.nan, math.nan, 1.0))
