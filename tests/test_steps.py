"""Step detection on synthetic series with known levels and noise: noise alone (sweep-to-sweep spread, slow
sweeps on a busy machine, short excursions) makes no step; a sustained change is found at its commit, in the
right direction, with its size; every test of the confirmation stage can veto."""

from __future__ import annotations

import numpy as np
import pytest

from harness.steps import IMPROVEMENT, REGRESSION, StepSettings, detect, median_filter, noise

RNG_SEED = 20261123


def _series(rng, levels: np.ndarray, sigma: float, outliers: float = 0.0, reps: int = 10, within: float = 0.03):
    """Per-sweep medians around ``levels`` (log-normal sweep-to-sweep spread ``sigma``; a fraction ``outliers`` of
    sweeps 1.3-2x slower, as on a busy machine) and ``reps`` raw samples per sweep around each median."""
    sweep = levels * np.exp(rng.normal(0.0, sigma, levels.size))
    busy = rng.random(levels.size) < outliers
    sweep = np.where(busy, sweep * rng.uniform(1.3, 2.0, levels.size), sweep)
    samples = [m * np.exp(rng.normal(0.0, within, reps)) for m in sweep]
    return np.array([np.median(s) for s in samples]), samples


@pytest.mark.parametrize("sigma, outliers", [(0.01, 0.0), (0.03, 0.0), (0.08, 0.0), (0.03, 0.02), (0.08, 0.02)])
def test_noise_alone_makes_no_step(sigma, outliers):
    rng = np.random.default_rng(RNG_SEED)
    found = 0
    for _ in range(300):
        values, samples = _series(rng, np.full(40, rng.uniform(1.0, 50.0)), sigma, outliers)
        found += len(detect(values, samples))
    assert found == 0


def test_busy_sweeps_rarely_make_a_step():
    """One sweep in 20 on a busy machine (1.3-2x slower): only a run of three or more busy sweeps at a similar
    slowness could pass for a level, and that is rare."""
    rng = np.random.default_rng(RNG_SEED)
    flagged = sum(bool(detect(*_series(rng, np.full(40, 10.0), 0.03, 0.05))) for _ in range(300))
    assert flagged <= 3


@pytest.mark.parametrize("sigma, size", [(0.01, 0.15), (0.03, 0.30)])
def test_a_sustained_change_is_found_at_its_commit(sigma, size):
    rng = np.random.default_rng(RNG_SEED)
    exact = 0
    for _ in range(100):
        levels = np.r_[np.full(25, 10.0), np.full(15, 10.0 * (1 + size))]  # the change starts at sweep 25
        values, samples = _series(rng, levels, sigma, outliers=0.02)
        steps = detect(values, samples)
        assert len(steps) == 1 and steps[0].index in (24, 25)  # 24: a busy sweep just before looks like the new level
        s = steps[0]
        assert s.kind == REGRESSION and s.confidence > 0.999
        if s.index == 25:
            exact += 1
            assert abs(s.change - size) < size / 3 and (s.n_before, s.n_after) == (25, 15)
    assert exact >= 95


def test_regression_then_fix_and_direction():
    rng = np.random.default_rng(1)
    levels = np.r_[np.full(12, 20.0), np.full(8, 26.0), np.full(12, 20.0)]
    values, samples = _series(rng, levels, 0.02)
    steps = detect(values, samples)
    assert [(s.index, s.kind) for s in steps] == [(12, REGRESSION), (20, IMPROVEMENT)]
    assert steps[0].change == pytest.approx(0.3, abs=0.05) and steps[1].change == pytest.approx(-0.23, abs=0.05)
    # tokens/s: higher is better, so the same rise is an improvement
    rising = detect(values, samples, settings=StepSettings(higher_is_better=True))
    assert [s.kind for s in rising] == [IMPROVEMENT, REGRESSION]


@pytest.mark.parametrize("length, steps", [(1, 0), (2, 0), (3, 2)])
def test_excursions_shorter_than_min_run_are_not_steps(length, steps):
    values = np.full(30, 10.0) * np.exp(np.random.default_rng(2).normal(0, 0.01, 30))
    values[15 : 15 + length] *= 1.5
    samples = [v * np.exp(np.random.default_rng(i).normal(0, 0.02, 10)) for i, v in enumerate(values)]
    assert len(detect(values, samples)) == steps


def test_a_step_falls_only_between_commits():
    rng = np.random.default_rng(3)
    # each commit measured twice; the slowdown shows from the second run of commit 7 on (a noisy first run)
    commits = [c for c in range(15) for _ in range(2)]
    levels = np.r_[np.full(15, 10.0), np.full(15, 13.0)]
    values, samples = _series(rng, levels, 0.01)
    (step,) = detect(values, samples, commits)
    assert commits[step.index] != commits[step.index - 1] and step.index in (14, 16)
    (free,) = detect(values, samples)
    assert free.index == 15


def test_each_confirmation_test_can_veto():
    rng = np.random.default_rng(4)
    levels = np.r_[np.full(20, 10.0), np.full(20, 10.3)]  # +3%: significant, but below the gate's 5%
    values, samples = _series(rng, levels, 0.002, within=0.002)
    assert detect(values, samples) == []
    assert [s.index for s in detect(values, samples, settings=StepSettings(min_change=0.02))] == [20]
    # +10% in the per-sweep values, but raw samples so wide that the U test cannot tell the sides apart
    values = np.r_[np.full(4, 10.0), np.full(4, 11.0)] * np.exp(rng.normal(0, 0.002, 8))
    wide = [v * np.exp(rng.normal(0, 0.8, 3)) for v in values]
    assert detect(values, wide) == [] and len(detect(values)) == 1
    # +10.7% over three sweeps a side, but the sweeps scatter: between sweeps the change is not significant at
    # the Bonferroni-corrected level (z 3.7 against the noise), so no step, samples or not
    assert detect(np.array([9.8409, 9.7386, 9.9505, 10.8912, 11.0482, 10.8237])) == []


def test_single_value_metrics():
    memory = np.r_[np.full(10, 512.0), np.full(10, 640.0)]  # peak memory: one value per sweep, no samples
    (step,) = detect(memory, settings=StepSettings(min_change=0.10))
    assert step.index == 10 and step.change == pytest.approx(0.25)
    assert detect(np.full(20, 512.0)) == []
    top1 = np.r_[np.full(10, 0.99), np.full(10, 0.95)]  # agreement: an absolute drop, higher is better
    absolute = StepSettings(min_change=0.01, absolute=True, higher_is_better=True, min_noise=0.001)
    (drop,) = detect(top1, settings=absolute)
    assert drop.kind == REGRESSION and drop.change == pytest.approx(-0.04)
    assert detect(np.r_[np.full(10, 0.99), np.full(10, 0.985)], settings=absolute) == []


def test_helpers_and_short_series():
    y = np.array([1.0, 1.0, 5.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    assert list(median_filter(y, 3)) == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # spike gone, edge kept
    assert noise(np.array([1.0])) != noise(np.array([1.0])) and noise(np.full(5, 2.0)) == 0.0
    assert detect([10.0] * 3 + [20.0] * 2) == []  # too short to judge
    assert detect([10.0, np.nan] * 5) == []
