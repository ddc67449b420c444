"""Timers and the adaptive repetition loop.

Two clocks share one interface (``start()``, ``mark()`` per event, ``intervals_ms()`` after the run):

* ``HostClock`` reads ``time.perf_counter_ns`` (CPU work is synchronous, so host time is device time);
* ``CudaEventClock`` records preallocated CUDA events in the current stream and reads them after a single
  synchronize at the end of the repetition, so timing never stalls the launch queue.

``HostClock`` measures its own overhead (the interval between two marks with nothing between them) and
subtracts it from every interval, so the figures are the work's, not the timer's. ``CudaEventClock`` subtracts
nothing (as ``triton.testing.do_bench`` and ``torch.utils.benchmark``): an event costs the stream next to
nothing, and the gap between two events recorded back to back on an idle GPU is the host's time to submit one,
which a GPU-bound step (CUDA graphs) hides entirely; subtracting it would flatter exactly the fastest engines.
That host cost is kept as ``host_mark_ns``, a diagnostic.

``repeat`` warms up until timings are stable (compilation and autotuning finish during warm-up), then repeats
until the median's confidence interval is within the policy's target or the time budget ends. Every raw
sample is kept. ``repeat_in_turns`` times several warmed-up points one repetition each per round, so that drift
of the machine lands on all of them alike.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from harness.stats import ci_relative_halfwidth, drift, median_ci

CALIBRATION_MARKS = 2000


class HostClock:
    kind = "perf_counter_ns"

    def __init__(self) -> None:
        self._t: list[int] = []
        self.overhead_ns = 0.0
        self.overhead_ns = self._calibrate()

    def start(self) -> None:
        self._t.clear()
        self._t.append(time.perf_counter_ns())

    def mark(self) -> None:
        self._t.append(time.perf_counter_ns())

    def intervals_ns(self) -> np.ndarray:
        raw = np.diff(np.asarray(self._t, dtype=np.float64))
        return np.maximum(raw - self.overhead_ns, 0.0)

    def intervals_ms(self) -> np.ndarray:
        return self.intervals_ns() / 1e6

    def _calibrate(self) -> float:
        """Median interval between consecutive empty marks: the cost one mark adds to an interval."""
        best = math.inf
        for _ in range(5):
            self.start()
            for _ in range(CALIBRATION_MARKS):
                self.mark()
            best = min(best, float(np.median(np.diff(np.asarray(self._t, dtype=np.float64)))))
        return best


class CudaEventClock:
    kind = "cuda_event"

    def __init__(self, device: torch.device, max_marks: int = 4096) -> None:
        self.device = device
        with torch.cuda.device(device):
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(max_marks + 1)]
        self._i = 0
        self.overhead_ns = 0.0  # nothing is subtracted (module docstring)
        self.host_mark_ns = self._calibrate()

    def ensure_capacity(self, marks: int) -> None:
        while len(self._events) < marks + 1:
            self._events.append(torch.cuda.Event(enable_timing=True))

    def start(self) -> None:
        self._i = 0
        self._events[0].record()

    def mark(self) -> None:
        self._i += 1
        self._events[self._i].record()

    def intervals_ns(self) -> np.ndarray:
        torch.cuda.synchronize(self.device)
        ev = self._events[: self._i + 1]
        raw = np.array([a.elapsed_time(b) for a, b in zip(ev, ev[1:], strict=False)], dtype=np.float64) * 1e6
        return np.maximum(raw - self.overhead_ns, 0.0)

    def intervals_ms(self) -> np.ndarray:
        return self.intervals_ns() / 1e6

    def _calibrate(self) -> float:
        """Median gap between events recorded back to back on an idle stream: the host's cost of one record.
        The events are recorded once first, since torch creates a CUDA event on its first record."""
        marks = min(256, len(self._events) - 1)
        for _ in range(2):
            self.start()
            for _ in range(marks):
                self.mark()
            gaps = self.intervals_ns()
        return float(np.median(gaps))


def make_clock(device: torch.device) -> HostClock | CudaEventClock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()


@dataclass(frozen=True)
class Policy:
    """How long to warm up and how many repetitions to take (configs/measure/*.yaml)."""

    name: str = "default"
    warmup_iters: int = 2
    warmup_s: float = 0.5
    warmup_max_s: float = 60.0
    warmup_stable_rel: float = 0.10
    min_reps: int = 6  # the fewest samples whose median CI reaches 95% coverage
    max_reps: int = 200
    max_time_s: float = 30.0
    target_ci: float = 0.02
    confidence: float = 0.95
    disable_gc: bool = True
    # for the whole point (build, prepare, quality, warm-up, timing), recorded as timeout; timed in turns
    # (harness.interleave), the point's own phases and repetitions, not its waits while the group's others run
    timeout_s: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Repetitions:
    """The outcome of ``repeat``: raw samples per metric and how the loop ended."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    warmup_times_s: list[float] = field(default_factory=list)
    reps: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    converged: bool = False
    ci_rel_halfwidth: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        return d


RepFn = Callable[[int], dict[str, Any]]


def _run_rep(fn: RepFn, i: int, disable_gc: bool) -> tuple[dict[str, Any], float]:
    """One repetition with the cyclic garbage collector paused (its pauses land between repetitions)."""
    if disable_gc:
        gc.disable()
    t0 = time.perf_counter()
    try:
        out = fn(i)
    finally:
        if disable_gc:
            gc.enable()
    return out, time.perf_counter() - t0


def repeat(
    fn: RepFn,
    policy: Policy,
    converge_on: tuple[str, ...],
    timed_window: Callable[[], AbstractContextManager[Any]] | None = None,
    res: Repetitions | None = None,
) -> Repetitions:
    """Call ``fn(i)`` (one repetition, returning metric -> value or list of values) adaptively.

    Warm-up runs at least ``warmup_iters`` times (never fewer than two) and ``warmup_s`` seconds, and until
    two consecutive repetitions agree within ``warmup_stable_rel`` (or ``warmup_max_s`` passes: it cuts the wait
    for stability, never the minimum count). Timed repetitions stop when every metric in ``converge_on`` has a
    median CI at ``stop_confidence`` (0.975 for the usual 95%; achieved coverage, so never before 7 samples)
    whose half-width is within ``target_ci`` and samples that do not drift (after ``min_reps``), at
    ``max_reps``, or when ``max_time_s`` is spent. ``timed_window`` (a context manager factory, e.g. a
    utilization sampler and the peak-memory reset) is entered around the timed repetitions only. ``res``, when
    given, is filled in place, so a caller keeps the samples taken before an exception (a point's timeout).
    """
    res = Repetitions() if res is None else res
    warm_up(fn, policy, res)
    gc.collect()
    with timed_window() if timed_window is not None else nullcontext():
        _timed_loop(fn, policy, converge_on, res)
    return res


def warm_up(fn: RepFn, policy: Policy, res: Repetitions) -> None:
    """Run ``fn`` untimed until its repetition times are stable (see ``repeat``); their durations go to ``res``."""
    gc.collect()
    t_start = time.perf_counter()
    i = 0
    while True:
        _, dt = _run_rep(fn, -1 - i, policy.disable_gc)
        res.warmup_times_s.append(dt)
        i += 1
        if i < max(policy.warmup_iters, 2):
            continue  # the minimum always runs (stability needs two warm-ups to compare); no budget cuts it
        spent = time.perf_counter() - t_start
        if spent >= policy.warmup_max_s:
            break  # warmup_max_s only cuts the wait for stability
        if spent < policy.warmup_s:
            continue
        prev, last = res.warmup_times_s[-2:]
        if abs(last - prev) <= policy.warmup_stable_rel * prev:
            break


def _add_samples(res: Repetitions, out: dict[str, Any]) -> None:
    res.reps += 1
    for key, value in out.items():
        bucket = res.samples.setdefault(key, [])
        if isinstance(value, list | tuple | np.ndarray):
            bucket.extend(float(v) for v in value)
        else:
            bucket.append(float(value))


def stop_confidence(confidence: float) -> float:
    """The confidence the stop test uses: halfway from ``confidence`` to 1 (0.975 for 95%).

    Testing the width again and again and stopping the first time it is narrow enough picks a lucky interval:
    simulated (lognormal samples, ±2% target), the 95% interval read at the stop covered the true median
    93-94% of the time. Deciding on the 97.5% interval and reporting the 95% one brings it back to 94-96%, for
    about a third more repetitions.
    """
    return 1.0 - (1.0 - confidence) / 2.0


def _within_target(res: Repetitions, policy: Policy, converge_on: tuple[str, ...]) -> bool:
    """Update the CI half-widths of ``converge_on`` and say whether all are within the policy's target.

    The test is on the interval at ``stop_confidence``; ``ci_rel_halfwidth`` records the one at the policy's
    confidence (what the record reports). An interval whose achieved coverage is below the stop confidence (too
    few samples: median_ci then returns the whole range) is never within the target, however narrow it is, and
    neither is a metric whose samples drift through the window (``stats.drift``): its CI assumes samples that
    do not trend, so a narrow one says nothing, and more repetitions (or the budget's end) are what is left.
    """
    ok, strict = True, stop_confidence(policy.confidence)
    for key in converge_on:
        x = np.asarray(res.samples[key], dtype=float)
        median = float(np.median(x))
        lo, hi, _ = median_ci(x, policy.confidence)
        res.ci_rel_halfwidth[key] = ci_relative_halfwidth(lo, hi, median)
        slo, shi, coverage = median_ci(x, strict)
        narrow = coverage >= strict - 1e-12 and ci_relative_halfwidth(slo, shi, median) <= policy.target_ci
        ok = ok and narrow and not drift(x)["drifting"]
    return ok


def _timed_loop(fn: RepFn, policy: Policy, converge_on: tuple[str, ...], res: Repetitions) -> None:
    next_check = policy.min_reps
    t0 = time.perf_counter()
    while True:
        out, _ = _run_rep(fn, res.reps, policy.disable_gc)
        _add_samples(res, out)
        res.elapsed_s = time.perf_counter() - t0
        due = res.reps >= next_check or res.reps >= policy.max_reps or res.elapsed_s >= policy.max_time_s
        if due and res.reps >= policy.min_reps:
            # the CI costs a sort: check it at geometrically spaced counts so bookkeeping stays O(log n) per sample
            next_check = max(res.reps + 1, int(res.reps * 1.1))
            if _within_target(res, policy, converge_on):
                res.stop_reason, res.converged = "converged", True
                break
            if res.reps >= policy.max_reps:
                res.stop_reason = "max_reps"
                break
            if res.elapsed_s >= policy.max_time_s:
                res.stop_reason = "time_budget"
                break


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams design: orders of ``n`` points in which every point runs right after every other equally often
    (once over ``n`` rounds for even ``n``, twice over ``2n`` for odd) and in every position equally often. A
    plain rotation keeps the cyclic order, so with three or more points each runs after the same neighbour
    nearly always, and whatever one point leaves behind (caches, clocks) would bias its successor's ratio."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


def repeat_in_turns(
    fns: list[RepFn], policy: Policy, converge_on: tuple[str, ...], warmed: list[Repetitions]
) -> list[Repetitions | BaseException]:
    """Timed repetitions of several already warmed-up points taken in turns: one repetition of each per round.

    Drift of the machine (clock changes, other tenants) then lands on every point alike, so their ratios hold
    even where the absolute speed wanders between rounds. The order follows ``balanced_orders``: every point
    runs right after every other equally often. All points take the same number of rounds: the group stops when every
    point's CI is within the target (after ``min_reps``), at ``max_reps`` rounds, or when ``max_time_s`` per
    point (the group's budget is the points' budgets together) is spent. A point whose repetition raises leaves
    the rotation and its slot holds the exception (its samples so far stay in its ``warmed`` entry); the
    others go on.
    """
    out: list[Repetitions | BaseException] = list(warmed)
    active = list(range(len(fns)))
    budget_s = policy.max_time_s * len(fns)
    next_check, rounds = policy.min_reps, 0
    gc.collect()
    t0 = time.perf_counter()
    orders: list[list[int]] = []
    while active:
        if not orders or len(orders[0]) != len(active):  # first round, or a point left: the design of those left
            orders = balanced_orders(len(active))
        for k in (active[i] for i in orders[rounds % len(orders)]):
            res = out[k]
            assert isinstance(res, Repetitions)
            try:
                sample, _ = _run_rep(fns[k], res.reps, policy.disable_gc)
            except Exception as exc:
                out[k] = exc
                continue
            _add_samples(res, sample)
        active = [k for k in active if isinstance(out[k], Repetitions)]
        rounds += 1
        elapsed = time.perf_counter() - t0
        due = rounds >= next_check or rounds >= policy.max_reps or elapsed >= budget_s
        if not active or not due or rounds < policy.min_reps:
            continue
        next_check = max(rounds + 1, int(rounds * 1.1))
        within = [_within_target(out[k], policy, converge_on) for k in active]  # type: ignore[arg-type]
        reason = "converged" if all(within) else "max_reps" if rounds >= policy.max_reps else (
            "time_budget" if elapsed >= budget_s else None
        )  # fmt: skip
        if reason is None:
            continue
        for k, ok in zip(active, within, strict=True):
            res = out[k]
            assert isinstance(res, Repetitions)
            res.elapsed_s, res.stop_reason, res.converged = elapsed, reason, ok
        break
    return out


def measure_callable(
    fn: Callable[[], Any], policy: Policy, device: torch.device | None = None
) -> tuple[Repetitions, float]:
    """Time one call of ``fn`` per repetition (in ms) with the harness' clock; returns (reps, overhead ns)."""
    device = device or torch.device("cpu")
    clock = make_clock(device)

    def rep(_: int) -> dict[str, float]:
        clock.start()
        fn()
        clock.mark()
        return {"time_ms": float(clock.intervals_ms()[0])}

    return repeat(rep, policy, ("time_ms",)), clock.overhead_ns
