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


def test_quality_inputs_id_follows_what_quality_is_scored_on_and_nothing_else(compose_cfg):
    """The gate compares fidelity only between records whose ``quality.inputs_id`` agree: it must change with the
    quality settings, seed and corpus, and not with the engine, the batch size or whether quality is on."""
    from harness.point import quality_inputs_id

    def qid(*overrides, corpus=("c" * 64, 1000)):
        return quality_inputs_id(validate(compose_cfg(*SMALL, *overrides)), list(corpus))

    first = qid()
    assert qid("workload.batch_size=8") == qid("engine=eager") == first
    assert qid("quality.n_seqs=4") != first and qid("quality.decode_positions=8") != first
    assert qid("seed=1") != first and qid(corpus=("d" * 64, 1000)) != first
    assert quality_inputs_id(validate(compose_cfg(*SMALL)), None) != first  # random ids, not corpus text


def test_memoized_quality_still_says_what_it_scored(compose_cfg, tmp_path, released):
    """The second batch size of an engine reuses its quality (not recomputed) and still records its inputs."""
    from harness.point import new_record, setup

    overrides = (*SMALL, f"cache_dir={tmp_path}", "quality.n_seqs=2", "quality.seq_len=16", "quality.greedy_prompts=1",
                 "quality.greedy_prompt_len=4", "quality.greedy_len=2", "quality.decode_positions=2")  # fmt: skip
    sections = []
    for batch in (1, 2):
        spec = validate(compose_cfg(*overrides, f"workload.batch_size={batch}"))
        record = new_record(spec, None)
        setup(spec, record, tmp_path)
        sections.append(record["quality"])
    first, second = sections
    assert first["cached"] is False and second["cached"] is True
    for q in sections:
        assert q["inputs"] == "random token ids" and q["rows"] == 4 and q["reference_nonfinite_fraction"] == 0.0
    assert first["inputs_id"] == second["inputs_id"] and len(first["inputs_id"]) == 12
