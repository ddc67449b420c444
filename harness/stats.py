"""Summary statistics of timing samples.

Latency distributions are skewed and heavy-tailed, so the centre is the median and its uncertainty is a
distribution-free confidence interval from order statistics (the binomial method: the true median lies between
the j-th and k-th smallest samples with probability >= the confidence level). Percentiles use linear
interpolation, as numpy's default does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _sps

NOISE_IQR_OVER_MEDIAN = 0.10
# a trend through the timed window: Spearman's test of value against repetition order at this level, and the
# second half's median this far from the first's (a warm-up that ended inside a slow transient, a machine whose
# speed moved): the median then stands for neither end
DRIFT_ALPHA = 0.01
DRIFT_HALVES_REL = 0.02
DRIFT_MIN_SAMPLES = 10
PERCENTILES = (50, 90, 95, 99)


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Order-statistic CI of the median: (low, high, achieved coverage).

    The interval [x_(j), x_(k)] is the narrowest symmetric one whose coverage is at least ``confidence``.
    With too few samples to reach it (n < 6 at 95%) the whole range is returned with its actual coverage.
    """
    x = np.sort(np.asarray(samples, dtype=float))
    n = x.size
    if n == 0:
        return math.nan, math.nan, 0.0
    if n == 1:
        return float(x[0]), float(x[0]), 0.0
    alpha = 1.0 - confidence
    # coverage of [x_(j), x_(n-j+1)] is 1 - 2 * P(Bin(n, 1/2) <= j - 1); take the largest j that keeps it
    m = np.arange(0, (n + 1) // 2)
    ok = 2 * _sps.binom.cdf(m, n, 0.5) <= alpha
    j = int(m[ok].max()) + 1 if ok.any() else 1
    k = n - j + 1
    coverage = float(1 - 2 * _sps.binom.cdf(j - 1, n, 0.5))
    return float(x[j - 1]), float(x[k - 1]), coverage


def summarize(samples: Sequence[float], confidence: float = 0.95) -> dict[str, float | int | bool]:
    """Everything the record and the table need about one metric's samples."""
    x = np.asarray(samples, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"n": 0}
    q = np.percentile(x, [25, 75, *PERCENTILES])
    median = float(q[2])
    lo, hi, coverage = median_ci(x, confidence)
    iqr = float(q[1] - q[0])
    out: dict[str, float | int | bool] = {
        "n": n,
        "median": median,
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if n > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "iqr": iqr,
        "ci_low": lo,
        "ci_high": hi,
        "ci_coverage": coverage,
        "ci_rel_halfwidth": ci_relative_halfwidth(lo, hi, median),
        "noisy": bool(median > 0 and iqr / median > NOISE_IQR_OVER_MEDIAN),
        **drift(x),
    }
    for p, v in zip(PERCENTILES, q[2:], strict=True):
        out[f"p{p}"] = float(v)
    return out


def drift(x: np.ndarray) -> dict[str, float | bool | None]:
    """Whether samples (in the order taken) trend: ``drift_halves_ratio`` is the second half's median over the
    first's, ``drift_p`` Spearman's p-value of value against order; ``drifting`` when both say so."""
    if x.size < DRIFT_MIN_SAMPLES or np.all(x == x[0]):
        return {"drift_halves_ratio": None, "drift_p": None, "drifting": False}
    half = x.size // 2
    first, second = float(np.median(x[:half])), float(np.median(x[-half:]))
    ratio = second / first if first else math.nan
    p = float(_sps.spearmanr(np.arange(x.size), x).pvalue)
    drifting = bool(p < DRIFT_ALPHA and math.isfinite(ratio) and abs(ratio - 1) > DRIFT_HALVES_REL)
    return {"drift_halves_ratio": ratio, "drift_p": p, "drifting": drifting}


def ci_relative_halfwidth(lo: float, hi: float, median: float) -> float:
    """Half the CI width relative to the median: the precision target adaptive repetition drives down."""
    if not median or math.isnan(lo):
        return math.inf
    return (hi - lo) / 2.0 / abs(median)
