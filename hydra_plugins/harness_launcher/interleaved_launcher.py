"""Hydra launcher ``hydra/launcher=interleaved``: the sweep's points that differ only in their engine are timed
in turns, one repetition each per round, in this process (see harness.interleave), so that their ratios hold on
a machine whose speed drifts. The jobs then run as usual, each reporting the record measured for it.

    harness run -m engine=eager,compiled model=small workload.batch_size=1,8 hydra/launcher=interleaved
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in sys.modules,
# where a dataclass with string annotations cannot resolve them.
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class InterleavedLauncherConf:
    _target_: str = "hydra_plugins.harness_launcher.interleaved_launcher.InterleavedLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="interleaved", node=InterleavedLauncherConf, provider="harness"
)


class InterleavedLauncher(Launcher):
    def __init__(self, **_: Any) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _job_config(self, overrides: list[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        from harness import interleave
        from harness.app import already_measured, record_dir, sweep_info
        from harness.config import validate
        from harness.records import point_key

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        log.info("Launching %d jobs locally, the points of each workload timed in turns", len(configs))
        jobs = []
        for cfg in configs:
            HydraConfig.instance().set_config(cfg)
            spec = validate(cfg)
            sweep_dir = Path(str(cfg.hydra.sweep.dir))
            job_dir = sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
            out_dir, key = job_dir, point_key(interleave.identity(spec))
            if spec.resume:
                if already_measured(spec, sweep_dir, key):
                    continue  # its task reports the earlier record (resume=true: same config, env and SHA)
                out_dir = record_dir(sweep_dir, job_dir, key)  # never over another point's record
            jobs.append(interleave.Job(spec, out_dir, sweep_info(cfg.hydra), job_dir=job_dir))
        interleave.run(jobs)
        runs = []
        for cfg, overrides in zip(configs, job_overrides, strict=True):
            log.info("\t#%d : %s", cfg.hydra.job.num, " ".join(filter_overrides(overrides)))
            runs.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=cfg,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )  # fmt: skip
            )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
