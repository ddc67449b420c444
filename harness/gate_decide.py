"""The gate's decision rules for one metric of one point: the rank tests, the thresholds as ratios, and the
words of each verdict. Pure functions of samples and values; ``harness.gate`` applies them to matched points.

A change beyond the threshold that a confirming test does not bear out is "unknown" and says it is inconclusive
(it needs more samples): absence of evidence is never reported as "no change".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu, wilcoxon

from harness.gate_settings import Metric
from harness.stats import median_ci

REGRESSION, IMPROVEMENT, NO_CHANGE, UNKNOWN = "regression", "improvement", "no change", "unknown"
VERDICTS = (REGRESSION, IMPROVEMENT, UNKNOWN, NO_CHANGE)  # also the order of severity in outputs


@dataclass
class Verdict:
    verdict: str
    reason: str
    base: float = math.nan
    cand: float = math.nan
    change: float = math.nan  # (cand - base) / base, or cand - base for absolute metrics
    p_value: float = math.nan
    base_ci: tuple[float, float] = (math.nan, math.nan)
    cand_ci: tuple[float, float] = (math.nan, math.nan)
    n_base: int = 0
    n_cand: int = 0
    mode: str = "samples"
    threshold: float = math.nan


def within(change: float, threshold: float) -> bool:
    """Whether a relative change is within the threshold as a ratio, either way: ``1/(1+t) <= ratio <= 1+t``.
    Symmetric in the logarithm, so TPOT x1.051 and tokens/s x1/1.051 (-4.9%), the same data, get one verdict."""
    if change <= -1:
        return False
    return abs(math.log1p(change)) <= math.log1p(threshold)


def min_p_value(n_base: int, n_cand: int | None = None) -> float:
    """The smallest two-sided p-value the rank test can give at these sample counts (exact, no ties): 2 / 2**n
    for the signed-rank test on n pairs, 2 / C(n_base + n_cand, n_base) for the U test. At or above alpha, no
    change can be significant, however large: the verdict is unknown, not no change."""
    if n_cand is None:
        return 2.0 / 2.0**n_base
    return 2.0 / math.comb(n_base + n_cand, n_base)


def _pairs_needed(alpha: float) -> int:
    return next(n for n in range(1, 64) if min_p_value(n) < alpha)


def _pct(x: float) -> str:
    return f"{x:+.1%}"


INCONCLUSIVE = "inconclusive, needs more samples"


def _inconclusive(v: Verdict, why: str) -> Verdict:
    """The median moved beyond the threshold but a confirming test did not agree: not evidence of no change."""
    v.verdict, v.reason = UNKNOWN, f"{why}: {INCONCLUSIVE}"
    return v


def decide_samples(
    x: Sequence[float],
    y: Sequence[float],
    higher_is_better: bool,
    threshold: float,
    alpha: float = 0.01,
    min_samples: int = 5,
    confidence: float = 0.95,
) -> Verdict:
    """Verdict for base samples ``x`` against candidate samples ``y`` (independent samples, e.g. one per
    repetition): U test, relative change of the medians, and non-overlap of the medians' CIs must all agree."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if min(x.size, y.size) < min_samples:
        return Verdict(
            UNKNOWN, f"too few samples ({x.size} vs {y.size}; need {min_samples})", n_base=x.size, n_cand=y.size
        )
    bx, cy = float(np.median(x)), float(np.median(y))
    p = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    blo, bhi, _ = median_ci(x, confidence)
    clo, chi, _ = median_ci(y, confidence)
    change = (cy - bx) / abs(bx) if bx else math.nan
    v = Verdict(NO_CHANGE, "", bx, cy, change, p, (blo, bhi), (clo, chi), x.size, y.size)
    worse = change < 0 if higher_is_better else change > 0
    apart = clo > bhi or chi < blo
    if not math.isfinite(change):
        v.verdict, v.reason = UNKNOWN, "base median is zero"
    elif within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%}"
    elif min_p_value(x.size, y.size) >= alpha:
        v.verdict = UNKNOWN
        v.reason = f"{_pct(change)} but {x.size} vs {y.size} samples cannot reach U test p < {alpha:g}"
    elif p >= alpha:
        _inconclusive(v, f"{_pct(change)} but U test p={p:.2g} >= {alpha:g}")
    elif not apart:
        _inconclusive(v, f"{_pct(change)} but the medians' CIs overlap")
    else:
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), p={p:.2g}, CIs apart"
    return v


def decide_paired(
    x: Sequence[float],
    y: Sequence[float],
    higher_is_better: bool,
    threshold: float,
    alpha: float = 0.01,
    min_samples: int = 5,
    confidence: float = 0.95,
) -> Verdict:
    """Verdict for base and candidate samples taken in turns (``x[i]`` and ``y[i]`` in the same round): the
    per-round ratios ``y[i] / x[i]`` cancel what the round shares (the machine's speed at that moment). The
    Wilcoxon signed-rank test on their logarithms, their median against the threshold, and the median ratio's
    CI excluding 1 must all agree."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if x.size < min_samples:
        return Verdict(UNKNOWN, f"too few paired samples ({x.size}; need {min_samples})", n_base=x.size,
                       n_cand=y.size, mode="paired")  # fmt: skip
    r = np.log(y / x)
    p = 1.0 if np.all(r == 0) else float(wilcoxon(r, alternative="two-sided").pvalue)
    nonzero = int(np.count_nonzero(r))  # the signed-rank test drops zero differences: they cannot reach alpha
    lo, hi, _ = median_ci(r, confidence)
    change = math.expm1(float(np.median(r)))
    blo, bhi, _ = median_ci(x, confidence)
    clo, chi, _ = median_ci(y, confidence)
    v = Verdict(NO_CHANGE, "", float(np.median(x)), float(np.median(y)), change, p, (blo, bhi), (clo, chi), x.size,
                y.size, mode="paired")  # fmt: skip
    worse = change < 0 if higher_is_better else change > 0
    ci = f"ratio CI [{math.exp(lo):.3f}, {math.exp(hi):.3f}]"
    if within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%} (paired by round)"
    elif min_p_value(nonzero) >= alpha:
        ties = f" ({x.size - nonzero} tied at zero)" if nonzero < x.size else ""
        v.verdict = UNKNOWN
        v.reason = (f"{_pct(change)} but {nonzero} paired samples{ties} cannot reach signed-rank p < {alpha:g} "
                    f"(it takes {_pairs_needed(alpha)})")  # fmt: skip
    elif p >= alpha:
        _inconclusive(v, f"{_pct(change)} but signed-rank p={p:.2g} >= {alpha:g} (paired by round)")
    elif lo <= 0 <= hi:
        _inconclusive(v, f"{_pct(change)} but the paired {ci} holds 1")
    else:
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), paired by round: p={p:.2g}, {ci}"
    return v


def decide_intervals(
    base: tuple[float, float, float], cand: tuple[float, float, float], higher_is_better: bool, threshold: float
) -> Verdict:
    """Verdict from (median, CI low, CI high) only, for tables exported without raw samples: the relative change
    and non-overlapping CIs must agree (no U test possible)."""
    (bx, blo, bhi), (cy, clo, chi) = base, cand
    if not all(math.isfinite(v) for v in (bx, blo, bhi, cy, clo, chi)) or not bx:
        return Verdict(UNKNOWN, "median or CI not measured", mode="table")
    change = (cy - bx) / abs(bx)
    v = Verdict(NO_CHANGE, "", bx, cy, change, base_ci=(blo, bhi), cand_ci=(clo, chi), mode="table")
    note = " (no raw samples: threshold and CIs only)"
    if within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%}{note}"
    elif not (clo > bhi or chi < blo):
        _inconclusive(v, f"{_pct(change)} but the medians' CIs overlap{note}")
    else:
        worse = change < 0 if higher_is_better else change > 0
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), CIs apart{note}"
    return v


def decide_value(base: float, cand: float, metric: Metric, threshold: float) -> Verdict:
    """One value per side: relative change (``scalar``) or absolute change (``absolute``) against the threshold."""
    mode = metric.kind
    if math.isnan(base) or math.isnan(cand):
        return Verdict(UNKNOWN, "not measured on one side", base, cand, mode=mode)
    if math.isinf(base) or math.isinf(cand):  # an infinite perplexity was measured: worse than any finite one
        v = Verdict(NO_CHANGE, "both infinite", base, cand, mode=mode, n_base=1, n_cand=1)
        if base != cand:
            v.change = math.inf if cand > base else -math.inf
            worse = (cand < base) if metric.higher_is_better else (cand > base)
            v.verdict, v.reason = (REGRESSION if worse else IMPROVEMENT), f"{base:.4g} -> {cand:.4g} (not finite)"
        return v
    if mode == "absolute":
        change, shown = cand - base, f"{cand - base:+.4g}"
        limit = f"{threshold:g}"
    else:
        change = (cand - base) / abs(base) if base else math.nan
        shown, limit = _pct(change), f"{threshold:.1%}"
    v = Verdict(NO_CHANGE, "", base, cand, change, n_base=1, n_cand=1, mode=mode)
    if not math.isfinite(change):
        v.verdict, v.reason = UNKNOWN, "base value is zero"
    elif within(change, threshold) if mode != "absolute" else abs(change) <= threshold:
        v.reason = f"{shown} within ±{limit}"
    else:
        worse = change < 0 if metric.higher_is_better else change > 0
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{shown} (threshold {limit}; one value per point, no test)"
    return v
