"""Records: atomic writes, JSON safety, point keys, and the flat table."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from harness.records import (
    RECORD_NAME,
    RecordError,
    load,
    point_key,
    read_record,
    write_json_atomic,
    write_record,
)
from harness.stats import summarize

TABLE_COLUMNS = (
    "status engine model batch_size prompt_len gen_len device dtype ttft_ms_p50 tpot_ms_p50 tpot_ms_p90 tpot_ms_p99 "
    "e2e_ms_p50 decode_tokens_per_s prefill_tokens_per_s peak_memory_mb util_mean energy_j_per_token mbu mfu "
    "fidelity_top1 fidelity_kl ppl variant"
).split()


def fake_record(engine="eager", batch=1, status="ok", params=None, tpot=2.0):
    ident = {
        "engine": engine,
        "variant": engine,
        "engine_params": params or {},
        "model": "tiny",
        "weights": "random",
        "model_args": {},
        "n_params": 3,
        "batch_size": batch,
        "prompt_len": 8,
        "gen_len": 4,
        "decoding": "greedy",
        "num_beams": 1,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
    }
    rng = np.random.default_rng(batch)
    samples = {"ttft_ms": list(rng.uniform(9, 11, 20)), "tpot_ms": list(rng.uniform(tpot, tpot * 1.1, 20))}
    return {
        "status": status,
        "error": None if status == "ok" else "boom",
        "point_key": point_key(ident),
        "identity": ident,
        "env": {"id": "abc", "device_name": "cpu"},
        "samples": samples if status == "ok" else {},
        "summary": {k: summarize(v) for k, v in samples.items()} if status == "ok" else {},
        "metrics": {"decode_tokens_per_s": batch * 1000 / tpot, "peak_memory_mb": 100.0, "mbu": math.nan},
        "timing": {"representative": True, "reps": 20},
    }


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"good": True})

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"good": False})
    assert json.loads(path.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):  # unserializable data never reaches the file either
        monkeypatch.undo()
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"good": True}


def test_nan_and_numpy_values_become_valid_json(tmp_path):
    path = write_json_atomic(
        tmp_path / "r.json",
        {"nan": math.nan, "inf": math.inf, "np": np.float32(1.5), "nested": [np.int64(3), math.nan]},
    )
    assert json.loads(path.read_text()) == {"nan": None, "inf": None, "np": 1.5, "nested": [3, None]}


def test_point_key_is_stable_and_sensitive_to_identity():
    a = fake_record()["identity"]
    assert point_key(a) == point_key(dict(a))
    assert point_key(a) != point_key({**a, "batch_size": 2})
    assert point_key(a) != point_key({**a, "variant": "quantized(scheme=int8_dynamic)"})
    assert point_key(a) == point_key({**a, "n_params": 99})  # derived facts do not change what is measured


def test_load_gives_one_row_per_point_with_the_contract_columns(tmp_path):
    write_record(tmp_path / "0", fake_record(batch=1))
    write_record(tmp_path / "1", fake_record(batch=4))
    write_record(tmp_path / "2", fake_record("quantized", params={"scheme": "int8"}, status="failed"))
    df = load(tmp_path)
    assert len(df) == 3
    for col in TABLE_COLUMNS:
        assert col in df.columns, col
    ok = df[df.status == "ok"].sort_values("batch_size")
    assert list(ok.batch_size) == [1, 4]
    assert np.isfinite(ok.ttft_ms_p50).all() and np.isfinite(ok.tpot_ms_p50).all()
    assert df.mbu.isna().all() and df.fidelity_top1.isna().all()  # not measured yet: NaN, not missing
    failed = df[df.status == "failed"].iloc[0]
    assert failed["engine.scheme"] == "int8" and failed.error == "boom" and math.isnan(failed.ttft_ms_p50)
    assert df.record_path.str.endswith(RECORD_NAME).all()


def test_load_names_and_skips_corrupted_records(tmp_path, caplog):
    write_record(tmp_path / "0", fake_record())
    bad = tmp_path / "1" / RECORD_NAME
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "status": "ok", "ident')  # truncated
    other = tmp_path / "2" / RECORD_NAME
    other.parent.mkdir()
    other.write_text('{"something": "else"}')
    df = load(tmp_path)
    assert len(df) == 1
    assert len(df.attrs["errors"]) == 2
    assert str(bad) in caplog.text and str(other) in caplog.text
    with pytest.raises(RecordError, match=str(bad)):
        load(tmp_path, strict=True)


@pytest.mark.parametrize(
    "body",
    [
        {"summary": [1]},  # a list where the metrics' mapping belongs
        {"summary": {"ttft_ms": [1, 2]}},
        {"identity": {"engine_params": [["bits", 4]]}},
        {"identity": {"engine_params": "bits=4"}},
    ],
)
def test_load_skips_malformed_records_naming_the_file(tmp_path, caplog, body):
    write_record(tmp_path / "0", fake_record())
    bad = write_record(tmp_path / "1", {"status": "ok", **body})
    df = load(tmp_path)
    assert len(df) == 1 and df.iloc[0].status == "ok"
    assert len(df.attrs["errors"]) == 1 and df.attrs["errors"][0].startswith(f"{bad}: malformed record")
    assert str(bad) in caplog.text
    with pytest.raises(RecordError, match=f"^{re.escape(str(bad))}: malformed record"):
        load(tmp_path, strict=True)


def test_load_accepts_files_lists_and_rejects_missing_paths(tmp_path):
    p0 = write_record(tmp_path / "0", fake_record())
    p1 = write_record(tmp_path / "1", fake_record(batch=2))
    assert len(load([p0, p1])) == 2
    assert len(load([tmp_path, p0])) == 2  # de-duplicated
    assert read_record(p0)["schema_version"] == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    empty = load(tmp_path / "empty")
    assert len(empty) == 0 and "tpot_ms_p50" in empty.columns and "status" in empty.columns


def test_atomic_write_goes_through_symlinks_and_into_non_regular_files(tmp_path):
    """A symlinked output keeps its link (its target is replaced); a FIFO or /dev/stdout is written through,
    never renamed over."""
    import os
    import threading

    from harness.records import write_bytes_atomic

    target = tmp_path / "real.md"
    target.write_text("old")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    write_bytes_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_bytes_atomic(fifo, "through")
    reader.join(10)
    assert got == [b"through"] and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.md", "pipe", "real.md"]  # no temp files left


def test_a_directory_named_two_ways_is_read_once(tmp_path, synthetic_point, monkeypatch):
    """Relative and absolute, or the folder and a link to it: the same records, one row each."""
    for b in (1, 2):
        synthetic_point(tmp_path / "sweep" / str(b), ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=b)
    (tmp_path / "link").symlink_to(tmp_path / "sweep")
    monkeypatch.chdir(tmp_path)
    assert len(load(["sweep", str(tmp_path / "sweep"), "link", "sweep/1/record.json"])) == 2


def test_engine_caches_name_the_trained_weights_they_were_made_from(compose_cfg, tmp_path, monkeypatch):
    """Pruning statistics, masks and distilled students are cached under the reference's weights key: a bf16-
    and an fp32-trained checkpoint (precision=auto on two machines sharing a cache) are other weights, and so is
    a checkpoint trained again in place (harness train --force)."""
    import engines.train as train_module
    from harness import reference
    from harness.config import validate

    spec = validate(compose_cfg("model=tiny", "model.weights=trained"))
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    bf16 = reference.reference_key(spec)
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert reference.reference_key(spec) != bf16
    ckpt = tmp_path / "tiny.safetensors"
    ckpt.write_bytes(b"weights")
    first = reference.weights_key(spec, {"checkpoint": str(ckpt)})
    assert reference.weights_key(spec, {"checkpoint": str(ckpt)}) == first  # the same file: the same key
    ckpt.write_bytes(b"retrained")
    os.utime(ckpt, ns=(1, 2))
    assert reference.weights_key(spec, {"checkpoint": str(ckpt)}) != first
    random_spec = validate(compose_cfg("model=tiny", "model.weights=random"))
    assert reference.weights_key(random_spec, {}) == reference.weights_key(random_spec, {})


def test_point_key_of_trained_weights_follows_what_made_them(compose_cfg, tmp_path):
    """Trained weights from other training steps or another corpus are other points (their checkpoints and ppl
    differ); the measure policy and a note are not; random-weight points keep the keys they had."""
    from dataclasses import replace

    from engines.train import resolve_precision
    from harness.config import validate
    from harness.corpus import load_corpus
    from harness.point import identity
    from harness.training import checkpoint_key

    def key(*overrides):
        spec = validate(compose_cfg("model=tiny", *overrides))
        return point_key(identity(spec)), identity(spec), spec

    one, ident, spec = key("model.weights=trained", "train.steps=1")
    three, _, _ = key("model.weights=trained", "train.steps=3")
    assert one != three
    assert key("model.weights=trained", "train.steps=1", "measure=quick", "+note=again")[0] == one
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"another corpus, other weights. " * 4000)
    assert key("model.weights=trained", "train.steps=1", f"corpus.path={text}")[0] != one
    # the checkpoint's own cache key, over the training config as resolved on this device
    train = replace(spec.train, precision=resolve_precision(spec.train.precision, spec.device))
    corpus = load_corpus()
    assert ident["training"] == {
        "corpus_sha256": corpus.sha256,
        "train": {**spec.train.__dict__, "precision": train.precision},
        "checkpoint_key": checkpoint_key(spec.model.args, corpus, train, spec.seed, "cpu"),
    }
    assert train.precision in ("fp32", "bf16")
    # random weights: no training in the identity, whatever train.* says (their keys are those of older records)
    rand, rand_ident, _ = key("model.weights=random", "train.steps=1")
    assert "training" not in rand_ident and key("model.weights=random", "train.steps=3")[0] == rand
    assert set(rand_ident) == {"engine", "variant", "engine_params", "model", "weights", "model_args", "n_params",
                               "batch_size", "prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype",
                               "seed"}  # fmt: skip
    # ... unless the engine calibrates on the corpus (wanda, structured): another corpus prunes other weights
    wanda = ("model.weights=random", "engine=pruned", "engine.method=wanda")
    assert key(*wanda)[1]["corpus_sha256"] == corpus.sha256
    assert key(*wanda, f"corpus.path={text}")[0] != key(*wanda)[0]
    magnitude = ("model.weights=random", "engine=pruned", "engine.method=magnitude")
    assert key(*magnitude, f"corpus.path={text}")[0] == key(*magnitude)[0] and "corpus_sha256" not in key(*magnitude)[1]
    # the in-process caches of prepared engines and of their quality tell the corpora apart the same way
    from harness.point import _quality_key
    from harness.reference import prepared_key

    for cache_key in (prepared_key, _quality_key):
        assert cache_key(key(*wanda, f"corpus.path={text}")[2]) != cache_key(key(*wanda)[2])
        assert cache_key(key(*magnitude, f"corpus.path={text}")[2]) == cache_key(key(*magnitude)[2])


def test_unmeasured_figures_are_nan_in_numeric_columns(tmp_path, synthetic_point):
    """A point that prunes nothing has no sparsity: NaN in a float column, like every figure not measured."""
    from harness.records import load

    synthetic_point(tmp_path / "0", ttft=[5.0] * 3, tpot=[1.0] * 3)
    df = load(tmp_path)
    for col in ("sparsity", "mbu", "ppl"):
        assert df[col].dtype.kind == "f" and df[col].isna().all(), col
