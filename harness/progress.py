"""Sweep metadata and progress: position, elapsed time and ETA for each point.

The sweep's start time and size live in ``sweep.json`` in the sweep directory, and progress counts the records
already written there, so the figures are right whichever launcher runs the points (in-process, joblib
workers, SLURM jobs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from harness.records import RECORD_NAME, RecordError, find_records, read_record, write_json_atomic

SWEEP_META = "sweep.json"


def write_sweep_meta(sweep_dir: Path, meta: dict[str, Any]) -> Path:
    return write_json_atomic(Path(sweep_dir) / SWEEP_META, meta)


def read_sweep_meta(sweep_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(sweep_dir) / SWEEP_META).read_text())
    except (OSError, ValueError):
        return {}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(sweep_dir: Path | None, job: int | None) -> dict[str, Any]:
    """Position of ``job`` in the sweep, records done, elapsed seconds and a linear ETA."""
    if sweep_dir is None:
        return {"position": 1, "total": 1, "done": 0, "elapsed_s": 0.0, "eta_s": None}
    meta = read_sweep_meta(sweep_dir)
    total = meta.get("total")
    done = sum(1 for _ in Path(sweep_dir).rglob(RECORD_NAME))
    elapsed = time.time() - meta["started_unix"] if "started_unix" in meta else None
    eta = None
    if total and done and elapsed is not None:
        eta = elapsed / done * max(total - done, 0)
    return {
        "position": (job or 0) + 1,
        "total": total,
        "done": done,
        "elapsed_s": elapsed,
        "eta_s": eta,
    }


def progress_text(p: dict[str, Any]) -> str:
    total = p["total"] if p["total"] else "?"
    return f"[{p['position']}/{total}] elapsed {format_duration(p['elapsed_s'])}, ETA {format_duration(p['eta_s'])}"


def missing_points(sweep_dir: Path) -> list[dict[str, Any]]:
    """Points the sweep planned (``sweep.json``) that have no record in the sweep directory, matched by point
    key: the traces of a process that died before writing, or of a launcher that gave up."""
    meta = read_sweep_meta(sweep_dir)
    keys, points = meta.get("point_keys") or [], meta.get("points") or []
    present = set()
    for path in find_records(sweep_dir) if Path(sweep_dir).is_dir() else []:
        try:
            present.add(read_record(path).get("point_key"))
        except RecordError:
            continue
    return [
        {"job": job, "overrides": overrides, "point_key": key}
        for job, (overrides, key) in enumerate(zip(points, keys, strict=False))
        if key not in present
    ]
