"""Reference training: deterministic, cached, invalidated when its inputs change, and it learns."""

from __future__ import annotations

import math

import pytest
import torch

import engines.train as train_module
from engines.cache import file_sha256
from engines.llama import ModelArgs, Transformer
from engines.train import TrainConfig, fit, heldout_nll, lr_at, resolve_precision
from harness import training
from harness.corpus import load_corpus

MICRO = ModelArgs(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=48, max_seq_len=64)
FEW = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert math.isclose(lr_at(99, cfg), 0.1, rel_tol=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_training_is_deterministic_for_a_seed():
    tokens = load_corpus().tokens("train")

    def run(seed):
        model = Transformer.build(MICRO, seed=0)
        losses = fit(model, tokens, TrainConfig(**{**FEW.__dict__, "seed": seed}))
        return model, losses

    (a, la), (b, lb), (c, _) = run(1), run(1), run(2)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_checkpoint_cache_hit_and_invalidation(tmp_path, monkeypatch):
    calls = []
    real = training.train_reference

    def counting(*args, **kwargs):
        calls.append(args[3].steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_reference", counting)
    corpus, cpu = load_corpus(), torch.device("cpu")
    path, info = training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)
    assert calls == [6] and info["cached"] is False and path.exists()
    again, info2 = training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)
    assert again == path and info2["cached"] is True and calls == [6]  # hit: no training
    # the process that trained names the checkpoint by its content as every later one does (reference.weights_key:
    # engines' calibration, masks and students are keyed by it, so a second run must not build them again)
    assert info["sha256"] == info2["sha256"] == file_sha256(path)
    other_steps = TrainConfig(**{**FEW.__dict__, "steps": 7})
    p3, _ = training.ensure_trained("micro", MICRO, corpus, other_steps, 0, cpu, tmp_path)
    text = tmp_path / "text.txt"
    text.write_bytes(b"a different corpus of text. " * 4000)
    p4, _ = training.ensure_trained("micro", MICRO, load_corpus(str(text)), FEW, 0, cpu, tmp_path)
    assert calls == [6, 7, 6] and len({path, p3, p4}) == 3
    loaded = training.load_trained(MICRO, path, cpu, torch.float32)
    trained_again, _ = real("micro", MICRO, corpus, FEW, 0, cpu)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), trained_again.parameters(), strict=True))
    # a checkpoint cut short (a full disk, a killed copy), then a sidecar overwritten: trained again, not failed on
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)[1]["cached"] is False
    path.with_suffix(".json").write_text("{not json")
    assert training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)[1]["cached"] is False
    assert calls == [6, 7, 6, 6, 6]
    assert training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)[1]["cached"] is True


def test_trained_tiny_beats_the_unigram_baseline(trained_tiny):
    info = trained_tiny["info"]
    assert info["heldout_bits_per_byte"] < info["unigram_bits_per_byte"] - 0.3
    assert info["heldout_bits_per_byte"] < info["init_heldout_bits_per_byte"]
    model = training.load_trained(ModelArgs.from_dict(trained_tiny["args"]), trained_tiny["path"],
                                  torch.device("cpu"), torch.float32)  # fmt: skip
    nll = heldout_nll(model, load_corpus().tokens("heldout"))
    assert math.isclose(nll / math.log(2), info["heldout_bits_per_byte"], rel_tol=1e-5)


def test_a_warmup_as_long_as_training_is_warned_about(tmp_path, caplog):
    """The learning rate would never reach train.lr: trained as asked, with a warning naming both fields."""
    import logging

    short = TrainConfig(**{**FEW.__dict__, "steps": 2, "warmup_steps": 20})
    with caplog.at_level(logging.WARNING, logger="harness.training"):
        training.ensure_trained("micro", MICRO, load_corpus(), short, 0, torch.device("cpu"), tmp_path)
    assert "train.warmup_steps=20 is not below train.steps=2: the learning rate never reaches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.training"):
        training.ensure_trained("micro", MICRO, load_corpus(), FEW, 0, torch.device("cpu"), tmp_path)
    assert "warmup_steps" not in caplog.text


def test_precision_auto_resolves_by_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="train.precision: 'fp8' is not allowed; allowed: auto, fp32, bf16"):
        resolve_precision("fp8", cpu)


def test_bf16_training_keeps_fp32_weights_learns_and_is_keyed_apart(tmp_path):
    tokens = load_corpus().tokens("train")
    model = Transformer.build(MICRO, seed=0)
    losses = fit(model, tokens, TrainConfig(**{**FEW.__dict__, "steps": 12, "precision": "bf16"}))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    corpus, cpu = load_corpus(), torch.device("cpu")
    keys = {prec: training.checkpoint_key(MICRO, corpus, TrainConfig(**{**FEW.__dict__, "precision": prec}), 0, "cpu")
            for prec in ("fp32", "bf16")}  # fmt: skip
    assert keys["fp32"] != keys["bf16"]
    p_auto, _ = training.ensure_trained("micro", MICRO, corpus, FEW, 0, cpu, tmp_path)
    resolved = resolve_precision("auto", cpu)
    p_named, info = training.ensure_trained(
        "micro", MICRO, corpus, TrainConfig(**{**FEW.__dict__, "precision": resolved}), 0, cpu, tmp_path
    )
    assert p_auto == p_named and info["cached"] is True and info["train"]["precision"] == resolved


MICRO_OVERRIDES = [
    "device=cpu", "model=tiny", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.intermediate_size=48", "model.max_seq_len=512", "train.steps=2", "train.batch_size=2", "train.seq_len=32",
    "train.warmup_steps=1", "train.precision=fp32",
]  # fmt: skip


def test_harness_train_caches_the_checkpoint_hits_the_cache_and_retrains_with_force(run_harness, tmp_path, capsys):
    """`harness train` on a micro shape: the checkpoint lands in cache_dir, a second call loads it (no
    training), and --force trains again into the same entry."""
    cache = tmp_path / "cache"
    args = ["train", *MICRO_OVERRIDES, f"cache_dir={cache}"]
    assert run_harness(*args) == 0
    out = capsys.readouterr().out
    (ckpt,) = (cache / "checkpoints").glob("*.safetensors")
    assert f"checkpoint: {ckpt}" in out and "loaded from cache" not in out
    assert "2 steps of 2x32 tokens in fp32" in out and "held-out:" in out and "bits/byte" in out
    summary = ckpt.with_suffix(".json")
    first = (ckpt.stat().st_mtime_ns, summary.read_text())

    assert run_harness(*args) == 0
    out = capsys.readouterr().out
    assert "loaded from cache, " in out and f"checkpoint: {ckpt}" in out
    assert (ckpt.stat().st_mtime_ns, summary.read_text()) == first  # read, not written

    assert run_harness(*args, "--force") == 0
    out = capsys.readouterr().out
    assert "loaded from cache" not in out and f"checkpoint: {ckpt}" in out
    assert list((cache / "checkpoints").glob("*.safetensors")) == [ckpt]  # the same entry, trained again
    assert ckpt.stat().st_mtime_ns > first[0]
