"""Between-run noise for the gate (``harness compare --history PATH``): how far each point's median moves from one
stored sweep to another in the same environment, from the history database (``harness.history``).

The rank tests of an unpaired comparison see only the noise within each run; a whole run that is slower (clocks,
neighbours, another host of the same kind) moves every sample of one side together, and no test on the samples
can tell that from a regression. With a history, a timed metric of a point is a regression only when its change
exceeds ``noise_k`` (3) times the standard deviation of the log medians of that point (same ``point_key`` and
environment fingerprint) over its stored sweeps, as well as the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.gate_settings import GateInputError, Metric

MIN_SWEEPS = 3  # fewer stored medians give no usable spread: the threshold alone applies
MAX_SWEEPS = 20  # the newest ones: the runner's recent state
SOURCES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class Noise:
    """Run-to-run spread of each point's median: (point_key, fingerprint, sample source) -> (sigma of the log
    medians, number of stored sweeps)."""

    spread: dict[tuple[str, str, str], tuple[float, int]] = field(default_factory=dict)
    source: str = ""

    def get(self, row: Mapping[str, Any], metric: Metric) -> tuple[float, int] | None:
        return self.spread.get((str(row.get("point_key")), str(row.get("fingerprint")), metric.source))


def spread_of(points: pd.DataFrame, min_sweeps: int = MIN_SWEEPS) -> dict[tuple[str, str, str], tuple[float, int]]:
    """The spread of medians from a table of stored points (``harness.history.points``: ``samples.<m>`` lists,
    ``sweep_started_at``): ok points with representative timings only, the newest ``MAX_SWEEPS`` per point."""
    if points.empty:
        return {}
    ok = points["status"].eq("ok") & ~points["timing_representative"].astype(str).str.lower().eq("false")
    out: dict[tuple[str, str, str], tuple[float, int]] = {}
    for (key, fp), group in points[ok].groupby(["point_key", "fingerprint"], dropna=True):
        group = group.sort_values("sweep_started_at").tail(MAX_SWEEPS)
        for src in SOURCES:
            meds = [float(np.median(s)) for s in group.get(f"samples.{src}", []) if _usable(s)]
            if len(meds) >= min_sweeps:
                out[(str(key), str(fp), src)] = (float(np.std(np.log(meds), ddof=1)), len(meds))
    return out


def _usable(samples: Any) -> bool:
    return isinstance(samples, list) and len(samples) > 0 and all(isinstance(v, int | float) and v > 0 and
                                                                   math.isfinite(v) for v in samples)  # fmt: skip


def load_noise(path: str | Path) -> Noise:
    """The spread of every stored point in the history database at ``path``; GateInputError naming it when it
    cannot be read."""
    from harness import history

    try:
        conn = history.connect(path, create=False)
    except history.HistoryError as exc:
        raise GateInputError(f"--history: {exc}") from None
    try:
        return Noise(spread_of(history.points(conn, samples=SOURCES)), str(path))
    finally:
        conn.close()
