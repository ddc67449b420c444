"""Synthetic sweeps for the gate's tests: points with samples of a known median, written as records."""

from __future__ import annotations

import numpy as np

from harness.export import read_points


def write_side(tmp_path, name, synthetic_point, points):
    for i, kw in enumerate(points):
        synthetic_point(tmp_path / name / str(i), **kw)
    return read_points(tmp_path / name)


def noisy_samples(median: float, n: int = 20, spread: float = 0.02, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(median * (1 + spread * rng.uniform(-1, 1, n)))


def point_samples(tpot: float, ttft: float = 10.0, seed_data: int = 0, **kw) -> dict:
    return {"tpot": noisy_samples(tpot, seed=seed_data), "ttft": noisy_samples(ttft, seed=seed_data + 100), **kw}
