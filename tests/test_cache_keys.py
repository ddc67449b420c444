"""Cache keys name what changes the artefact, and nothing else: the same GPU under two spellings is one device, a
restored cache without mtimes is still hit, and a point that rebuilds its reference only to measure quality keeps
the prepared engine it can reuse."""

from __future__ import annotations

import os

import pytest
import torch

from engines.base import PrepareContext
from harness import reference
from harness.config import validate

SMALL = ["model=tiny", "model.weights=random", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.intermediate_size=128", "engine.name=slowed-test"]  # fmt: skip


def test_cuda_and_cuda_0_are_one_device():
    assert reference.device_name(torch.device("cuda")) == reference.device_name(torch.device("cuda", 0)) == "cuda:0"
    assert reference.device_name(torch.device("cpu")) == "cpu"
    assert reference.device_name(torch.device("cuda", 1)) == "cuda:1"


def test_weights_key_follows_the_checkpoint_content_not_its_mtime(compose_cfg, tmp_path):
    spec = validate(compose_cfg("model=tiny", "model.weights=trained"))
    ckpt = tmp_path / "tiny.safetensors"
    ckpt.write_bytes(b"weights")
    info = {"checkpoint": str(ckpt), "training": {"sha256": "a" * 64}}
    first = reference.weights_key(spec, info)
    os.utime(ckpt, ns=(1, 2))  # a cache restored by cp or a CI cache: other mtimes, the same content
    assert reference.weights_key(spec, info) == first
    assert reference.weights_key(spec, {**info, "training": {"sha256": "b" * 64}}) != first  # retrained


def _prepare(spec):
    model, info = reference.reference_model(spec)
    ctx = PrepareContext(spec.device, spec.dtype, spec.seed, spec.model.name, spec.model.args, spec.cache_dir,
                         reference_key=reference.weights_key(spec, info))  # fmt: skip
    return reference.prepare(spec, model, ctx)[0]


@pytest.fixture()
def released():
    """The process-wide reference and prepared-engine caches, empty before the test and again after it (even
    when it fails)."""
    reference.release()
    yield
    reference.release()


def test_rebuilding_the_reference_for_quality_keeps_the_prepared_engines_of_that_reference(compose_cfg, tmp_path,
                                                                                           released):
    spec = validate(compose_cfg(*SMALL, f"cache_dir={tmp_path}"))
    prepared = _prepare(spec)
    reference.release_reference(keep=prepared)  # the timed window holds the engine only
    # the next point (another quality.n_seqs: quality not memoised) builds the reference again...
    again = validate(compose_cfg(*SMALL, f"cache_dir={tmp_path}", "quality.n_seqs=4"))
    model, _ = reference.reference_model(again)
    assert model is not None and reference.cached_prepared(again) is prepared  # ... and keeps the engine
    other = validate(compose_cfg(*SMALL, f"cache_dir={tmp_path}", "seed=1"))  # other weights: the engine goes
    reference.reference_model(other)
    assert reference.cached_prepared(spec) is None
