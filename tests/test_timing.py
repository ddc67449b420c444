"""Timers and adaptive repetition. Timing checks are ratios within one run, never absolute times."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from harness.stats import median_ci
from harness.timing import HostClock, Policy, Repetitions, _timed_loop, measure_callable, repeat, stop_confidence

FAST = Policy(
    name="test", warmup_iters=1, warmup_s=0.0, warmup_max_s=5, min_reps=5, max_reps=50, max_time_s=5, target_ci=0.05
)


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_host_clock_overhead_is_measured_and_subtracted():
    clock = HostClock()
    assert clock.overhead_ns > 0  # a perf_counter_ns call is never free
    work = []
    for _ in range(7):  # a trivial but real workload, timed raw in this run: the timer cost is a small part of it
        t0 = time.perf_counter_ns()
        busy(0.0005)
        work.append(time.perf_counter_ns() - t0)
    assert clock.overhead_ns < 0.1 * float(np.median(work))
    clock.start()
    for _ in range(100):
        clock.mark()
    empty = clock.intervals_ns()
    assert len(empty) == 100
    assert np.median(empty) < clock.overhead_ns  # empty intervals are timer cost only, and it is removed


def test_host_clock_intervals_follow_the_work():
    clock = HostClock()
    first, second = [], []
    for _ in range(15):
        clock.start()
        busy(0.002)
        clock.mark()
        busy(0.006)
        clock.mark()
        a, b = clock.intervals_ms()
        first.append(a)
        second.append(b)
    # each interval's minimum over the trials: preemption on a loaded machine only ever adds time, and it hits the
    # longer interval more often, which skews a median of per-trial ratios (it read 4 at a load of 3)
    assert 2.5 < min(second) / min(first) < 3.5


def test_repeat_stops_when_ci_target_is_met():
    policy = Policy(**{**FAST.__dict__, "min_reps": 8})
    res = repeat(lambda i: {"t": 1.0 + 1e-4 * (i % 3)}, policy, ("t",))
    assert res.converged and res.stop_reason == "converged" and res.reps == policy.min_reps
    assert res.ci_rel_halfwidth["t"] <= policy.target_ci


@pytest.mark.parametrize("min_reps", [1, 2, 5, 6])
def test_repeat_never_converges_on_an_interval_below_the_confidence(min_reps):
    # the stop test is on the 97.5% interval (stop_confidence): below 7 samples the median's CI is the whole
    # range with a lower coverage (6 samples: 96.9%; one sample: (x, x), coverage 0); however narrow, it is not
    # that interval, so the loop goes on to the first n that reaches the coverage
    policy = Policy(**{**FAST.__dict__, "min_reps": min_reps})
    res = repeat(lambda i: {"t": 1.0}, policy, ("t",))
    assert res.converged and res.stop_reason == "converged"
    assert res.reps == 7 and len(res.samples["t"]) == 7
    assert median_ci(res.samples["t"], stop_confidence(policy.confidence))[2] >= 0.975
    assert median_ci(res.samples["t"][:6], 0.975)[2] < 0.975


def test_the_stop_test_keeps_the_reported_interval_honest():
    # optional stopping: testing the width at every check and stopping at the first narrow one picks lucky
    # intervals; deciding on the 97.5% interval keeps the reported 95% one at (about) its coverage
    rng = np.random.default_rng(3)
    policy = Policy(**{**FAST.__dict__, "min_reps": 6, "max_reps": 200, "max_time_s": 60.0, "target_ci": 0.02})
    hits, trials = 0, 300
    for _ in range(trials):
        res = Repetitions()  # the timed loop alone: repeat's warm-up and collections would only cost time here
        _timed_loop(lambda i: {"t": float(rng.lognormal(0, 0.05))}, policy, ("t",), res)
        x = res.samples["t"]
        lo, hi, _ = median_ci(x, policy.confidence)
        hits += lo <= 1.0 <= hi  # the true median of lognormal(0, s) is 1
        if res.converged:  # what it stopped on: the stricter interval, within the target
            slo, shi, coverage = median_ci(x, stop_confidence(policy.confidence))
            assert coverage >= 0.975 and (shi - slo) / 2 / np.median(x) <= policy.target_ci
    assert hits / trials >= 0.93  # 95% nominal; 300 trials: the binomial's 2-sigma band is +-2.5%


def test_samples_that_drift_never_converge():
    # a steady trend through the window (from 10 samples, where the drift test runs): the median's CI is within
    # the target at the first check, but the median stands for neither end, so the loop goes on
    policy = Policy(**{**FAST.__dict__, "min_reps": 10, "max_reps": 40, "target_ci": 0.05})
    res = repeat(lambda i: {"t": 1.0 + 0.005 * i}, policy, ("t",))
    lo, hi, _ = median_ci(res.samples["t"][:10], stop_confidence(policy.confidence))
    assert (hi - lo) / 2 / np.median(res.samples["t"][:10]) <= policy.target_ci  # narrow enough at 10...
    assert res.stop_reason == "max_reps" and not res.converged and res.reps == 40  # ...yet never converged
    steady = repeat(lambda i: {"t": 1.0 + 0.005 * (i % 2)}, policy, ("t",))
    assert steady.converged and steady.reps == 10


def test_repeat_with_max_reps_below_the_coverage_is_not_converged():
    policy = Policy(**{**FAST.__dict__, "min_reps": 1, "max_reps": 4})
    res = repeat(lambda i: {"t": 1.0}, policy, ("t",))
    assert res.stop_reason == "max_reps" and res.reps == 4 and not res.converged


@pytest.mark.parametrize(("warmup_iters", "expected"), [(0, 2), (1, 2), (2, 2), (4, 4)])
def test_warmup_runs_its_minimum_even_when_the_budget_is_spent(warmup_iters, expected):
    # warmup_max_s only cuts the wait for stability: never fewer than max(warmup_iters, 2) warm-ups
    policy = Policy(**{**FAST.__dict__, "warmup_iters": warmup_iters, "warmup_max_s": 0.0})
    times = iter([0.02, 0.001, 0.01, 0.001, 0.01, 0.001])

    def rep(i):
        if i < 0:
            busy(next(times))  # unstable warm-ups: only the minimum count may end them
        return {"t": 1.0}

    res = repeat(rep, policy, ("t",))
    assert len(res.warmup_times_s) == expected


def test_repeat_stops_at_max_reps_on_noise():
    rng = np.random.default_rng(0)
    policy = Policy(**{**FAST.__dict__, "max_reps": 12, "target_ci": 1e-6})
    res = repeat(lambda i: {"t": float(rng.uniform(1, 2))}, policy, ("t",))
    assert res.stop_reason == "max_reps" and res.reps == 12 and not res.converged
    assert len(res.samples["t"]) == 12  # every raw sample kept


def test_repeat_stops_at_time_budget():
    policy = Policy(**{**FAST.__dict__, "max_reps": 10_000, "target_ci": 1e-9, "max_time_s": 0.2})
    rng = np.random.default_rng(1)

    def rep(i):
        busy(0.01)
        return {"t": float(rng.uniform(1, 2))}

    res = repeat(rep, policy, ("t",))
    assert res.stop_reason == "time_budget" and FAST.min_reps <= res.reps < 100


def test_warmup_absorbs_compilation_and_is_not_sampled():
    calls = []

    def rep(i):
        calls.append(i)
        busy(0.03 if len(calls) == 1 else 0.002)  # the first call "compiles"
        return {"t": 1.0, "list": [1.0, 2.0]}

    res = repeat(rep, FAST, ("t",))
    assert len(res.warmup_times_s) >= 2
    assert res.warmup_times_s[0] > 5 * res.warmup_times_s[-1]
    assert all(i < 0 for i in calls[: len(res.warmup_times_s)])  # warm-up reps are told apart
    assert len(res.samples["list"]) == 2 * res.reps  # list-valued metrics are extended


def test_warmup_waits_until_two_repetitions_agree():
    """A warm-up that speeds up over several calls (caches filling, a JIT tiering up): it goes on until two
    consecutive repetitions agree within warmup_stable_rel, so none of the slow calls is sampled."""
    from dataclasses import replace

    # quartering: no two consecutive ones agree within 10%, even when a scheduler slice (~16 ms on a loaded
    # machine) is added to the faster one of a pair
    slow = [0.16, 0.04, 0.01]
    calls = []

    def rep(i):
        calls.append(i)
        busy(slow[len(calls) - 1] if len(calls) <= len(slow) else 0.002)
        return {"t": 1.0}

    res = repeat(rep, replace(FAST, warmup_iters=2, warmup_s=0.0, warmup_stable_rel=0.1, warmup_max_s=30.0), ("t",))
    assert len(res.warmup_times_s) >= len(slow) + 1  # the slow ones, then two that agree
    assert all(i < 0 for i in calls[: len(slow)])


def test_measure_callable_ratio_tracks_work():
    small, _ = measure_callable(lambda: busy(0.001), FAST)
    large, overhead = measure_callable(lambda: busy(0.003), FAST)
    ratio = np.median(large.samples["time_ms"]) / np.median(small.samples["time_ms"])
    assert 2.5 < ratio < 3.5
    assert overhead > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_event_clock_times_device_work():
    from harness.timing import CudaEventClock

    dev = torch.device("cuda")
    clock = CudaEventClock(dev)
    a = torch.randn(2048, 2048, device=dev)
    a @ a  # warm-up: cuBLAS handle and workspace creation stay out of the first interval
    torch.cuda.synchronize(dev)
    clock.start()
    for _ in range(10):
        a @ a
    clock.mark()
    for _ in range(40):
        a @ a
    clock.mark()
    ten, forty = clock.intervals_ms()
    assert 2.5 < forty / ten < 6
