"""Dashboard at scale: store 100 sweeps of 50 points in a history database, build the dashboard, and print the
build time and the page's size.

The points are real records: a small real `tiny` sweep is run once (or ``--source`` names an existing sweep),
and its records are copied into 50 points per sweep with their identity varied as benchmarks/report_scale.py
does (model, variant, batch size; point key recomputed; timings scaled consistently). Each of the 100 sweeps
gets its own commit SHA, a start time an hour after the previous one, and its own sweep-to-sweep noise (2%
log-normal on every timing); from sweep 60 on, one variant is 20% slower, so step detection has one commit to
name. `harness history add` stores the sweeps, then `harness dashboard` builds the site. Targets on a 2-core
CPU: `harness dashboard` under 20 s and its page under 25 MB.

    python benchmarks/dashboard_scale.py [--sweeps 100] [--points 50] [--source SWEEP_DIR]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_scale import MODELS, TIME_STATS, VARIANTS, read_records, real_sweep, vary  # noqa: E402

from harness.progress import write_sweep_meta  # noqa: E402
from harness.records import RECORD_NAME, SCHEMA_VERSION  # noqa: E402

SLOW_VARIANT, SLOW_FROM, SLOWDOWN = "quantized(scheme=int8_dynamic)", 60, 0.20
NOISE = 0.02
BATCHES = (1, 8)
START = datetime(2026, 9, 1, tzinfo=UTC)


def scaled(rec: dict[str, Any], factor: float) -> dict[str, Any]:
    """The record with every timing multiplied by ``factor`` (samples, summaries, throughput)."""
    rec = copy.deepcopy(rec)
    rec["samples"] = {k: [v * factor for v in vs] for k, vs in rec["samples"].items()}
    for stats in rec["summary"].values():
        for key in TIME_STATS:
            if stats.get(key) is not None:
                stats[key] *= factor
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "output_tokens_per_s", "mbu", "mfu"):
        if rec["metrics"].get(key) is not None:
            rec["metrics"][key] /= factor
    return rec


def commit(i: int) -> str:
    return hashlib.sha1(f"commit {i}".encode()).hexdigest()


def make_history(bases: list[dict[str, Any]], root: Path, n_sweeps: int, n_points: int) -> list[Path]:
    """``n_sweeps`` sweep directories of ``n_points`` points each; returns them in time order."""
    grid = list(itertools.islice(itertools.product(MODELS, list(VARIANTS)[:5], BATCHES), n_points))
    points = [vary(bases[i % len(bases)], *p) for i, p in enumerate(grid)]
    rng = np.random.default_rng(0)
    dirs = []
    for s in range(n_sweeps):
        d = root / f"sweep-{s:03d}"
        started = START + timedelta(hours=s)
        for j, (base, (_, variant, _)) in enumerate(zip(points, grid, strict=True)):
            slow = 1 + SLOWDOWN if variant == SLOW_VARIANT and s >= SLOW_FROM else 1.0
            rec = scaled(base, slow * float(np.exp(rng.normal(0.0, NOISE))))
            rec["env"] = {**rec["env"], "git": {"sha": commit(s), "dirty": False, "repo": "benchmark"}}
            rec["started_at"] = (started + timedelta(seconds=j)).isoformat()
            rec["sweep"] = {"dir": str(d), "job": j}
            (d / str(j)).mkdir(parents=True)
            (d / str(j) / RECORD_NAME).write_text(json.dumps({**rec, "schema_version": SCHEMA_VERSION}))
        write_sweep_meta(d, {"command": ["benchmarks/dashboard_scale.py"], "started_at": started.isoformat()})
        dirs.append(d)
    return dirs


def harness(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "harness", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweeps", type=int, default=100, help="sweeps in the history (default 100)")
    ap.add_argument("--points", type=int, default=50, help="points per sweep (default 50)")
    ap.add_argument("--source", type=Path, help="sweep directory whose records are copied (default: run one)")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dashboard-scale-") as tmp:
        tmp = Path(tmp)
        bases = read_records(opts.source) if opts.source else real_sweep(tmp / "source")
        dirs = make_history(bases, tmp / "sweeps", opts.sweeps, opts.points)
        db = tmp / "history.sqlite"
        add_s, _ = harness("history", "add", *map(str, dirs), "--db", str(db))
        print(f"{len(bases)} real record(s) copied into {opts.sweeps} sweeps x {opts.points} points")
        print(f"harness history add: {add_s:5.2f} s, database {db.stat().st_size / 1e6:.2f} MB")
        build_s, out = harness("dashboard", "--db", str(db), "-o", str(tmp / "site"))
        size_mb = (tmp / "site" / "index.html").stat().st_size / 1e6
        print(f"harness dashboard: {build_s:5.2f} s, index.html {size_mb:5.2f} MB ({out.splitlines()[0]})")

        from harness.dashboard import write_dashboard

        t0 = time.perf_counter()
        _, steps = write_dashboard(db, tmp / "site2")
        in_process = time.perf_counter() - t0
        named = set(steps["first_bad_sha"]) == {commit(SLOW_FROM)} and steps["variant"].eq(SLOW_VARIANT).all()
        print(
            f"write_dashboard in-process: {in_process:5.2f} s; {len(steps)} step(s) found, "
            f"{'all' if named else 'NOT all'} at the injected commit {commit(SLOW_FROM)[:10]} in {SLOW_VARIANT}"
        )
        print(f"target < 20 s: {'met' if build_s < 20 else 'NOT met'} ({build_s:.2f} s)")
        print(f"target < 25 MB: {'met' if size_mb < 25 else 'NOT met'} ({size_mb:.2f} MB)")


if __name__ == "__main__":
    main()
