"""Shared fixtures: small model shapes, a composed-config factory, a harness runner, test-only engines, and one
real sweep that the report tests share."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from engines.base import Engine, register
from engines.llama import ModelArgs, Transformer
from harness.paths import config_dir

REPO = Path(__file__).resolve().parent.parent
QUICK = ["measure=quick", "workload.prompt_len=16", "workload.gen_len=4"]
MALICIOUS = "<script>window.__pwned=1</script>"


@dataclass(frozen=True)
class FailParams:
    phase: str = "prepare"


@register
class FailingEngine(Engine):
    """Test-only engine that breaks in a chosen phase."""

    name = "failing-test"
    Params = FailParams

    def prepare(self, model, ctx):
        if self.params.phase == "prepare":
            raise RuntimeError("injected failure <in prepare>")
        if self.params.phase == "oom":
            raise MemoryError("injected out of memory")
        return model


@dataclass(frozen=True)
class NoParams:
    pass


@register
class UnrepresentativeEngine(Engine):
    """Test-only engine whose timings the harness must show but never rank (like an interpreted kernel)."""

    name = "unranked-test"
    Params = NoParams

    def timing_caveat(self, device):
        return "test engine: kernels run by an interpreter"

    def prepare(self, model, ctx):
        return model


@pytest.fixture(scope="session")
def small_args() -> ModelArgs:
    """A shape that runs in milliseconds: GQA 4:2, untied embeddings, odd intermediate size."""
    return ModelArgs(
        vocab_size=97,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=150,
        max_seq_len=128,
        tie_embeddings=False,
    )


@pytest.fixture(scope="session")
def small_model(small_args) -> Transformer:
    return Transformer.build(small_args, seed=0)


@pytest.fixture()
def compose_cfg():
    """Compose the real config tree with overrides (no job runs)."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def _run_in_process(*args: str) -> int:
    from harness.cli import main

    GlobalHydra.instance().clear()
    try:
        return main(list(args))
    finally:
        GlobalHydra.instance().clear()
        # Hydra configures logging per job; leave pytest's handlers as they were
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if "pytest" in type(h).__module__]


@pytest.fixture()
def run_harness(monkeypatch):
    """Run `harness <args>` in-process (the same code path as the console script); returns the exit code."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    return _run_in_process


@dataclass
class Sweep:
    dir: Path
    code: int
    stdout: str
    malicious: str = MALICIOUS


@pytest.fixture(scope="session")
def report_sweep(tmp_path_factory) -> Sweep:
    """One real tiny sweep, shared by the report tests: eager, a non-representative engine and a failing one at
    batch 1 and 2, with a `<script>` tag in a config value. Its report is written by the sweep's callback."""
    sweep = tmp_path_factory.mktemp("report-sweep") / "sweep"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("HYDRA_FULL_ERROR", "1")
        code = _run_in_process(
            "run",
            "-m",
            "engine.name=eager,unranked-test,failing-test",
            "model=tiny",
            "model.weights=random",  # the report needs real timings, not a trained model (no training here)
            "workload.batch_size=1,2",
            *QUICK,
            f"+note='{MALICIOUS}'",
            f"hydra.sweep.dir={sweep}",
        )
    return Sweep(sweep, code, out.getvalue())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    """Environment for subprocess runs of the console script, as a user's shell would have it."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


TRAIN_STEPS = 40


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> dict:
    """The `tiny` reference trained briefly (TRAIN_STEPS steps) into a session cache directory. Runs that pass
    ``overrides`` load it from that cache instead of training again."""
    from harness.config import validate
    from harness.corpus import load_corpus
    from harness.training import ensure_trained

    cache = tmp_path_factory.mktemp("cache")
    overrides = ["model=tiny", "model.weights=trained", f"cache_dir={cache}", f"train.steps={TRAIN_STEPS}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        spec = validate(compose(config_name="config", overrides=overrides))
    GlobalHydra.instance().clear()
    # the same call a run makes, so the runs below find this checkpoint in the cache
    path, info = ensure_trained("tiny", spec.model.args, load_corpus(), spec.train, spec.seed, spec.device, cache)
    return {"cache": cache, "path": path, "info": info, "args": spec.model.args.to_dict(), "overrides": overrides}
