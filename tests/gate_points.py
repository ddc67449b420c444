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


def rekey(point_dir, env: dict | None = None, **identity) -> dict:
    """Change a written record's identity (and environment fields), with the point key that follows from it:
    e.g. an engine that gained a parameter at its default, or a point measured with another thread count."""
    import json
    from pathlib import Path

    from harness.records import RECORD_NAME, point_key, write_record

    rec = json.loads((Path(point_dir) / RECORD_NAME).read_text())
    rec["identity"].update(identity)
    rec["env"].update(env or {})
    rec["point_key"] = point_key(rec["identity"])
    write_record(point_dir, rec)
    return rec
