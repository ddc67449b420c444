"""Shared fixtures: small model shapes, a composed-config factory, and a harness runner."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from engines.llama import ModelArgs, Transformer
from harness.paths import config_dir

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture()
def run_harness(monkeypatch):
    """Run `harness <args>` in-process (the same code path as the console script); returns the exit code."""
    from harness.cli import main

    def _run(*args: str) -> int:
        GlobalHydra.instance().clear()
        try:
            return main(list(args))
        finally:
            GlobalHydra.instance().clear()
            # Hydra configures logging per job; leave pytest's handlers as they were
            logging.getLogger().handlers = [h for h in logging.getLogger().handlers if "pytest" in type(h).__module__]

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    return _run


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
