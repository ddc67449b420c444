"""What a multirun settles before its first point: the points the basic sweeper will expand (``glob()`` and
``range()`` included), each composed and validated as its launcher will compose it, with the job folder it gets;
duplicate points; points that share a job folder; a sweep folder that holds another sweep's records (or, resumed,
points this plan leaves out); launchers whose points interfere."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.config import ConfigError, PointSpec, validate
from harness.records import find_records, point_key

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class PreflightAbort(BaseException):
    """A config error found before any work. A BaseException on purpose: Hydra turns an Exception raised in a
    callback into a warning and carries on, and this must stop the run before its first point."""


def sweep_points(config: DictConfig) -> list[list[str]] | None:
    """Override lists of every point, as the basic sweeper will expand them (None for other sweepers). The running
    Hydra's config loader lets ``glob()`` list a group's options; an override that expands to nothing (a glob that
    matches no option, ``range(1,1)``) is a ConfigError naming it: the sweep would have no points."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    overrides = OverridesParser.create(config_loader=loader).parse_overrides([*params, *task])
    for o in overrides:
        if o.is_sweep_override() and o.is_discrete_sweep() and not list(o.sweep_string_iterator()):
            if o.is_choice_sweep() and loader is not None and loader.get_group_options(o.key_or_group):
                options = ", ".join(loader.get_group_options(o.key_or_group))
                raise ConfigError(f"{o.input_line}: matches no option of {o.key_or_group}; allowed: {options} "
                                  "(the sweep has no points)")  # fmt: skip
            raise ConfigError(f"{o.input_line}: expands to no value, so the sweep has no points")
    return [point for batch in BasicSweeper.split_arguments(overrides, None) for point in batch]


def compose_spec(config: DictConfig, overrides: list[str]):
    """The validated spec of one point, composed again: for a sweep planned elsewhere (``record_missing`` without
    its specs). Hydra is initialized while its sweep runs; after a launcher raised it no longer is, and the
    harness's config directory is composed from afresh."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.paths import config_dir

    name = config.hydra.job.config_name
    if GlobalHydra.instance().is_initialized():
        return validate(compose(config_name=name, overrides=overrides))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return validate(compose(config_name=name, overrides=overrides))


@dataclass
class Planned:
    """One point of the sweep, settled before the first runs: its spec and the job folder its launcher uses."""

    overrides: list[str]
    spec: PointSpec
    point_key: str
    subdir: str  # hydra.sweep.subdir as the launcher resolves it for this job (under hydra.sweep.dir)


@contextmanager
def _as_job(cfg: DictConfig) -> Iterator[None]:
    """Hydra's config of one job while its own config is read (``${hydra:job.num}``), as ``run_job`` sets it."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = before


def _job_config(config: DictConfig, overrides: list[str], job: int) -> DictConfig:
    """A point's config as the launchers compose it: the sweep's Hydra overrides, its number and id set."""
    from hydra.core.global_hydra import GlobalHydra

    cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = job
        cfg.hydra.job.num = job
    return cfg


def preflight(config: DictConfig, points: list[list[str]]) -> list[Planned]:
    """Compose and validate every point before the first one runs (the first bad one stops the sweep), and
    warn about points that are the same point; returns the plan."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.hydra_errors import composition_error
    from harness.interleave import ISOLATE_REFUSED
    from harness.point import identity

    interleaved = str(config.hydra.launcher.get("_target_", "")).endswith(".InterleavedLauncher")
    plan = []
    for i, overrides in enumerate(points):
        try:
            cfg = _job_config(config, overrides, i)
            with _as_job(cfg):
                spec = validate(cfg)
                subdir = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
            if interleaved and spec.isolate:  # refused here, before sweep.json plans points nothing will run
                raise ConfigError(ISOLATE_REFUSED)
            plan.append(Planned(list(overrides), spec, point_key(identity(spec)), subdir))
        except (HydraException, OmegaConfBaseException, ValueError) as exc:  # ConfigError is a ValueError
            # an unknown group option or key is Hydra's (multi-line) error: one line naming it, as for ConfigError
            text = str(exc) if isinstance(exc, ConfigError) else composition_error(exc, overrides)
            if text is None:
                raise
            raise PreflightAbort(f"{text} (sweep point {i + 1}/{len(points)}: {' '.join(overrides)})") from None
    shared = shared_job_dir([p.subdir for p in plan], list(range(len(plan))), len(plan))
    if shared:
        raise ConfigError(shared)
    for warning in duplicate_points(points, [p.point_key for p in plan]):
        log.warning("%s", warning)
    return plan


def shared_job_dir(subdirs: list[str], jobs: list[int], total: int | None = None) -> str | None:
    """Why two points would write into one job folder (each record would replace the other's, and the point
    left without one would be reported as a crash), or None. ``jobs``: the points' numbers (from 0)."""
    of = f"/{total}" if total else ""
    first: dict[str, int] = {}
    for job, subdir in zip(jobs, subdirs, strict=True):
        other = first.setdefault(os.path.normpath(subdir), job)
        if other != job:
            return (f"hydra.sweep.subdir: points {other + 1}{of} and {job + 1}{of} both resolve to {subdir!r}, "
                    "so one's record would replace the other's; make it unique per point (e.g. include "
                    "${hydra.job.num})")  # fmt: skip
    return None


def duplicate_points(points: list[list[str]], keys: list[str]) -> list[str]:
    """A warning for each point whose key an earlier point of the sweep has (``engine=pruned,pruned/magnitude``
    are one config), naming both by the overrides that vary across the sweep."""
    varying = [[o for o in p if not all(o in q for q in points)] or p for p in points]
    first: dict[str, int] = {}
    warnings = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            warnings.append(
                f"sweep points {j + 1}/{len(points)} and {i + 1}/{len(points)} are the same point (equal point "
                f"keys), measured twice: {' '.join(varying[j])} | {' '.join(varying[i])}"
            )
    return warnings


def _records_to_overwrite(directory: Path, resume: bool) -> list[Path]:
    """The records an earlier run left in ``directory`` (none counted with ``resume=true``, which continues it)."""
    return find_records(directory) if not resume and directory.is_dir() else []


def refuse_reused_dir(sweep_dir: Path, resume: bool) -> None:
    """A sweep folder that holds records already, without ``resume=true``: its summary and report would mix that
    earlier sweep's points in."""
    if held := _records_to_overwrite(sweep_dir, resume):
        raise ConfigError(
            f"hydra.sweep.dir: {sweep_dir} already holds {len(held)} record{'s' if len(held) > 1 else ''} of an "
            "earlier sweep, which this one's summary and report would mix in; add resume=true to continue that "
            "sweep (its ok points are kept) or choose a fresh hydra.sweep.dir"
        )


def refuse_reused_run_dir(run_dir: Path, resume: bool) -> None:
    """A single run's folder that holds a record already, without ``resume=true``: the run would overwrite it
    (a ``hydra.run.dir=`` given twice; the default's name has microseconds, so two runs never share it)."""
    if held := _records_to_overwrite(run_dir, resume):
        raise ConfigError(
            f"hydra.run.dir: {run_dir} already holds the record of an earlier run ({held[0]}), which this run would "
            "overwrite; add resume=true (an ok record of this point is kept, another point's is not overwritten) "
            "or choose another hydra.run.dir"
        )


def refuse_dropped_points(sweep_dir: Path, earlier: dict[str, Any], keys: list[str]) -> None:
    """``resume=true`` continues the sweep planned in ``sweep_dir``: a plan that leaves out some of its points
    would mix their records into this sweep's summary and report. ``earlier``: its ``sweep.json``."""
    before, planned = earlier.get("point_keys") or [], set(keys)
    dropped = [i for i, key in enumerate(before) if key not in planned]
    if dropped:
        points = earlier.get("points") or []
        first = " ".join(points[dropped[0]]) if dropped[0] < len(points) else before[dropped[0]]
        raise ConfigError(
            f"hydra.sweep.dir: resume=true continues the sweep planned in {sweep_dir}, but this plan leaves out "
            f"{len(dropped)} of its {len(before)} points (e.g. {first}), whose records would be mixed in; resume "
            "it with the same sweep (points may be added) or choose a fresh hydra.sweep.dir"
        )


def usable_cpus() -> int:
    """The cores joblib counts for a negative ``n_jobs``."""
    try:
        from joblib import cpu_count
    except ImportError:
        return os.cpu_count() or 1
    return cpu_count()


def _joblib_workers(n_jobs: Any) -> tuple[int, str]:
    """How many points joblib runs at once for ``n_jobs`` (negative: ``cores + 1 + n_jobs``), and how it counted."""
    n = int(n_jobs or 1)  # None: joblib's default, one at a time (0 joblib refuses itself)
    if n > 0:
        return n, ""
    how = "one per core" if n == -1 else f"all cores but {-n - 1}"
    return max(usable_cpus() + 1 + n, 1), f" (n_jobs={n}: {how})"


def launcher_warning(config: DictConfig, n_points: int | None) -> tuple[str | None, bool]:
    """Why timings may interfere or mislead, and whether the launcher runs several points at once on one machine
    or device (the summary's note says so, from ``sweep.json``)."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        workers, how = _joblib_workers(launcher.get("n_jobs"))
        at_once = min(workers, n_points or workers)
        if at_once > 1:
            return (f"the joblib launcher runs up to {at_once} points at once on this machine{how}: their timings "
                    "interfere; set hydra.launcher.n_jobs=1 to measure"), True  # fmt: skip
    if target.endswith("submitit_launcher.LocalLauncher") and (n_points or 2) > 1:
        return (
            "the submitit local launcher starts every point at once on this machine: their timings interfere; "
            "use it to isolate crashes, not to measure (or run one point per machine with submitit_slurm)"
        ), True
    if target.endswith("submitit_launcher.SlurmLauncher"):
        gpus = launcher.get("gpus_per_node") or 0
        if str(config.get("device", "auto")).startswith(("cuda", "auto")) and not gpus and not launcher.get("gres"):
            return "SLURM jobs request no GPU (hydra.launcher.gpus_per_node): points would run without one", False
        if (launcher.get("tasks_per_node") or 1) > 1:
            return "several tasks per SLURM node would share its devices: timings interfere (tasks_per_node=1)", True
    return None, False


def parallel_warning(config: DictConfig, n_points: int | None) -> str | None:
    """Why timings may interfere: a launcher that runs several points at once on one machine or device."""
    return launcher_warning(config, n_points)[0]
