"""Hydra callback: pre-flight validation of every sweep point (harness.preflight), sweep metadata, the final
summary and report, and what is left of a sweep whose launcher gave up."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, PointSpec, validate, writable_dir
from harness.hydra_errors import one_line
from harness.preflight import (  # PreflightAbort: also the CLI's, from here
    Planned,
    PreflightAbort,
    compose_spec,
    launcher_warning,
    preflight,
    refuse_dropped_points,
    refuse_reused_dir,
    refuse_reused_run_dir,
    sweep_points,
)
from harness.progress import jobs_started, missing_points, read_sweep_meta, write_sweep_meta
from harness.records import RECORD_NAME, forget_ok_index, load, write_record
from harness.summary import status_counts, summary_table

log = logging.getLogger(__name__)

# What the last run or sweep produced, for the CLI's exit status.
LAST_RESULT: dict[str, Any] = {}


def record_missing(
    config: DictConfig, sweep_dir: Path, specs: dict[str, PointSpec] | None = None, reason: str | None = None
) -> int:
    """Write a ``failed`` record for each planned point that has none, saying why; returns how many. ``specs``:
    the points validated before the sweep, by point key (else each is composed again); ``reason``: the error of
    the launcher that stopped the sweep."""
    from harness.env import fingerprint
    from harness.point import apply_process_settings, identity

    missing = missing_points(sweep_dir)
    for point in missing:
        spec = (specs or {}).get(point["point_key"]) or compose_spec(config, point["overrides"])
        job_dir = record_dir = Path(point["job_dir"])  # the job's folder holds its log, if it got that far
        if (job_dir / RECORD_NAME).exists():  # another point's record (a resumed sweep in another order)
            record_dir = sweep_dir / "missing" / point["point_key"]
        log.warning("point %d has no record: %s", point["job"], " ".join(point["overrides"]))
        apply_process_settings(spec)  # the fingerprint counts the point's threads, as its own record would
        stopped = f"; the launcher stopped the sweep: {reason}" if reason else ""
        write_record(
            record_dir,
            {
                "status": "failed",
                "error": "no record was written: the process running this point ended first (a crash, kill -9, the "
                f"kernel's out-of-memory killer, or a launcher that gave up){stopped}; its log, if any: "
                f"{job_dir}/harness.log",
                "missing": True,
                "point_key": point["point_key"],
                "identity": identity(spec),
                "config": spec.cfg,
                "env": fingerprint(spec.device),
                "sweep": {"dir": str(sweep_dir.resolve()), "job": point["job"], "overrides": point["overrides"]},
            },
        )
    return len(missing)


# The sweep in progress, so that a launcher that gives up can still be summarized (see finish_aborted).
ACTIVE: dict[str, Any] = {}


def finish_sweep(config: DictConfig, sweep_dir: Path, reason: str | None = None) -> None:
    """End of a multirun: record the points that left no record, then the summary and the report."""
    specs = ACTIVE.get("specs")
    ACTIVE.clear()
    record_missing(config, sweep_dir, specs, reason)
    _print_summary(sweep_dir)


def finish_aborted(exc: BaseException | None = None) -> bool:
    """After a launcher raised mid-sweep (e.g. a job's process died under submitit without isolate=true):
    record what is missing and summarize what was measured. Returns whether there was a sweep to finish;
    ``LAST_RESULT["isolated"]`` then says whether its points ran with isolate=true. ``exc``: the launcher's
    error (default: the exception being handled).

    A launcher that started no job at all (``hydra/launcher=slurm`` without SLURM) is a setup error, not crashed
    points: no record is written, and the UsageError raised names the launcher and its error (one line, exit 2)."""
    from harness.cli import UsageError

    if not ACTIVE:
        return False
    exc = exc if exc is not None else sys.exc_info()[1]
    reason = one_line(f"{type(exc).__name__}: {exc}") if exc is not None else None
    if not jobs_started(ACTIVE["sweep_dir"], ACTIVE["started"]):
        launcher = ACTIVE["launcher"]
        ACTIVE.clear()
        raise UsageError(f"hydra/launcher={launcher}: no job started: {reason}")
    isolated = ACTIVE["isolated"]
    finish_sweep(ACTIVE["config"], ACTIVE["sweep_dir"], reason)
    LAST_RESULT["isolated"] = isolated
    return True


def _print_summary(directory: Path) -> None:
    df = load(directory)
    meta = read_sweep_meta(directory)  # a sweep's; a single run's folder has none
    LAST_RESULT.clear()
    LAST_RESULT.update(dir=str(directory), total=len(df), ok=int((df["status"] == "ok").sum()) if len(df) else 0)
    LAST_RESULT["all_failed"] = bool(len(df)) and bool(df["status"].isin(["failed", "oom", "timeout"]).all())
    out = sys.stdout
    out.write("\n" + summary_table(df, concurrent=bool(meta.get("concurrent"))) + "\n\n")
    out.write(f"{status_counts(df)}\n")
    if meta.get("parallel_warning"):  # said at the start; the table's figures carry it, so it is said again
        out.write(f"Warning: {meta['parallel_warning']}\n")
    out.write(f"Results: {directory}\n")
    out.flush()
    _write_report(directory)


def _write_report(directory: Path) -> None:
    """The HTML report, its path printed last; a report that cannot be built never fails the run."""
    try:
        from harness.report import write_report

        path = write_report(directory)
    except Exception as exc:  # the measurements are on disk whatever happens here
        log.warning("report not written: %s: %s", exc.__class__.__name__, exc)
        return
    sys.stdout.write(f"Report: {path}\n")
    sys.stdout.flush()


def _make_output_dir(field: str, path: Path) -> None:
    """The run's or sweep's folder, made before any work: one that cannot be is one line, not a traceback."""
    try:
        writable_dir(path, field)
    except ConfigError as exc:
        raise PreflightAbort(str(exc)) from None


def start_sweep(config: DictConfig) -> None:
    """Before a multirun's first point: validate every point, refuse a sweep of none or a folder of another
    sweep's records, warn about launchers whose points interfere, and plan the sweep in ``sweep.json``."""
    points = sweep_points(config)
    plan: list[Planned] | None = None
    if points is not None:
        if not points:
            raise ConfigError("the sweep has no points")
        t0 = time.perf_counter()
        plan = preflight(config, points)
        log.info("validated %d sweep points in %.1fs", len(points), time.perf_counter() - t0)
    resume = any(p.spec.resume for p in plan) if plan else bool(config.get("resume"))
    sweep_dir = Path(config.hydra.sweep.dir)
    refuse_reused_dir(sweep_dir, resume)
    if resume and plan is not None:
        refuse_dropped_points(sweep_dir, read_sweep_meta(sweep_dir), [p.point_key for p in plan])
    warning, concurrent = launcher_warning(config, len(points) if points is not None else None)
    if warning:
        log.warning("%s", warning)
    _make_output_dir("hydra.sweep.dir", sweep_dir)
    forget_ok_index()
    now, started = datetime.now(UTC).isoformat(), time.time()
    # resumed: the sweep started when it first did (history and the report date it so); started_unix is
    # this run's own start (progress counts the records written since)
    first = read_sweep_meta(sweep_dir).get("started_at") if resume else None
    meta = write_sweep_meta(
        sweep_dir,
        {
            "command": ["harness", "run", *sys.argv[1:]],
            "started_at": first or now,
            **({"resumed_at": now} if first else {}),
            "started_unix": started,
            "total": len(points) if points is not None else None,
            "points": points,
            "point_keys": [p.point_key for p in plan] if plan is not None else None,
            "subdirs": [p.subdir for p in plan] if plan is not None else None,
            "launcher": str(config.hydra.launcher.get("_target_", "")),
            "parallel_warning": warning,
            "concurrent": concurrent,
        },
    )
    _note_output(sweep_dir, sweep=True)
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    ACTIVE.update(
        config=config,
        sweep_dir=sweep_dir,
        started=meta.stat().st_mtime,  # the clock of the sweep folder's file system, which stamps the jobs' files
        specs={p.point_key: p.spec for p in plan or []},
        launcher=choices.get("hydra/launcher") or str(config.hydra.launcher.get("_target_", "")).rpartition(".")[2],
        isolated=all(p.spec.isolate for p in plan) if plan else bool(config.get("isolate")),
    )


# Where this run or sweep writes its records: what the CLI names after an interruption.
OUTPUT: dict[str, Any] = {}


def _note_output(directory: Path, sweep: bool) -> None:
    OUTPUT.update(dir=directory.resolve(), sweep=sweep)  # resolved: a job may chdir


class HarnessCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.hydra_errors import composition_error

        ACTIVE.clear()  # a single run: no sweep for a failure to finish
        OUTPUT.clear()
        try:
            spec = validate(config)
            refuse_reused_run_dir(Path(config.hydra.run.dir), spec.resume)
        except ConfigError as exc:
            raise PreflightAbort(str(exc)) from None
        except Exception as exc:  # model.dim=${oops}: one line, as preflight says it
            text = composition_error(exc)
            if text is None:
                raise
            raise PreflightAbort(text) from None
        _make_output_dir("hydra.run.dir", Path(config.hydra.run.dir))
        _note_output(Path(config.hydra.run.dir), sweep=False)
        forget_ok_index()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ACTIVE.clear()
        OUTPUT.clear()
        try:
            start_sweep(config)
        except PreflightAbort:
            raise
        except ConfigError as exc:
            raise PreflightAbort(str(exc)) from None
        except Exception as exc:  # Hydra would make it a warning and run the sweep unchecked
            raise PreflightAbort(f"cannot plan the sweep: {one_line(f'{type(exc).__name__}: {exc}')}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep(config, Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job_return = kwargs.get("job_return")
        if job_return is not None and job_return.hydra_cfg is not None:
            _print_summary(Path(job_return.hydra_cfg.hydra.runtime.output_dir))
