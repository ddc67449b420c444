"""The Hydra application behind `harness run`: one call of ``task`` measures one point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness import interleave
from harness.config import validate
from harness.isolation import run_isolated
from harness.paths import config_dir
from harness.point import apply_process_settings, identity, run_point
from harness.progress import progress, progress_text
from harness.records import RECORD_NAME, earlier_records, key_and_status, measured_ok, point_key

log = logging.getLogger("harness")


def register_launcher() -> None:
    """Make ``hydra/launcher=interleaved`` known. Hydra finds launchers by scanning the hydra_plugins namespace,
    which an editable install's import hook hides from the scan, so the class is registered by name as well."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.harness_launcher.interleaved_launcher import InterleavedLauncher  # stores its config too

    Plugins.instance().register(InterleavedLauncher)


register_launcher()


def _describe(spec) -> str:
    w = spec.workload
    beams = f" beams={w.num_beams}" if w.decoding == "beam" else ""
    return (
        f"{spec.engine.variant()} · {spec.model.name} · batch={w.batch_size} prompt={w.prompt_len} "
        f"gen={w.gen_len}{beams} · {spec.device.type} {spec.dtype_name}"
    )


def sweep_dir_of(hc: DictConfig) -> Path | None:
    """The sweep's folder of a multirun job (None for a single run). A relative ``hydra.sweep.dir`` is relative
    to where `harness run` started, not to the job's folder that ``hydra.job.chdir=true`` moves into."""
    if hc.mode != RunMode.MULTIRUN:
        return None
    cwd = OmegaConf.select(hc, "runtime.cwd")
    return Path(cwd or ".") / str(hc.sweep.dir)


def sweep_info(hc: DictConfig) -> dict[str, Any]:
    """The record's sweep section from a job's Hydra config (``HydraConfig.get()`` or a config's ``hydra``)."""
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = sweep_dir_of(hc)
    return {
        "dir": str(sweep_dir.resolve()) if sweep_dir else None,
        "job": hc.job.num if multirun else None,
        "overrides": list(OmegaConf.to_container(hc.overrides.task)),
        "mode": "multirun" if multirun else "run",
    }


RESUMED_DIR = "points"  # root/points/<point key>: a resumed point whose job folder holds another point's record


def _record_key(path: Path) -> str | None:
    """The point key of the record at ``path``: None when there is none, "" when it cannot be read."""
    if not path.exists():
        return None
    held = key_and_status(path)
    return held[0] if held else ""


def record_dir(root: Path, job_dir: Path, key: str) -> Path:
    """Where a point that ``resume=true`` runs (again) writes its record: never over another point's record.

    Its job folder when that holds no record or this point's earlier attempt; else the folder of this point's
    earlier attempt elsewhere under ``root``, which it replaces (one record per point, as the report, history
    and missing points expect); else ``root/points/<key>`` (a sweep resumed in another order: its job folder
    holds the record of another point). An unreadable record there (a file cut short) is whose no one can tell:
    it is moved aside to ``record.json.corrupt``, so that the sweep's readers (history, compare) no longer stop
    on it, and the folder takes this point's record."""
    here = _record_key(job_dir / RECORD_NAME)
    if here == "":
        broken = job_dir / RECORD_NAME
        broken.replace(broken.with_name(RECORD_NAME + ".corrupt"))
        log.warning("  %s could not be read: moved aside to %s.corrupt", broken, RECORD_NAME)
        here = None
    if here == key:
        return job_dir
    earlier = earlier_records(root, key)
    if earlier:
        return earlier[0][0].parent
    return job_dir if here is None else root / RESUMED_DIR / key


def already_measured(spec, directory: Path, key: str) -> Path | None:
    """The ok record of point ``key`` under ``directory`` that resume may keep: measured under this config, on an
    environment of the same id and at the same git SHA (``records.measured_ok``). The fingerprint is taken as
    the point's record would take it (its thread count set first)."""
    from harness.env import fingerprint

    apply_process_settings(spec)
    return measured_ok(directory, key, spec.cfg, fingerprint(spec.device))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def task(cfg: DictConfig) -> dict[str, Any]:
    spec = validate(cfg)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = sweep_dir_of(hc)
    job = hc.job.num if multirun else None
    sweep = sweep_info(hc)
    prefix = progress_text(progress(sweep_dir, job)) + " " if multirun else ""
    out_dir = job_dir = Path(hc.runtime.output_dir)
    key = point_key(identity(spec))
    # the interleaved launcher timed it already, in turns with its group (a resumed point it measured again
    # holds an ok record by now: that is this run's measurement, not an earlier one to skip)
    measured = interleave.take(job_dir)
    if measured is None and spec.resume:
        done = already_measured(spec, sweep_dir or job_dir, key)
        if done is not None:
            log.info("%s%s: already measured ok in %s, skipped (resume=true)", prefix, _describe(spec), done)
            return {"status": "ok", "point_key": key, "resumed": str(done)}
    log.info("%s%s", prefix, _describe(spec))
    if measured is None and spec.resume:
        out_dir = record_dir(sweep_dir or job_dir, job_dir, key)
        if out_dir != job_dir:
            log.info("  %s holds another point's record (kept): this one's goes to %s", job_dir, out_dir)
    if measured is not None:
        record = measured
    elif spec.isolate:
        record = run_isolated(spec, out_dir, sweep, spec.policy.timeout_s)
    else:
        record = run_point(spec, out_dir, sweep, timeout_s=spec.policy.timeout_s)
    if record["status"] == "ok":
        s, m = record["summary"], record["metrics"]
        log.info(
            "  ok: TTFT p50 %.3g ms, TPOT p50 %.3g ms (±%.1f%%), %.4g decode tok/s, n=%d (%s), peak %.0f MiB",
            s["ttft_ms"]["p50"],
            s["tpot_ms"]["p50"],
            100 * s["tpot_ms"]["ci_rel_halfwidth"],
            m["decode_tokens_per_s"],
            record["timing"]["reps"],
            record["timing"]["stop_reason"],
            m["peak_memory_mb"],
        )
    else:
        log.warning("  %s: %s", record["status"], record["error"])
    return {"status": record["status"], "point_key": record["point_key"]}
