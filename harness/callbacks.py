"""Hydra callback: pre-flight validation of every sweep point, sweep metadata, the final summary and report."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, validate, writable_dir
from harness.progress import missing_points, read_sweep_meta, write_sweep_meta
from harness.records import RECORD_NAME, forget_ok_index, load, point_key, write_record
from harness.summary import status_counts, summary_table

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

# What the last run or sweep produced, for the CLI's exit status.
LAST_RESULT: dict[str, Any] = {}


class PreflightAbort(BaseException):
    """A config error found before any work. A BaseException on purpose: Hydra turns an Exception raised in a
    callback into a warning and carries on, and this must stop the run before its first point."""


def sweep_points(config: DictConfig) -> list[list[str]] | None:
    """Override lists of every point, as the basic sweeper will expand them (None for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create().parse_overrides([*params, *task])
    return [point for batch in BasicSweeper.split_arguments(overrides, None) for point in batch]


def _spec(config: DictConfig, overrides: list[str]):
    """The validated spec of one point. Hydra is initialized while its sweep runs; after a launcher raised
    (``finish_aborted``) it no longer is, and the harness's config directory is composed from afresh."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.paths import config_dir

    name = config.hydra.job.config_name
    if GlobalHydra.instance().is_initialized():
        return validate(compose(config_name=name, overrides=overrides))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return validate(compose(config_name=name, overrides=overrides))


def preflight(config: DictConfig, points: list[list[str]]) -> list[str]:
    """Compose and validate every point before the first one runs (the first bad one stops the sweep);
    returns their point keys."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.cli import composition_error
    from harness.interleave import ISOLATE_REFUSED
    from harness.point import identity

    interleaved = str(config.hydra.launcher.get("_target_", "")).endswith(".InterleavedLauncher")
    keys = []
    for i, overrides in enumerate(points):
        try:
            spec = _spec(config, overrides)
            if interleaved and spec.isolate:  # refused here, before sweep.json plans points nothing will run
                raise ConfigError(ISOLATE_REFUSED)
            keys.append(point_key(identity(spec)))
        except (HydraException, OmegaConfBaseException, ValueError) as exc:  # ConfigError is a ValueError
            # an unknown group option or key is Hydra's (multi-line) error: one line naming it, as for ConfigError
            text = str(exc) if isinstance(exc, ConfigError) else composition_error(exc, overrides)
            if text is None:
                raise
            raise PreflightAbort(f"{text} (sweep point {i + 1}/{len(points)}: {' '.join(overrides)})") from None
    return keys


def record_missing(config: DictConfig, sweep_dir: Path) -> int:
    """Write a ``failed`` record for each planned point that has none, saying why; returns how many."""
    from harness.env import fingerprint
    from harness.point import apply_process_settings, identity

    missing = missing_points(sweep_dir)
    for point in missing:
        spec = _spec(config, point["overrides"])
        job_dir = record_dir = sweep_dir / str(point["job"])  # the job's folder holds its log, if it got that far
        if (job_dir / RECORD_NAME).exists():  # another point's record (a resumed sweep in another order)
            record_dir = sweep_dir / "missing" / point["point_key"]
        log.warning("point %d has no record: %s", point["job"], " ".join(point["overrides"]))
        apply_process_settings(spec)  # the fingerprint counts the point's threads, as its own record would
        write_record(
            record_dir,
            {
                "status": "failed",
                "error": "no record was written: the process running this point ended first (a crash, kill -9, the "
                f"kernel's out-of-memory killer, or a launcher that gave up); its log, if any: {job_dir}/harness.log",
                "missing": True,
                "point_key": point["point_key"],
                "identity": identity(spec),
                "config": spec.cfg,
                "env": fingerprint(spec.device),
                "sweep": {"dir": str(sweep_dir.resolve()), "job": point["job"], "overrides": point["overrides"]},
            },
        )
    return len(missing)


def parallel_warning(config: DictConfig, n_points: int | None) -> str | None:
    """Why timings may interfere: a launcher that runs several points at once on one machine or device."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target and launcher.get("n_jobs") != 1:
        return (f"the joblib launcher runs up to {launcher.get('n_jobs')} points at once on this machine: their "
                "timings interfere; set hydra.launcher.n_jobs=1 to measure")  # fmt: skip
    if target.endswith("submitit_launcher.LocalLauncher") and (n_points or 2) > 1:
        return (
            "the submitit local launcher starts every point at once on this machine: their timings interfere; "
            "use it to isolate crashes, not to measure (or run one point per machine with submitit_slurm)"
        )
    if target.endswith("submitit_launcher.SlurmLauncher"):
        gpus = launcher.get("gpus_per_node") or 0
        if str(config.get("device", "auto")).startswith(("cuda", "auto")) and not gpus and not launcher.get("gres"):
            return "SLURM jobs request no GPU (hydra.launcher.gpus_per_node): points would run without one"
        if (launcher.get("tasks_per_node") or 1) > 1:
            return "several tasks per SLURM node would share its devices: timings interfere (tasks_per_node=1)"
    return None


# The sweep in progress, so that a launcher that gives up can still be summarized (see finish_aborted).
ACTIVE: dict[str, Any] = {}


def finish_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """End of a multirun: record the points that left no record, then the summary and the report."""
    ACTIVE.clear()
    record_missing(config, sweep_dir)
    _print_summary(sweep_dir)


def finish_aborted() -> bool:
    """After a launcher raised mid-sweep (e.g. a job's process died under submitit without isolate=true):
    record what is missing and summarize what was measured. Returns whether there was a sweep to finish."""
    if not ACTIVE:
        return False
    config, sweep_dir = ACTIVE["config"], ACTIVE["sweep_dir"]
    finish_sweep(config, sweep_dir)
    return True


def _print_summary(directory: Path) -> None:
    df = load(directory)
    LAST_RESULT.clear()
    LAST_RESULT.update(dir=str(directory), total=len(df), ok=int((df["status"] == "ok").sum()) if len(df) else 0)
    LAST_RESULT["all_failed"] = bool(len(df)) and bool(df["status"].isin(["failed", "oom", "timeout"]).all())
    out = sys.stdout
    out.write("\n" + summary_table(df) + "\n\n")
    out.write(f"{status_counts(df)}\n")
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


class HarnessCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.cli import composition_error

        try:
            validate(config)
        except ConfigError as exc:
            raise PreflightAbort(str(exc)) from None
        except Exception as exc:  # model.dim=${oops}: one line, as preflight says it
            text = composition_error(exc)
            if text is None:
                raise
            raise PreflightAbort(text) from None
        _make_output_dir("hydra.run.dir", Path(config.hydra.run.dir))
        forget_ok_index()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        points = sweep_points(config)
        keys = None
        if points is not None:
            t0 = time.perf_counter()
            keys = preflight(config, points)
            log.info("validated %d sweep points in %.1fs", len(points), time.perf_counter() - t0)
        warning = parallel_warning(config, len(points) if points is not None else None)
        if warning:
            log.warning("%s", warning)
        sweep_dir = Path(config.hydra.sweep.dir)
        _make_output_dir("hydra.sweep.dir", sweep_dir)
        forget_ok_index()
        ACTIVE.update(config=config, sweep_dir=sweep_dir)
        now = datetime.now(UTC).isoformat()
        # resumed: the sweep started when it first did (history and the report date it so); started_unix is
        # this run's own start (progress counts the records written since)
        first = read_sweep_meta(sweep_dir).get("started_at") if config.get("resume") else None
        write_sweep_meta(
            sweep_dir,
            {
                "command": ["harness", "run", *sys.argv[1:]],
                "started_at": first or now,
                **({"resumed_at": now} if first else {}),
                "started_unix": time.time(),
                "total": len(points) if points is not None else None,
                "points": points,
                "point_keys": keys,
                "launcher": str(config.hydra.launcher.get("_target_", "")),
                "parallel_warning": warning,
            },
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep(config, Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job_return = kwargs.get("job_return")
        if job_return is not None and job_return.hydra_cfg is not None:
            _print_summary(Path(job_return.hydra_cfg.hydra.runtime.output_dir))
