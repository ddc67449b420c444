"""A cache hit is a usable entry: checked names, shapes and content hash; failed writes leave nothing behind;
entries are readable by the team sharing the cache; an entry that cannot be read is never deleted for it."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engines import cache, pruning
from engines.cache import CacheUnreadable, cached, layout_mismatch, save_weights
from engines.llama import ModelArgs, Transformer
from engines.train import TrainConfig
from harness import training
from harness.corpus import load_corpus

MICRO = ModelArgs(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)
FEW = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, precision="fp32")
CPU = torch.device("cpu")


def _train(tmp_path):
    return training.ensure_trained("micro", MICRO, load_corpus(), FEW, 0, CPU, tmp_path)


def test_a_checkpoint_that_no_longer_fits_the_model_is_trained_again(tmp_path, caplog):
    """A tensor missing (older code, a hand-copied file): one warning line naming the entry, then a retrain, not a
    load_state_dict traceback on every later run."""
    ckpt, info = _train(tmp_path)
    assert info["cached"] is False and info["build_s"] > 0
    tensors = load_file(str(ckpt))
    del tensors["layers.1.attention.wk.weight"]
    save_file(tensors, str(ckpt))
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        again, info2 = _train(tmp_path)
    assert again == ckpt and info2["cached"] is False
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(ckpt) in warning and "missing tensor layers.1.attention.wk.weight" in warning and "\n" not in warning
    model = training.load_trained(MICRO, ckpt, CPU, torch.float32)  # loads strictly now
    assert model.layers[1].attention.wk.weight.shape == (16, 32)
    assert _train(tmp_path)[1]["cached"] is True


def test_layout_mismatch_names_the_tensor(tmp_path):
    model = Transformer.build(MICRO)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"key": "k"})
    assert layout_mismatch(path, model) is None
    assert layout_mismatch(path, training.layout(MICRO)) is None  # tied embeddings stored once, meta model serves
    wider = ModelArgs(**{**MICRO.to_dict(), "intermediate_size": 64})
    assert layout_mismatch(path, training.layout(wider)) == "layers.0.feed_forward.w1.weight has shape [48, 32], " \
                                                             "the model [64, 32]"  # fmt: skip
    deeper = ModelArgs(**{**MICRO.to_dict(), "n_layers": 3})
    assert layout_mismatch(path, training.layout(deeper)).startswith("missing tensor layers.2.")
    shallower = ModelArgs(**{**MICRO.to_dict(), "n_layers": 1})
    assert layout_mismatch(path, training.layout(shallower)).startswith("unexpected tensor layers.1.")


def test_corrupted_data_is_caught_by_the_content_hash_at_the_first_load(tmp_path, caplog, monkeypatch):
    """Bytes flipped inside the data section: the header still parses, but the sha256 recorded at save time does
    not match, so the entry is removed and rebuilt instead of serving NaN weights. Checked once per process."""
    model = Transformer.build(MICRO)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"key": "k"})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"] == "k" and len(meta["sha256"]) == 64
    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p: hashed.append(p) or real(p))
    cache._verified.clear()
    assert cached(path, model) and cached(path, model)
    assert len(hashed) == 1  # the first load in this process hashes the file; the next ones trust it
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        assert not cached(path, model)  # the file changed since it was checked: hashed again
    assert "its sha256" in caplog.text and str(path) in caplog.text
    assert not path.exists() and not path.with_suffix(".json").exists()


class _DiskFull(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [_DiskFull, KeyboardInterrupt])
def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    """A full disk, a deadline or Ctrl-C in the middle of a save: the partial temporary file goes too."""

    def partial(write):
        def fail(obj, filename, *args, **kwargs):
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100_000)
            raise error()

        return fail

    monkeypatch.setattr(cache, "save_model", partial(cache.save_model))
    with pytest.raises(error):
        save_weights(Transformer.build(MICRO), tmp_path / "students" / "x.safetensors", {"key": "x"})
    monkeypatch.setattr(pruning, "save_file", partial(pruning.save_file))
    with pytest.raises(error):
        pruning.save_tensors(tmp_path / "pruning" / "m.safetensors", {"a": torch.zeros(3)}, {"key": "m"})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cached_files_get_the_umask_permissions(tmp_path):
    """safetensors writes owner-only files; a cache shared by a team (group-writable directory) must be readable
    by its other users, as the sidecars and records are."""
    old = os.umask(0o002)
    try:
        save_weights(Transformer.build(MICRO), tmp_path / "w.safetensors", {"key": "k"})
        pruning.save_tensors(tmp_path / "m.safetensors", {"a": torch.zeros(3)}, {"key": "m"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o664, "w.json": 0o664, "m.safetensors": 0o664, "m.json": 0o664}
    tensors, meta = pruning.load_tensors(tmp_path / "m.safetensors")
    assert meta["key"] == "m" and len(meta["sha256"]) == 64 and torch.equal(tensors["a"], torch.zeros(3))
    assert cached(tmp_path / "m.safetensors")


def test_an_entry_that_cannot_be_read_is_left_in_place(tmp_path, monkeypatch):
    """PermissionError (another user's file) or an I/O error is no proof the entry is bad: deleting it would make
    two users of a shared cache delete each other's entries. One line names the file; the entry stays."""
    model = Transformer.build(MICRO)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"key": "k"})
    real_open = open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(cache, "open", denied, raising=False)
    with pytest.raises(
        CacheUnreadable,
        match=r"^cache entry .*w\.safetensors cannot be read \(PermissionError: "
        r"Permission denied\): left in place",
    ) as info:
        cached(path, model)
    assert "\n" not in str(info.value)
    assert path.exists() and path.with_suffix(".json").exists()
    monkeypatch.undo()
    assert cached(path, model)


def test_checkpoint_key_names_the_training_code_version_not_the_context_length(monkeypatch):
    corpus = load_corpus()
    key = training.checkpoint_key(MICRO, corpus, FEW, 0, "cpu")
    longer = ModelArgs(**{**MICRO.to_dict(), "max_seq_len": 2048})
    at_256 = ModelArgs(**{**MICRO.to_dict(), "max_seq_len": 256})
    # the context length sizes the rotary table, not the trained weights (only the evaluation window it caps)
    assert training.checkpoint_key(longer, corpus, FEW, 0, "cpu") == training.checkpoint_key(at_256, corpus, FEW, 0,
                                                                                                "cpu")  # fmt: skip
    assert training.checkpoint_key(at_256, corpus, FEW, 0, "cpu") != key  # 64 < 256: another held-out evaluation
    monkeypatch.setattr(training, "TRAIN_VERSION", training.TRAIN_VERSION + 1)
    assert training.checkpoint_key(MICRO, corpus, FEW, 0, "cpu") != key
