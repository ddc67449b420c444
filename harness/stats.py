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
from scipy import special as _special  # not scipy.stats: its import is most of a second of every run's start

NOISE_IQR_OVER_MEDIAN = 0.10
# a trend through the timed window: Spearman's test of value against repetition order at this level, and the
# second half's median this far from the first's (a warm-up that ended inside a slow transient, a machine whose
# speed moved): the median then stands for neither end
DRIFT_ALPHA = 0.01
DRIFT_HALVES_REL = 0.02
DRIFT_MIN_SAMPLES = 10
PERCENTILES = (50, 90, 95, 99)
# below this many samples none lies above the p99: it is an interpolation between the two largest, in effect
# the maximum, and says little about the tail (``p99_thin``)
P99_MIN_SAMPLES = 100
BOOTSTRAP_RESAMPLES = 1000


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
    ok = 2 * _special.bdtr(m, n, 0.5) <= alpha
    j = int(m[ok].max()) + 1 if ok.any() else 1
    k = n - j + 1
    coverage = float(1 - 2 * _special.bdtr(j - 1, n, 0.5))
    return float(x[j - 1]), float(x[k - 1]), coverage


def block_median_ci(x: np.ndarray, block: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """CI of the pooled median of samples that come in blocks of ``block`` consecutive values (the token gaps of
    one generation): a bootstrap that resamples whole blocks (repetitions), not single values.

    Gaps within one generation share its machine state and grow with position as attention reads more
    context, so they are not independent draws: an order-statistic CI over all of them would be several times
    too narrow. The independent unit is the repetition; with too few of them for ``median_ci`` to reach
    ``confidence`` over their medians, the whole range is returned with that coverage.
    """
    blocks = x.reshape(-1, block)
    nb = blocks.shape[0]
    _, _, unit_coverage = median_ci(np.median(blocks, axis=1), confidence)
    if unit_coverage < confidence - 1e-12:
        return float(x.min()), float(x.max()), unit_coverage
    rng = np.random.default_rng(0)  # a fixed stream: the same samples give the same interval
    picks = rng.integers(0, nb, size=(BOOTSTRAP_RESAMPLES, nb))
    step = max(1, 4_000_000 // x.size)  # resamples per batch: a few million values in memory at a time
    medians = np.concatenate([
        np.median(blocks[picks[i : i + step]].reshape(len(picks[i : i + step]), -1), axis=1)
        for i in range(0, BOOTSTRAP_RESAMPLES, step)
    ])  # fmt: skip
    alpha = 1.0 - confidence
    lo, hi = np.quantile(medians, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), confidence


def summarize(
    samples: Sequence[float], confidence: float = 0.95, block: int | None = None
) -> dict[str, float | int | bool]:
    """Everything the record and the table need about one metric's samples. ``block``: the samples come in
    blocks of that many consecutive values from one repetition (``block_median_ci``); the drift test then runs
    over the blocks' medians, since a within-block trend (later tokens attend more) is no drift."""
    x = np.asarray(samples, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"n": 0}
    blocked = block is not None and block > 1 and n % block == 0
    q = np.percentile(x, [25, 75, *PERCENTILES])
    median = float(q[2])
    lo, hi, coverage = block_median_ci(x, block, confidence) if blocked else median_ci(x, confidence)
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
        "p99_thin": n < P99_MIN_SAMPLES,
        **drift(np.median(x.reshape(-1, block), axis=1) if blocked else x),
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
    p = spearman_trend_p(x)
    drifting = bool(p < DRIFT_ALPHA and math.isfinite(ratio) and abs(ratio - 1) > DRIFT_HALVES_REL)
    return {"drift_halves_ratio": ratio, "drift_p": p, "drifting": drifting}


def spearman_trend_p(x: np.ndarray) -> float:
    """Two-sided p-value of Spearman's rho between ``x`` and its order, as ``scipy.stats.spearmanr`` gives it
    (ties take average ranks; Student's t with n - 2 degrees of freedom)."""
    n = x.size
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    rho = float(np.corrcoef(np.arange(n), ranks)[0, 1])
    if abs(rho) >= 1.0:
        return 0.0
    t = rho * math.sqrt((n - 2) / ((1.0 - rho) * (1.0 + rho)))
    return float(2 * _special.stdtr(n - 2, -abs(t)))


def ci_relative_halfwidth(lo: float, hi: float, median: float) -> float:
    """Half the CI width relative to the median: the precision target adaptive repetition drives down."""
    if not median or math.isnan(lo):
        return math.inf
    return (hi - lo) / 2.0 / abs(median)
