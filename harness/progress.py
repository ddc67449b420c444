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

from harness.records import RECORD_NAME, find_records, key_and_status, write_json_atomic

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


def _resumed(meta: dict[str, Any]) -> bool:
    """Whether the sweep's command line (``sweep.json``) asked for ``resume=true``."""
    words = [str(w).lstrip("+").lower() for w in meta.get("command") or []]
    return any(w.startswith("resume=") and w.split("=", 1)[1] in ("true", "yes", "on", "1") for w in words)


def progress(sweep_dir: Path | None, job: int | None, resume: bool | None = None) -> dict[str, Any]:
    """Position of ``job`` in the sweep, records done, elapsed seconds and a linear ETA.

    Only the records this run wrote (since the start time in ``sweep.json``) give the rate: a sweep resumed in
    its directory (``resume``; None: read ``resume=true`` off its command line) finds the records of earlier
    runs there, which took none of this run's time. Its earlier good records are points it will not run again;
    its earlier failed ones (and good ones of points it no longer plans) it runs again. ``eta_s`` is None until
    this run has measured a point."""
    if sweep_dir is None:
        return {"position": 1, "total": 1, "done": 0, "elapsed_s": 0.0, "eta_s": None}
    meta = read_sweep_meta(sweep_dir)
    total = meta.get("total")
    started = meta.get("started_unix")
    resume = _resumed(meta) if resume is None else resume
    planned = set(meta.get("point_keys") or [])
    fresh = kept = 0
    for path in find_records(sweep_dir) if Path(sweep_dir).is_dir() else []:
        try:
            new = started is None or path.stat().st_mtime >= started
        except OSError:
            continue
        if new:
            fresh += 1
        elif resume:
            held = key_and_status(path)  # a good record: a point resume will not run again
            kept += held is not None and held[1] == "ok" and (not planned or held[0] in planned)
    done = fresh + kept
    elapsed = time.time() - started if started is not None else None
    eta = None
    if total and fresh and elapsed is not None:
        eta = elapsed / fresh * max(total - done, 0)
    return {
        "position": (job or 0) + 1,
        "total": total,
        "done": done,
        "measured": fresh,
        "elapsed_s": elapsed,
        "eta_s": eta,
    }


def progress_text(p: dict[str, Any]) -> str:
    total = p["total"] if p["total"] else "?"
    return f"[{p['position']}/{total}] elapsed {format_duration(p['elapsed_s'])}, ETA {format_duration(p['eta_s'])}"


def missing_points(sweep_dir: Path) -> list[dict[str, Any]]:
    """Points the sweep planned (``sweep.json``) that have no record in the sweep directory, matched by point
    key: the traces of a process that died before writing, or of a launcher that gave up. ``job_dir`` is the
    job's folder (a str), where its log would be: ``hydra.sweep.subdir`` as the launcher resolved it (``subdirs``), else
    the job's number (Hydra's default, and sweeps planned before ``subdirs`` was kept)."""
    meta = read_sweep_meta(sweep_dir)
    keys, points = meta.get("point_keys") or [], meta.get("points") or []
    subdirs = meta.get("subdirs") or []
    held = (key_and_status(path) for path in (find_records(sweep_dir) if Path(sweep_dir).is_dir() else []))
    present = {h[0] for h in held if h is not None}
    return [
        {"job": job, "overrides": overrides, "point_key": key,
         "job_dir": str(Path(sweep_dir) / str(subdirs[job] if job < len(subdirs) else job))}
        for job, (overrides, key) in enumerate(zip(points, keys, strict=False))
        if key not in present
    ]  # fmt: skip


# what a job leaves in its folder once it runs: its log, Hydra's copy of its config (.hydra/), its record
JOB_TRACES = ("*.log", "config.yaml", RECORD_NAME)


def jobs_started(sweep_dir: Path, since: float) -> bool:
    """Whether any job of the run that began at ``since`` (unix seconds) got as far as its folder: a log, Hydra's
    copy of its config or a record written since then (a resumed sweep's folders hold earlier ones)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return False
    for pattern in JOB_TRACES:
        for path in root.rglob(pattern):
            try:
                if path.stat().st_mtime >= since:
                    return True
            except OSError:
                continue
    return False
