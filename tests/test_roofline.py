"""Roofline: byte and FLOP counts against hand-computed values, MBU/MFU arithmetic, cached peaks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engines.llama import ModelArgs
from harness.roofline import decode_counts, device_peaks, prefill_counts, roofline

# dim 8, one layer, 2 query heads and 1 KV head of size 4, FFN 16, vocabulary 32, untied embeddings.
ARGS = ModelArgs(vocab_size=32, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=16, max_seq_len=64,
                 tie_embeddings=False)  # fmt: skip
# linears: wq 8x8, wo 8x8 (128) + wk, wv 8x4 each (64) + FFN 3 x 8x16 (384) + head 32x8 (256) = 832 parameters;
# stored as well: the embedding table (256) and three norms (24): 1112 parameters.
FP32_BYTES = 1112 * 4


def test_parameter_bookkeeping_matches_the_model():
    assert ARGS.num_params() == 1112


def test_decode_counts_fp32_by_hand():
    c = decode_counts(ARGS, FP32_BYTES, rows=1, context=10, elem=4)
    # weights minus the embedding table (only one row of it is read): 4448 - 1024 + 32 = 3456 bytes;
    # KV cache: K and V of 1 head x 4 dims x 4 bytes = 32 bytes per position, read over 10 and one written = 352
    assert c.bytes == 3456 + 352
    # 2 FLOPs per weight of the linears (832) plus attention 4 x 2 heads x 4 dims x 11 positions (10 and its own)
    assert c.flops == 2 * 832 + 352
    assert c.intensity == pytest.approx((2 * 832 + 352) / (3456 + 352))


def test_decode_counts_scale_with_rows_and_follow_int8_weights():
    four = decode_counts(ARGS, FP32_BYTES, rows=4, context=10, elem=4)
    assert four.bytes == 3456 - 32 + 4 * 32 + 4 * 352 and four.flops == 4 * (2 * 832 + 352)
    # int8 linears (832 bytes, scales ignored here) with the embedding table and norms still fp32
    int8_bytes = 832 + (256 + 24) * 4
    c = decode_counts(ARGS, int8_bytes, rows=1, context=10, elem=4)
    assert c.bytes == int8_bytes - 1024 + 32 + 352 and c.flops == 2 * 832 + 352  # fewer bytes, same FLOPs


def test_decode_counts_of_a_structurally_pruned_model():
    pruned = ModelArgs(**{**ARGS.to_dict(), "intermediate_size": 8})  # half the FFN channels removed
    linear = 128 + 64 + 3 * 8 * 8 + 256
    stored = (linear + 256 + 24) * 4
    c = decode_counts(pruned, stored, rows=1, context=10, elem=4)
    assert c.bytes == stored - 1024 + 32 + 352 and c.flops == 2 * linear + 352


def test_prefill_counts_by_hand():
    c = prefill_counts(ARGS, FP32_BYTES, rows=1, prompt=6, elem=4)
    # weights once (without the table) + per token one embedding row (32 B) and one K/V row written (32 B)
    assert c.bytes == 4448 - 1024 + 6 * (32 + 32)
    # linears for 6 tokens + causal attention 2 x 2 heads x 4 dims x 6^2
    assert c.flops == 2 * 832 * 6 + 2 * 2 * 4 * 36


def test_roofline_section_rates_and_utilizations():
    peaks = {"bandwidth_gbs": 10.0, "flops": 1e11, "source": "config"}
    r = roofline(ARGS, FP32_BYTES, 4, rows=1, prompt_len=10, gen_len=3, tpot_ms=0.001, ttft_ms=0.01, peaks=peaks)
    # gen_len 3: two timed decode steps, at positions 10 and 11, attending 10 and 11 cached positions
    dec = decode_counts(ARGS, FP32_BYTES, 1, 10.5, 4)
    assert r["decode"]["mean_context"] == 10.5 and r["decode"]["bytes_per_step"] == dec.bytes
    assert r["decode"]["achieved_gbs"] == pytest.approx(dec.bytes / 1e-6 / 1e9)
    assert r["decode"]["mbu"] == pytest.approx(dec.bytes / 1e-6 / 10e9)
    pre = prefill_counts(ARGS, FP32_BYTES, 1, 10, 4)
    assert r["prefill"]["mfu"] == pytest.approx(pre.flops / 1e-5 / 1e11)


def test_a_tied_table_whose_head_was_replaced_is_not_counted_as_read(tmp_path):
    """`quantized engine.layers=[all]` on a tied model: the head is an int8 copy, the fp32 table stays stored and
    only one row of it is read a step. Counting it whole (as `tie_embeddings` alone says) overstates MBU."""
    from engines.base import PrepareContext, make_engine, weight_bytes
    from engines.llama import Transformer
    from harness.roofline import unread_table_bytes

    args = ModelArgs(vocab_size=512, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=128,
                     max_seq_len=64, tie_embeddings=True)  # fmt: skip
    ref = Transformer.build(args)
    assert unread_table_bytes(ref) == 0  # the head reads the table: counted as the head's weights
    engine = make_engine({"name": "quantized", "scheme": "int8_weight_only", "layers": ["all"]})
    q = engine.prepare(ref, PrepareContext(torch.device("cpu"), torch.float32, 0, "t", args, tmp_path))
    table = args.vocab_size * args.dim * 4
    assert unread_table_bytes(q) == table
    stored = weight_bytes(q)
    c = decode_counts(args, stored, rows=1, context=10, elem=4, table_bytes=unread_table_bytes(q))
    kv = 2 * args.n_kv_heads * args.head_dim * 4 * 11
    assert type(q.output).__name__ != "Linear" and c.bytes == stored - table + 64 * 4 + kv
    assert decode_counts(args, stored, rows=1, context=10, elem=4).bytes == c.bytes + table  # the overcount


@pytest.fixture()
def peak_calls(monkeypatch) -> list[str]:
    """Peak measurements faked (20 GB/s, 0.1 TFLOP/s): the list records each one taken, "bw" or "fl"."""
    import harness.roofline as roof

    calls: list[str] = []
    monkeypatch.setattr(
        roof,
        "measure_bandwidth",
        lambda d: calls.append("bw") or {"bandwidth_gbs": 20.0, "buffer_bytes": 1, "llc_bytes": 1},
    )
    monkeypatch.setattr(roof, "measure_flops", lambda d, t: calls.append("fl") or {"flops": 1e11, "matmul_n": 8})
    return calls


def test_peaks_are_measured_once_cached_and_overridable(tmp_path, peak_calls):
    calls = peak_calls
    cpu = torch.device("cpu")
    first = device_peaks(cpu, torch.float32, "fp1", tmp_path, {})
    again = device_peaks(cpu, torch.float32, "fp1", tmp_path, {})
    assert calls == ["bw", "fl"] and first["bandwidth_gbs"] == again["bandwidth_gbs"] == 20.0
    assert json.loads((tmp_path / "peaks" / "fp1-float32.json").read_text())["flops"] == 1e11
    over = device_peaks(cpu, torch.float32, "fp1", tmp_path, {"bandwidth_gbs": 50.0, "tflops": 2.0})
    assert over["bandwidth_gbs"] == 50.0 and over["flops"] == 2e12 and over["source"] == "config"
    assert over["bandwidth_kind"] == "config"
    device_peaks(cpu, torch.float32, "fp1", tmp_path, {}, remeasure=True)
    device_peaks(cpu, torch.bfloat16, "fp1", tmp_path, {})  # another dtype is another matmul peak
    assert calls == ["bw", "fl"] * 3


def test_a_cached_peak_that_is_no_rate_is_measured_again(tmp_path, peak_calls):
    """0 (a division by zero in every point's MFU), a negative or a non-numeric peak in the cache file."""
    cpu, cache = torch.device("cpu"), tmp_path / "peaks" / "fp1-float32.json"
    device_peaks(cpu, torch.float32, "fp1", tmp_path, {})
    for bad in (0, -5.0, True, "fast"):
        data = json.loads(cache.read_text())
        cache.write_text(json.dumps({**data, "flops": bad, "bandwidth_gbs": 20.0}))
        peaks = device_peaks(cpu, torch.float32, "fp1", tmp_path, {})
        assert peaks["flops"] == 1e11 and json.loads(cache.read_text())["flops"] == 1e11, bad
    assert peak_calls == ["bw", "fl"] + ["fl"] * 4  # the bandwidth the cache held stands


def test_overridden_peaks_are_neither_measured_nor_cached(tmp_path, peak_calls):
    calls = peak_calls
    cpu, cache = torch.device("cpu"), tmp_path / "peaks" / "fp1-float32.json"
    both = device_peaks(cpu, torch.float32, "fp1", tmp_path, {"bandwidth_gbs": 50.0, "tflops": 2.0})
    assert calls == [] and not cache.exists()  # an empty cache and both overrides: no >= 1 GiB copy, no matmul
    assert both["bandwidth_gbs"] == 50.0 and both["flops"] == 2e12 and both["source"] == "config"
    device_peaks(cpu, torch.float32, "fp1", tmp_path, {"bandwidth_gbs": 50.0, "tflops": 2.0}, remeasure=True)
    assert calls == [] and not cache.exists()
    # one override: only the other peak is measured and cached
    bw_only = device_peaks(cpu, torch.float32, "fp1", tmp_path, {"bandwidth_gbs": 50.0, "tflops": None})
    assert calls == ["fl"] and bw_only["bandwidth_gbs"] == 50.0 and bw_only["flops"] == 1e11
    # each figure says what it stands on: MFU on a measured peak, MBU on the configured one
    assert (bw_only["bandwidth_source"], bw_only["flops_source"]) == ("config", "measured")
    assert bw_only["source"] == "bandwidth config, flops measured"
    assert "bandwidth_gbs" not in json.loads(cache.read_text())
    # without overrides the missing peak is measured, the cached one kept
    plain = device_peaks(cpu, torch.float32, "fp1", tmp_path, {})
    assert calls == ["fl", "bw"] and plain["source"] == "measured"
    assert json.loads(cache.read_text())["flops"] == 1e11 and json.loads(cache.read_text())["bandwidth_gbs"] == 20.0
    # remeasure with one override: the other is measured again, the overridden one stays as cached
    device_peaks(cpu, torch.float32, "fp1", tmp_path, {"tflops": 2.0}, remeasure=True)
    assert calls == ["fl", "bw", "bw"] and json.loads(cache.read_text())["flops"] == 1e11


MiB = 1 << 20


@pytest.mark.parametrize(
    ("llc", "available", "expected"),
    [
        (2 * MiB, 1 << 30, 8 * MiB),  # four times the last-level cache
        (None, 1 << 30, 1 * MiB),  # no cache size readable: the minimum buffer
        (64 * MiB, 64 * MiB, 8 * MiB),  # capped at an eighth of the available memory (two buffers, headroom)
    ],
)
def test_bandwidth_buffer_sizing_rule(monkeypatch, llc, available, expected):
    """The copy buffer is min(max(4 x LLC, MIN_BUFFER), available // 8): the rule, not this machine's memory
    (a 7 GB CI runner caps a 1 GiB minimum), with a small real copy."""
    from types import SimpleNamespace

    from harness import roofline

    monkeypatch.setattr(roofline, "last_level_cache_bytes", lambda: llc)
    monkeypatch.setattr(roofline, "MIN_BUFFER", 1 * MiB)
    monkeypatch.setattr(roofline.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    bw = roofline.measure_bandwidth(torch.device("cpu"))
    assert bw["buffer_bytes"] == expected and bw["llc_bytes"] == llc
    assert bw["buffer_bytes"] == min(max(4 * (llc or 0), 1 * MiB), available // 8)
    assert bw["bandwidth_gbs"] > 0 and math.isfinite(bw["bandwidth_gbs"])
    assert bw["bandwidth_kind"] == "read" and bw["copy_gbs"] > 0  # the roof a read; the copy beside it


@pytest.mark.slow
def test_real_bandwidth_measurement_is_plausible():
    """This machine's own measurement (GiB buffers; the sizing rule is tested fast above)."""
    import psutil

    from harness.roofline import MIN_BUFFER, measure_bandwidth

    bw = measure_bandwidth(torch.device("cpu"))
    cap = psutil.virtual_memory().available // 8  # read again after the measurement: half of it, for the drift
    assert bw["buffer_bytes"] >= 0.5 * min(max(4 * (bw["llc_bytes"] or 0), MIN_BUFFER), cap)
    assert 1.0 < bw["bandwidth_gbs"] < 2000.0 and math.isfinite(bw["bandwidth_gbs"])
