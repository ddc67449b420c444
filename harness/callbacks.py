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

from harness.config import ConfigError, validate
from harness.progress import write_sweep_meta
from harness.records import load
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


def preflight(config: DictConfig, points: list[list[str]]) -> None:
    """Compose and validate every point before the first one runs; the first bad one stops the sweep."""
    from hydra import compose

    for i, overrides in enumerate(points):
        cfg = compose(config_name=config.hydra.job.config_name, overrides=overrides)
        try:
            validate(cfg)
        except ConfigError as exc:
            raise PreflightAbort(f"{exc} (sweep point {i + 1}/{len(points)}: {' '.join(overrides)})") from None


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


class HarnessCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except ConfigError as exc:
            raise PreflightAbort(str(exc)) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        points = sweep_points(config)
        if points is not None:
            t0 = time.perf_counter()
            preflight(config, points)
            log.info("validated %d sweep points in %.1fs", len(points), time.perf_counter() - t0)
        sweep_dir = Path(config.hydra.sweep.dir)
        write_sweep_meta(
            sweep_dir,
            {
                "command": ["harness", "run", *sys.argv[1:]],
                "started_at": datetime.now(UTC).isoformat(),
                "started_unix": time.time(),
                "total": len(points) if points is not None else None,
                "points": points,
            },
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _print_summary(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job_return = kwargs.get("job_return")
        if job_return is not None and job_return.hydra_cfg is not None:
            _print_summary(Path(job_return.hydra_cfg.hydra.runtime.output_dir))
