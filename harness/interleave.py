"""Points of a sweep timed in turns, so that their ratios survive a machine whose speed drifts.

A sweep's points normally run one after another, each timed in its own window. On a shared or throttling
machine the speed wanders over seconds to minutes, and a ratio between two points timed minutes apart carries
that drift. Here the points of a group (by default those that differ only in their engine: same model,
workload, device, dtype, seed and policy) are prepared together, warmed up one by one, and then timed one
repetition each per round, in balanced orders (``timing.balanced_orders``). Drift then lands on every point
of the group alike.

The cost: the group's engines are resident together, so a point's peak memory and its utilization and energy
window are the group's, and the records say so. Time a sweep point by point (the basic launcher) where those
figures matter per point. Used by the ``interleaved`` Hydra launcher (hydra_plugins/harness_launcher).
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import reference
from harness.config import ConfigError, PointSpec
from harness.env import fingerprint
from harness.isolation import PointTimeout, deadline, paused_s
from harness.memory import PeakMemory, current_rss_mb
from harness.monitor import Sampler
from harness.point import (
    CONVERGE_ON,
    TimedPoint,
    apply_process_settings,
    close_record,
    finish,
    guarded,
    identity,
    keep_partial,
    new_record,
    roofline_peaks,
    setup,
)
from harness.preflight import shared_job_dir
from harness.progress import format_duration
from harness.stats import median_ci
from harness.timing import Repetitions, RepFn, repeat_in_turns, warm_up

log = logging.getLogger(__name__)

# the identity's engine fields (a corpus an engine calibrates on is one: eager beside wanda is timed in turns)
ENGINE_FIELDS = ("engine", "variant", "engine_params", "corpus_sha256", "corpus")
BASELINE = "eager"  # speedups are over this engine (as in the report), paired by round when it is in the group

# Records measured by the launcher, by resolved output directory, for the task of each job to report.
RESULTS: dict[str, dict[str, Any]] = {}


@dataclass
class Job:
    spec: PointSpec
    out_dir: Path  # where its record is written
    sweep: dict[str, Any]
    job_dir: Path | None = None  # its Hydra job folder, where its task looks for it (default: out_dir); resume=true
    # writes a point elsewhere when that folder holds another point's record (harness.app.record_dir)


@dataclass
class _Entry:
    job: Job
    record: dict[str, Any]
    started: float
    point: TimedPoint | None = None
    warm: Repetitions = field(default_factory=Repetitions)
    spent_s: float = 0.0  # the point's own time so far (its phases, its repetitions): what measure.timeout_s limits
    peaks: dict[str, Any] | None = None  # the roofline's device peaks (point.roofline_peaks), before its setup


class _Expired(Exception):
    """A point's PointTimeout inside the rounds, as an Exception: ``repeat_in_turns`` takes that point out of
    the rotation and the others go on (a PointTimeout, a BaseException, would end the whole group)."""

    def __init__(self, timeout: PointTimeout) -> None:
        super().__init__(str(timeout))
        self.timeout = timeout


@contextmanager
def _budget(entry: _Entry) -> Iterator[None]:
    """Run one phase of a point within what is left of its ``measure.timeout_s``, and count the phase's time.

    The budget covers the point's own work: its prepare (build, quality), its warm-up and its own repetitions
    in the rounds, not the time it waits while the other points of its group run theirs."""
    limit = entry.job.spec.policy.timeout_s
    t0, paused0 = time.perf_counter(), paused_s()
    try:
        if not limit:
            yield
            return
        try:
            left = limit - entry.spent_s
            if left <= 0:
                raise PointTimeout(f"point exceeded measure.timeout_s={limit:g} s")
            with deadline(left):
                yield
        except PointTimeout:
            raise PointTimeout(f"point exceeded measure.timeout_s={limit:g} s") from None
    finally:  # a shared cache entry built meanwhile (training, a student) is none of the point's own time
        entry.spent_s += time.perf_counter() - t0 - (paused_s() - paused0)


def _budgeted_rep(entry: _Entry) -> RepFn:
    """The point's repetition within its budget (the bare one when it has no limit: nothing added per rep)."""
    assert entry.point is not None
    rep = entry.point.rep
    if not entry.job.spec.policy.timeout_s:
        return rep

    def within(i: int) -> dict[str, Any]:
        try:
            with _budget(entry):
                return rep(i)
        except PointTimeout as exc:
            raise _Expired(exc) from None

    return within


def take(out_dir: Path) -> dict[str, Any] | None:
    """The record measured for the job writing into ``out_dir``, if the launcher measured it (once)."""
    return RESULTS.pop(str(Path(out_dir).resolve()), None)


def group_key(spec: PointSpec) -> str:
    """Points with equal keys are timed in turns: all but the engine's fields of the identity, the policy and
    the monitor settings. (Two workloads never share a group: an engine's KV cache is sized for one.)"""
    ident = {k: v for k, v in identity(spec).items() if k not in ENGINE_FIELDS}
    return json.dumps([ident, spec.policy.__dict__, spec.monitor.__dict__], sort_keys=True, default=str)


def groups(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs grouped by ``group_key``, groups in the order of their first job, jobs in sweep order."""
    out: dict[str, list[Job]] = {}
    for job in jobs:
        out.setdefault(group_key(job.spec), []).append(job)
    return list(out.values())


ISOLATE_REFUSED = (
    "isolate: true cannot be combined with hydra/launcher=interleaved (the points of a group are timed in turns "
    "in one process); use the basic or a submitit launcher to isolate points"
)


def check(jobs: Sequence[Job]) -> None:
    """What cannot be timed in turns, as a one-line error before any work (the sweep's preflight says it first):
    isolation, and two jobs in one folder (``RESULTS`` holds one record per folder: the other's would be lost)."""
    for job in jobs:
        if job.spec.isolate:
            raise ConfigError(ISOLATE_REFUSED)
    dirs = [str((j.job_dir or j.out_dir).resolve()) for j in jobs]
    nums = [i if j.sweep.get("job") is None else int(j.sweep["job"]) for i, j in enumerate(jobs)]
    shared = shared_job_dir(dirs, nums)
    if shared:
        raise ConfigError(shared)


def run(jobs: Sequence[Job]) -> None:
    """Measure every job, group after group; each record is written to its job's directory and kept in
    ``RESULTS`` for the job's task."""
    check(jobs)
    plan = groups(jobs)
    t0 = time.perf_counter()
    for i, members in enumerate(plan):
        upcoming = plan[i + 1] if i + 1 < len(plan) else []
        keep = {reference.prepared_key(j.spec) for j in members + upcoming}
        reference.hold(keep)  # engines the next group uses again stay prepared (e.g. batch 1, then batch 8)
        names = ", ".join(j.spec.engine.variant() for j in members)
        spent = time.perf_counter() - t0
        eta = format_duration(spent / i * (len(plan) - i)) if i else "?"
        log.info(
            "[group %d/%d] elapsed %s, ETA %s: %d point(s) timed in turns: %s · %s",
            i + 1, len(plan), format_duration(spent), eta, len(members), names, _workload(members[0].spec),
        )  # fmt: skip
        for job, record in zip(members, run_group(members), strict=True):
            RESULTS[str((job.job_dir or job.out_dir).resolve())] = record
    reference.hold(set())


def _workload(spec: PointSpec) -> str:
    w = spec.workload
    return f"{spec.model.name} · batch={w.batch_size} prompt={w.prompt_len} gen={w.gen_len} · {spec.device.type}"


def run_group(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Prepare and warm up each job of one group, time them in turns, and write their records: every job's,
    also when an interruption (Ctrl-C, SIGTERM) or an error of the harness's own ends the group early."""
    entries: list[_Entry] = []
    try:
        _measure_group(jobs, entries)
    except BaseException as exc:
        _stopped(jobs, entries, exc)
        raise
    finally:
        for e in entries:
            close_record(e.record, e.job.spec, e.job.out_dir, e.started)
            e.point = None  # the prepared engine goes with the group (unless held for the next one)
    return [e.record for e in entries]


def _measure_group(jobs: Sequence[Job], entries: list[_Entry]) -> None:
    """The group's work; ``entries`` grows as each job is set up, so that an interruption finds them."""
    for job in jobs:
        entries.append(_prepare(job))
    ready = [e for e in entries if e.point is not None]
    reference.release_reference(keep=[e.point.prepared for e in ready])  # type: ignore[union-attr]
    for e in ready:
        _warm_up(e)
    ready = [e for e in ready if e.point is not None]
    if ready:
        _time_in_turns(ready)


def interrupted_reason(exc: BaseException) -> str:
    """A record's error for the exception that stopped its group: ``interrupted (SIGTERM)`` for the CLI's
    SIGTERM, ``interrupted (KeyboardInterrupt)`` for Ctrl-C (as a point's own guard says it)."""
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({str(exc) or 'KeyboardInterrupt'})"
    return f"the group stopped: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _stopped(jobs: Sequence[Job], entries: list[_Entry], exc: BaseException) -> None:
    """Each job of a group that ``exc`` stopped gets a failed record with the samples it took: those measuring
    or waiting their turn, and those not set up yet (a job that had finished, skipped or failed, keeps its own)."""
    reason = interrupted_reason(exc)
    for job in jobs[len(entries) :]:
        entries.append(_Entry(job, new_record(job.spec, job.sweep), time.time()))
    for e in entries:
        if e.record["status"] is None or str(e.record.get("error") or "").startswith("interrupted ("):
            e.record["status"], e.record["error"] = "failed", reason
            keep_partial(e.record, e.warm)


def _prepare(job: Job) -> _Entry:
    """Set up one job (engine, quality); a skipped or failed job has its record's status set and no point."""
    spec = job.spec
    entry = _Entry(job, new_record(spec, job.sweep), time.time())
    record = entry.record
    torch.manual_seed(spec.seed)
    apply_process_settings(spec)  # one count for the whole group: threads is part of the point, so of the group key
    with guarded(record), _budget(entry):
        record["env"] = fingerprint(spec.device)
        reason = spec.engine.available(spec.device, spec.dtype)
        if reason:
            record["status"], record["error"] = "skipped", reason
            return entry
        entry.peaks = roofline_peaks(spec, record)
        entry.point = setup(spec, record, job.out_dir, keep_reference=True)
    if record["status"] is not None:
        entry.point = None
    return entry


def _warm_up(entry: _Entry) -> None:
    """Warm up one prepared job (after every job of the group is prepared, so the caches are its own)."""
    spec, point = entry.job.spec, entry.point
    assert point is not None
    with guarded(entry.record), _budget(entry):
        point.setup_caches()
        warm_up(point.rep, spec.policy, entry.warm)
    if entry.record["status"] is not None:
        entry.point = None


def _time_in_turns(ready: list[_Entry]) -> None:
    spec = ready[0].job.spec  # a group shares device, workload, policy and monitor settings
    policy, w = spec.policy, spec.workload
    peak = PeakMemory(spec.device)
    rss_before = current_rss_mb()
    sampler = Sampler(spec.device, spec.monitor.interval_s) if spec.monitor.enabled else None
    peak.reset()
    with sampler or nullcontext():  # each point's repetitions run within what is left of its own budget
        turns = repeat_in_turns([_budgeted_rep(e) for e in ready], policy, CONVERGE_ON, [e.warm for e in ready])
    results = [r.timeout if isinstance(r, _Expired) else r for r in turns]
    peak_mb, method = peak.read()
    keys = [e.record["point_key"] for e in ready]
    turns_id = uuid.uuid4().hex[:16]
    rounds = max((r.reps for r in results if isinstance(r, Repetitions)), default=0)
    monitor = None
    if sampler is not None and hasattr(sampler, "window_s"):
        tokens = sum(r.reps for r in results if isinstance(r, Repetitions)) * w.batch_size * w.gen_len
        monitor = sampler.result(tokens=tokens)
    shared = f"shared by the {len(ready)} points timed in turns (their engines resident together)"
    base = next((k for k, e in enumerate(ready) if e.job.spec.engine.name == BASELINE
                 and isinstance(results[k], Repetitions)), None)  # fmt: skip
    for i, (e, res) in enumerate(zip(ready, results, strict=True)):
        with guarded(e.record):
            if isinstance(res, BaseException):
                keep_partial(e.record, e.warm)  # its rounds before the exception: e.warm is what the rounds filled
                raise res
            e.record["timing"] = {
                "interleaved": {"id": turns_id, "points": len(ready), "position": i, "rounds": rounds, "group": keys},
            }
            if base is not None and base != i:
                paired = paired_speedups(results[base], res, policy.confidence)  # type: ignore[arg-type]
                e.record["timing"]["interleaved"]["vs_" + BASELINE] = {"point_key": keys[base], **paired}
            with _budget(e):  # the summary, roofline and profile are the point's own work, as in a basic run
                finish(e.point, res, (peak_mb, f"{method}, {shared}"), rss_before, _shared_monitor(monitor, shared),
                       e.peaks)  # fmt: skip
            e.record["status"] = "ok"


def paired_speedups(base: Repetitions, point: Repetitions, confidence: float) -> dict[str, dict[str, float]]:
    """The point's speedup over the baseline timed in the same rounds, per timed metric: the median of the
    per-round ratios base/point (above 1: faster) and its order-statistic CI. Each ratio compares two
    repetitions run a fraction of a second apart, so what the machine's speed did between rounds cancels."""
    out = {}
    for metric in CONVERGE_ON:
        x, y = np.asarray(base.samples[metric], dtype=float), np.asarray(point.samples[metric], dtype=float)
        n = min(x.size, y.size)
        ratios = x[:n] / y[:n]
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        if ratios.size == 0:
            continue
        lo, hi, coverage = median_ci(ratios, confidence)
        out[metric] = {"median": float(np.median(ratios)), "ci_low": lo, "ci_high": hi, "coverage": coverage,
                       "n": int(ratios.size)}  # fmt: skip
    return out


def _shared_monitor(monitor: dict[str, Any] | None, shared: str) -> dict[str, Any] | None:
    """The group's monitor section for one of its points: utilization as the group's, energy per token not
    attributed (the window's energy is the group's, spent by several engines)."""
    if monitor is None:
        return None
    out = copy.deepcopy(monitor)
    out["shared"] = shared
    if out.get("energy_j") is not None:
        out["missing"]["energy_j_per_token"] = f"not attributed to one point: the energy window is {shared}"
    out["energy_j_per_token"] = None
    return out
