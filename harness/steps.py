"""Step detection over a history series: where a metric moved and stayed moved, and between which commits.

A series is one value per sweep in time order (the median of the point's raw samples for timed metrics) plus,
for timed metrics, those raw samples. Detection has two stages, so noise alone does not make steps:

1. **Locate.** The series (in log space for relative metrics) is median-filtered with a window of
   ``2 * min_run - 1`` sweeps, which removes excursions shorter than ``min_run`` sweeps (one slow run on a busy
   machine) and keeps the edges of longer ones, then fitted by a piecewise-constant function: the exact
   least-squares optimal partition (dynamic programming, as asv's penalized fit) in units of the series' own
   noise with a penalty per change, each segment at least ``min_run`` sweeps, changes only where the commit
   changes; each change is then moved to where the raw series splits best nearby.
2. **Confirm.** Each change must be at least the metric's minimum change (the gate's thresholds), at least
   ``z_min`` times the sweep-to-sweep noise (robust scales of the successive differences and of the residuals
   around the fitted levels, the larger; neither is inflated by the steps themselves), significant at
   ``alpha`` both between the per-sweep values of the two segments (Bonferroni over the positions) and on the
   pooled raw samples (Mann-Whitney U), and each side a level: at least ``level_share`` of
   its sweeps within ``level_band`` noise units of its median (a new level is consistent; a run of sweeps on a
   busy machine scatters). A change that fails is dropped and its segments merged, and the others are checked
   again, until every change left passes.

A change that lasts fewer than ``min_run`` sweeps (the newest sweeps included) is not a step yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu, norm

REGRESSION, IMPROVEMENT = "regression", "improvement"


@dataclass(frozen=True)
class StepSettings:
    """How a series is judged. ``min_change`` is relative (absolute when ``absolute``); ``min_noise`` floors the
    noise estimate (log units, or the metric's units when ``absolute``) so a flat series cannot make every
    wiggle infinitely significant."""

    min_change: float = 0.05
    absolute: bool = False
    higher_is_better: bool = False
    z_min: float = 3.5
    alpha: float = 0.001
    min_run: int = 3
    penalty: float | None = None  # per change, in squared noise units; None: 3 * ln(n)
    min_noise: float = 0.005
    level_share: float = 0.75  # of each side's sweeps within level_band noise units of the side's level
    level_band: float = 3.0


@dataclass
class Step:
    """A confirmed change: the new level starts at sweep ``index`` (the first bad one when a regression)."""

    index: int
    kind: str
    before: float  # median of the per-sweep values of the segment before
    after: float
    change: float  # relative ((after - before) / before), or absolute (after - before)
    z: float  # size in units of the sweep-to-sweep noise
    p_value: float  # the larger of the two tests' p-values
    n_before: int  # sweeps in the segments
    n_after: int

    @property
    def confidence(self) -> float:
        return 1.0 - self.p_value


def robust_sd(x: np.ndarray) -> float:
    """Biweight midvariance scale (Tukey; ~87% efficient on normal data, unmoved by a few wild values): steadier
    than the MAD on the 20 to 100 values of a series, so the noise is rarely underestimated."""
    x = np.asarray(x, dtype=float)
    if x.size < 2:
        return math.nan
    m = np.median(x)
    mad = np.median(np.abs(x - m))
    if mad == 0:
        return 0.0
    u = (x - m) / (9.0 * mad)
    w = np.abs(u) < 1
    num = math.sqrt(x.size * np.sum(((x - m) ** 2 * (1 - u**2) ** 4)[w]))
    den = abs(np.sum(((1 - u**2) * (1 - 5 * u**2))[w]))
    return float(num / den) if den else math.nan


def noise(y: np.ndarray) -> float:
    """Robust sweep-to-sweep standard deviation: of the successive differences, over sqrt(2) (NaN under 3
    values); a step is one wild difference among many, so it barely moves this."""
    d = np.diff(np.asarray(y, dtype=float))
    if d.size < 2:
        return math.nan
    return robust_sd(d) / math.sqrt(2)


def median_filter(y: np.ndarray, width: int) -> np.ndarray:
    """Running median; near the ends the window shifts inwards (so an odd sweep at either end is removed too)."""
    y = np.asarray(y, dtype=float)
    n, half = y.size, width // 2
    if width <= 1 or n < width:
        return y.copy()
    out = np.empty(n)
    for i in range(n):
        lo = min(max(0, i - half), n - width)
        out[i] = np.median(y[lo : lo + width])
    return out


def partition(y: np.ndarray, sigma: float, penalty: float, min_run: int, allowed: np.ndarray) -> list[int]:
    """Change positions of the least-squares optimal partition of ``y`` (cost in units of ``sigma``) with
    ``penalty`` per change, segments of at least ``min_run`` values; ``allowed[k]``: a change may start at k."""
    n = y.size
    cs = np.concatenate([[0.0], np.cumsum(y)])
    cs2 = np.concatenate([[0.0], np.cumsum(y * y)])
    best = np.full(n + 1, np.inf)
    best[0] = -penalty
    prev = np.zeros(n + 1, dtype=int)
    starts = np.arange(n + 1)
    ok_start = np.zeros(n + 1, dtype=bool)
    ok_start[0] = True
    ok_start[min_run : n - min_run + 1] = allowed[min_run : n - min_run + 1]
    for t in range(min_run, n + 1):
        if t < n and not (allowed[t] and t <= n - min_run):
            continue
        s = starts[: t - min_run + 1]
        s = s[ok_start[s] & np.isfinite(best[s])]
        if s.size == 0:
            continue
        length = t - s
        total = cs[t] - cs[s]
        cost = (cs2[t] - cs2[s] - total * total / length) / (sigma * sigma)
        c = best[s] + np.maximum(cost, 0.0) + penalty
        j = int(np.argmin(c))
        best[t], prev[t] = c[j], s[j]
    cuts, t = [], n
    while t > 0 and np.isfinite(best[t]):
        t = int(prev[t])
        if t > 0:
            cuts.append(t)
    return sorted(cuts)


def refine(y: np.ndarray, cuts: list[int], min_run: int, allowed: np.ndarray, cap: float) -> list[int]:
    """Each change moved (by up to ``min_run - 1``) to where the raw series splits best nearby: least deviation
    from the two sides' medians, each deviation capped at ``cap`` so that an odd sweep (which belongs to neither
    level) does not pull the change; it moves only when that puts at least half a ``cap`` less deviation in the
    wrong level. The median filter can shift an edge by a sweep or two when an odd sweep lies next to it."""
    cuts = list(cuts)
    for i, k in enumerate(cuts):
        a = cuts[i - 1] if i else 0
        b = cuts[i + 1] if i + 1 < len(cuts) else y.size

        def cost(j: int, a: int = a, b: int = b) -> float:
            sides = ((a, j), (j, b))
            return float(sum(np.minimum(np.abs(y[lo:hi] - np.median(y[lo:hi])), cap).sum() for lo, hi in sides))

        best, best_cost = k, cost(k)
        for j in range(max(a + min_run, k - min_run + 1), min(b - min_run, k + min_run - 1) + 1):
            if allowed[j] and j != k and cost(j) < best_cost - cap / 2:
                best, best_cost = j, cost(j)
        cuts[i] = best
    return cuts


def _check(
    k: int, a: int, b: int, values: np.ndarray, y: np.ndarray, sigma: float,
    samples: Sequence[Sequence[float]] | None, s: StepSettings,
) -> tuple[bool, Step]:  # fmt: skip
    """Whether the change at ``k`` between segments [a, k) and [k, b) passes every test, and the step."""
    before, after = float(np.median(values[a:k])), float(np.median(values[k:b]))
    change = after - before if s.absolute else (after - before) / abs(before) if before else math.inf
    dy = float(np.median(y[k:b]) - np.median(y[a:k]))
    n_before, n_after = k - a, b - k
    z = abs(dy) / sigma
    # medians of the segments: standard error sigma * sqrt(pi/2 * (1/n1 + 1/n2)) under normal noise
    # the change was chosen among every position of the series: Bonferroni over them
    p = min(1.0, float(2 * norm.sf(z / math.sqrt(math.pi / 2 * (1 / n_before + 1 / n_after)))) * (y.size - 1))
    if samples is not None:
        x1 = np.concatenate([np.asarray(v, dtype=float) for v in samples[a:k]])
        x2 = np.concatenate([np.asarray(v, dtype=float) for v in samples[k:b]])
        x1, x2 = x1[np.isfinite(x1)], x2[np.isfinite(x2)]
        p_raw = float(mannwhitneyu(x1, x2, alternative="two-sided").pvalue) if min(x1.size, x2.size) else 1.0
        p = max(p, p_raw)
    worse = (change < 0) if s.higher_is_better else (change > 0)
    step = Step(k, REGRESSION if worse else IMPROVEMENT, before, after, change, z, p, n_before, n_after)
    level = all(_level_share(y[i:j], sigma, s.level_band) >= s.level_share for i, j in ((a, k), (k, b)))
    return abs(change) > s.min_change and z >= s.z_min and p < s.alpha and level, step


def _level_share(y: np.ndarray, sigma: float, band: float) -> float:
    """Share of a side's sweeps near its level: a new level is consistent, a run of busy sweeps scatters."""
    return float(np.mean(np.abs(y - np.median(y)) <= band * sigma))


def detect(
    values: Sequence[float],
    samples: Sequence[Sequence[float]] | None = None,
    commits: Sequence[object] | None = None,
    settings: StepSettings | None = None,
) -> list[Step]:
    """Confirmed steps of one series, in order. ``values``: one per sweep, in time order (all finite, > 0 for
    relative metrics); ``samples``: the raw samples of each sweep (timed metrics); ``commits``: each sweep's
    commit, so that a step falls only between two commits (sweeps of the same commit are one side)."""
    s = settings or StepSettings()
    x = np.asarray(values, dtype=float)
    n = x.size
    if n < 2 * s.min_run or not np.isfinite(x).all() or (not s.absolute and (x <= 0).any()):
        return []
    if samples is not None and len(samples) != n:
        raise ValueError(f"samples: {len(samples)} sweeps, values: {n}")
    y = x if s.absolute else np.log(x)
    sigma = max(noise(y), s.min_noise)
    allowed = np.ones(n + 1, dtype=bool)
    if commits is not None:
        c = list(commits)
        allowed[1:n] = [c[k] != c[k - 1] for k in range(1, n)]
    penalty = s.penalty if s.penalty is not None else 3.0 * math.log(n)
    cuts = partition(median_filter(y, 2 * s.min_run - 1), sigma, penalty, s.min_run, allowed)
    cuts = refine(y, cuts, s.min_run, allowed, s.level_band * sigma)
    while True:
        bounds = [0, *cuts, n]
        # the noise around the fitted levels too: successive differences alone can underestimate it
        resid = np.concatenate([y[i:j] - np.median(y[i:j]) for i, j in zip(bounds, bounds[1:], strict=False)])
        level_noise = max(sigma, robust_sd(resid))
        checked = [_check(k, bounds[i], bounds[i + 2], x, y, level_noise, samples, s) for i, k in enumerate(cuts)]
        failing = [(step.z, i) for i, (ok, step) in enumerate(checked) if not ok]
        if not failing:
            return [step for _, step in checked]
        cuts.pop(min(failing)[1])  # drop the weakest failing change, merge its segments, check the rest again
