"""Distilled engine and the surgery it builds on."""

from __future__ import annotations

import pytest
import torch

from engines.base import PrepareContext, make_engine
from engines.generate import greedy
from engines.llama import ModelArgs, Transformer
from engines.surgery import evenly_spaced, shrink
from harness import training
from harness.corpus import load_corpus

ARGS = ModelArgs(vocab_size=256, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=96, max_seq_len=128,
                 tie_embeddings=False)  # fmt: skip


def ctx(tmp_path, trained=False, key="ref", args=ARGS):
    c = load_corpus()
    return PrepareContext(
        torch.device("cpu"),
        torch.float32,
        0,
        "t",
        args,
        tmp_path,
        reference_key=key,
        trained=trained,
        train_tokens=c.tokens("train"),
        heldout_tokens=c.tokens("heldout"),
    )


def test_evenly_spaced_layers():
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 3) == [0, 2, 4]
    assert evenly_spaced(4, 1) == [0]
    with pytest.raises(ValueError):
        evenly_spaced(4, 5)


def test_shrink_keeping_everything_is_the_same_model():
    teacher = Transformer.build(ARGS, seed=1)
    x = torch.randint(0, 256, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(shrink(teacher)(x), teacher(x), rtol=0, atol=0)


def test_removing_dead_channels_and_heads_changes_nothing():
    """Channels whose output weights are zero and KV groups whose query heads write nothing can be cut exactly,
    which checks that surgery moves the right rows and columns (GQA groups included)."""
    teacher = Transformer.build(ARGS, seed=2)
    group, hd = ARGS.n_heads // ARGS.n_kv_heads, ARGS.head_dim
    keep_ffn, keep_kv = [], []
    with torch.no_grad():
        for layer in teacher.layers:
            dead = torch.randperm(ARGS.intermediate_size)[:32]
            layer.feed_forward.w2.weight[:, dead] = 0
            keep_ffn.append(torch.tensor(sorted(set(range(ARGS.intermediate_size)) - set(dead.tolist()))))
            dead_group = int(torch.randint(0, ARGS.n_kv_heads, ()))
            cols = slice(dead_group * group * hd, (dead_group + 1) * group * hd)
            layer.attention.wo.weight[:, cols] = 0
            keep_kv.append(torch.tensor([g for g in range(ARGS.n_kv_heads) if g != dead_group]))
    small = shrink(teacher, None, keep_ffn, keep_kv)
    assert small.args.intermediate_size == 64 and small.args.n_kv_heads == 3 and small.args.n_heads == 6
    assert small.args.head_dim == ARGS.head_dim
    x = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        torch.testing.assert_close(small(x), teacher(x), rtol=1e-5, atol=1e-5)
    # and the smaller model runs prefill/decode with its own KV cache
    small.setup_caches(2, 24 + 6)
    with torch.inference_mode():
        out = greedy(small, x, 6)
    assert out.shape == (2, 6)


def test_untrained_teacher_gives_an_undistilled_student(tmp_path):
    teacher = Transformer.build(ARGS, seed=0)
    eng = make_engine({"name": "distilled", "width": 0.5})
    student = eng.prepare(teacher, ctx(tmp_path, trained=False))
    info = student.engine_info
    assert info["trained"] is False and "random weights" in info["note"]
    assert info["layers_kept"] == [0, 3] and student.args.n_layers == 2
    assert student.args.intermediate_size == 48 and student.args.n_kv_heads == 2 and student.args.n_heads == 4
    assert eng.variant() == "distilled(width=0.5)"
    assert sum(p.numel() for p in student.parameters()) == info["student_params"] < ARGS.num_params()


def test_invalid_params_are_refused():
    from engines.base import EngineError

    with pytest.raises(EngineError, match=r"engine.depth must be in \(0, 1\]"):
        make_engine({"name": "distilled", "depth": 1.5})
    teacher = Transformer.build(ARGS, seed=0)
    with pytest.raises(ValueError, match=r"engine.layers_kept: indices must be in 0..3"):
        make_engine({"name": "distilled", "layers_kept": [0, 7]}).derive(teacher)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"seq_len": 0}, "engine.seq_len must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "engine.batch_size must be an integer >= 1, got 0"),
        ({"steps": -1}, "engine.steps must be an integer >= 0, got -1"),
        ({"lr": -1.0}, "engine.lr must be a finite number > 0, got -1.0"),
        ({"temperature": 0}, "engine.temperature must be a finite number > 0, got 0.0"),
        ({"temperature": float("inf")}, "engine.temperature must be a finite number > 0, got inf"),
        ({"layers_kept": ["a"]}, "engine.layers_kept[0]: expected an integer, got 'a'"),
        ({"layers_kept": [0, 0.5]}, "engine.layers_kept[1]: expected an integer, got 0.5"),
        # the same student as [1] or [0, 3] under another variant and key: refused, with what was meant
        ({"layers_kept": [1, 1]}, "engine.layers_kept: give distinct layer indices in increasing order, got [1, 1] "
                                  "(did you mean [1]?)"),
        ({"layers_kept": [3, 0]}, "did you mean [0, 3]?"),
    ],
)
def test_each_bad_param_is_named_with_its_value(params, message):
    from engines.base import EngineError

    with pytest.raises(EngineError) as err:
        make_engine({"name": "distilled", **params})
    assert message in str(err.value)


def test_a_training_window_longer_than_the_teacher_context_is_refused(tmp_path):
    teacher = Transformer.build(ARGS, seed=0)
    eng = make_engine({"name": "distilled", "steps": 1, "seq_len": 200})
    with pytest.raises(ValueError, match=r"engine.seq_len: 200 exceeds the teacher's context \(128\)"):
        eng.prepare(teacher, ctx(tmp_path, trained=True))


def test_teachers_without_a_reference_key_are_never_served_from_the_cache(tmp_path):
    """Two different teachers that the context does not identify: each student is distilled from its own."""
    eng = make_engine({"name": "distilled", "steps": 2, "batch_size": 2, "seq_len": 16})
    students = [eng.prepare(Transformer.build(ARGS, seed=s), ctx(tmp_path, trained=True, key="")) for s in (0, 1)]
    assert [s.engine_info["cached"] for s in students] == [False, False]
    assert not (tmp_path / "students").exists()
    a, b = (s.tok_embeddings.weight for s in students)
    assert not torch.equal(a, b)


def test_distillation_trains_toward_the_teacher_and_is_cached(tmp_path, trained_tiny):
    args = ModelArgs.from_dict(trained_tiny["args"])
    teacher = training.load_trained(args, trained_tiny["path"], torch.device("cpu"), torch.float32)
    eng = make_engine({"name": "distilled", "steps": 30, "batch_size": 8, "seq_len": 64, "lr": 5e-4})
    student = eng.prepare(teacher, ctx(tmp_path, trained=True, key="tiny-fixture", args=args))
    info = student.engine_info
    assert info["trained"] is True and info["cached"] is False and info["steps"] == 30
    assert info["distilled_bits_per_byte"] < info["init_bits_per_byte"]
    again = eng.prepare(teacher, ctx(tmp_path, trained=True, key="tiny-fixture", args=args)).engine_info
    assert again["cached"] is True and again["distilled_bits_per_byte"] == info["distilled_bits_per_byte"]
    other = eng.prepare(teacher, ctx(tmp_path, trained=True, key="another-teacher", args=args)).engine_info
    assert other["cached"] is False  # a different teacher is a different student


def test_depth_options_sit_beside_eager_in_one_sweep(compose_cfg):
    """README's distillation sweep: `-m engine=eager,distilled/depth50,distilled/depth75` (engine.depth=... would
    be refused on eager, which has no depth)."""
    from harness.config import validate

    for option, depth in (("depth50", 0.5), ("depth75", 0.75)):
        spec = validate(compose_cfg(f"engine=distilled/{option}"))
        assert spec.engine.name == "distilled" and spec.engine.params.depth == depth


def test_layers_kept_resets_the_unused_depth():
    """layers_kept overrides depth: a depth given beside it would make another variant, point key and student
    for the same student."""
    a = make_engine({"name": "distilled", "layers_kept": [0, 3]})
    b = make_engine({"name": "distilled", "depth": 0.75, "layers_kept": [0, 3]})
    assert a.params == b.params and a.variant() == b.variant() and b.params.depth == 0.5
    assert make_engine({"name": "distilled", "depth": 0.75}).params.depth == 0.75


def test_a_student_entry_is_checked_built_outside_the_deadline_and_versioned(tmp_path, monkeypatch, caplog):
    """A cached student whose tensors are not the student's (another surgery, a foreign file) is distilled again
    with a one-line warning; distilling pauses the point's deadline and records how long it took; a new
    DISTILL_VERSION never reads older students."""
    import json
    import logging
    import time

    import engines.distilled as distilled
    from harness.isolation import deadline

    real_fit = distilled.fit
    monkeypatch.setattr(distilled, "fit", lambda *a, **k: time.sleep(0.6) or real_fit(*a, **k))
    eng = make_engine({"name": "distilled", "steps": 2, "batch_size": 2, "seq_len": 16})
    teacher = Transformer.build(ARGS, seed=0)
    with deadline(0.4):  # shorter than the build: the build is not the point's time
        info = eng.prepare(teacher, ctx(tmp_path, trained=True)).engine_info
    assert info["cached"] is False and info["build_s"] > 0.6
    (path,) = (tmp_path / "students").glob("*.safetensors")
    other = make_engine({"name": "distilled", "steps": 2, "batch_size": 2, "seq_len": 16, "depth": 0.75})
    other.prepare(teacher, ctx(tmp_path / "other", trained=True))
    (foreign,) = (tmp_path / "other" / "students").glob("*.safetensors")  # a 3-layer student
    path.write_bytes(foreign.read_bytes())
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "sha256": json.loads(
        foreign.with_suffix(".json").read_text())["sha256"]}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        again = eng.prepare(teacher, ctx(tmp_path, trained=True)).engine_info
    assert again["cached"] is False and "unexpected tensor layers.2." in caplog.text and str(path) in caplog.text
    assert eng.prepare(teacher, ctx(tmp_path, trained=True)).engine_info["cached"] is True
    monkeypatch.setattr(distilled, "DISTILL_VERSION", distilled.DISTILL_VERSION + 1)
    assert eng.prepare(teacher, ctx(tmp_path, trained=True)).engine_info["cached"] is False
    assert len(list((tmp_path / "students").glob("*.safetensors"))) == 2
