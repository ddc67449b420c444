"""Roofline: measured device peaks, and bytes and FLOPs per phase from the model's shape.

Peaks are measured once per device fingerprint and dtype, then cached: read bandwidth (a sum over a buffer
several times the last-level cache: decode reads its weights and writes next to nothing, so a read is its roof),
copy bandwidth beside it for reference (STREAM convention: bytes read plus bytes written; a write-allocating
copy often reaches less), and dense matmul FLOP/s in the run's dtype. A config can override either roof
(``roofline.bandwidth_gbs``, ``roofline.tflops``).

Counts are the algorithmic minimum of a Llama step, so MBU and MFU say how close an engine comes to what the
hardware allows for this model, whatever its implementation does in between:

* decode, one step (one new token for each of B rows): every weight read once (the engine's real stored bytes:
  int8, int4, a smaller student...), the KV cache read over the current context and one new K/V row written;
  FLOPs 2 per multiply-accumulate of the linear layers plus attention over the context;
* prefill of P tokens: the weights once, the KV cache written; linear FLOPs for B*P tokens plus causal
  attention (P^2/2 query-key pairs).

MBU = achieved decode bytes/s over peak read bandwidth (decode is bandwidth-bound); MFU = achieved prefill FLOP/s
over peak FLOP/s (prefill is compute-bound).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from engines.cache import file_lock
from engines.llama import ModelArgs
from harness.records import write_json_atomic

log = logging.getLogger(__name__)

MIN_BUFFER = 1 << 30  # bytes
CACHE_VERSION = 3  # 2: GPU peaks from batches of launches after a warm-up; 3: the bandwidth roof is a read


def last_level_cache_bytes() -> int | None:
    """Largest CPU cache size reported by sysfs (bytes)."""
    best = None
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size.read_text().strip().upper()
            value = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        except (OSError, ValueError):
            continue
        best = max(best or 0, value)
    return best


GPU_WARMUP_S = 0.1  # clocks ramp up and the first launches pay for lazy init: as triton.testing.do_bench warms up
GPU_BATCH_S = 0.02  # launches timed between one pair of events, so a launch's latency is a sliver of the batch


def _timed(fn, device: torch.device, reps: int) -> float:
    """Best-of-``reps`` seconds of one ``fn()`` after an untimed call (first touch, page faults). On CUDA, after
    ``GPU_WARMUP_S`` of calls, each of the ``reps`` samples is a batch of back-to-back calls between two events
    (``GPU_BATCH_S`` long), per call: one launch of a millisecond-long kernel would carry its launch latency."""
    fn()
    if device.type == "cuda":
        return _timed_cuda(fn, device, reps)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_cuda(fn, device: torch.device, reps: int) -> float:
    torch.cuda.synchronize(device)
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < GPU_WARMUP_S or calls < 3:
        fn()
        torch.cuda.synchronize(device)
        calls += 1
    per_call = (time.perf_counter() - t0) / calls
    n = max(1, min(1000, round(GPU_BATCH_S / max(per_call, 1e-7))))
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / 1e3 / n)
    return best


def measure_bandwidth(device: torch.device) -> dict[str, Any]:
    """Read bandwidth (GB/s: the bytes of one fp32 sum over the buffer), the roof MBU stands on, and copy
    bandwidth (read + write bytes), both over buffers of several times the last-level cache."""
    llc = last_level_cache_bytes() if device.type == "cpu" else None
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        size = max(16 * l2, MIN_BUFFER)
    else:
        size = max(4 * (llc or 0), MIN_BUFFER)
        size = min(size, psutil.virtual_memory().available // 8)
    n = size // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    read_s = _timed(lambda: src.sum(), device, reps=5)
    copy_s = _timed(lambda: dst.copy_(src), device, reps=5)
    return {"bandwidth_gbs": n * 4 / read_s / 1e9, "bandwidth_kind": "read", "copy_gbs": 2 * n * 4 / copy_s / 1e9,
            "buffer_bytes": n * 4, "llc_bytes": llc}  # fmt: skip


def measure_flops(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul FLOP/s in ``dtype`` on a square problem large enough to be compute-bound."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, reps=5)
    return {"flops": 2 * n**3 / seconds, "matmul_n": n}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_peaks(path: Path) -> dict[str, Any]:
    """The cached peaks of this version; a peak held as 0, < 0 or nan (a broken or edited cache) is dropped, so
    it is measured again."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    for name in ("bandwidth_gbs", "flops"):
        if name in data and not _positive(data[name]):
            log.warning("peaks cache %s holds %s=%r: measured again", path, name, data[name])
            data.pop(name)
    return data


def device_peaks(
    device: torch.device,
    dtype: torch.dtype,
    fingerprint_id: str,
    cache_dir: Path,
    overrides: dict[str, Any],
    remeasure: bool = False,
) -> dict[str, Any]:
    """Peaks for this device and dtype: overrides from config, else cached measurements, else measured now
    (``remeasure`` measures again and replaces the cache, e.g. after a noisy first measurement). A peak the
    config overrides is neither measured nor cached: with both overridden nothing is measured."""
    dtype_name = str(dtype).removeprefix("torch.")
    path = Path(cache_dir) / "peaks" / f"{fingerprint_id}-{dtype_name}.json"
    bw_given, flops_given = bool(overrides.get("bandwidth_gbs")), bool(overrides.get("tflops"))
    # one measurement per device at a time: parallel jobs (joblib, submitit) starting together would otherwise
    # each measure while the others load the machine, and cache a fraction of the peak for every later run
    with file_lock(path.with_suffix(".lock")):
        cached = _read_peaks(path)
        measured: dict[str, Any] = {}
        if not bw_given and (remeasure or "bandwidth_gbs" not in cached):
            log.info("measuring %s read and copy bandwidth once for this device", device.type)
            measured.update(measure_bandwidth(device))
        if not flops_given and (remeasure or "flops" not in cached):
            log.info("measuring %s %s matmul FLOP/s once for this device", device.type, dtype_name)
            measured.update(measure_flops(device, dtype))
        peaks = {"version": CACHE_VERSION, "device": device.type, "dtype": dtype_name, "fingerprint": fingerprint_id,
                 **cached, **measured}  # fmt: skip
        if measured:  # what the cache held already (e.g. the other peak) is kept beside what was measured now
            peaks["measured_at"] = time.time()
            write_json_atomic(path, peaks)
    peaks = {**peaks, "cache": str(path) if cached or measured else None}
    if bw_given:
        peaks.update(bandwidth_gbs=float(overrides["bandwidth_gbs"]), bandwidth_kind="config")
    if flops_given:
        peaks.update(flops=float(overrides["tflops"]) * 1e12)
    bw_source, flops_source = ("config" if given else "measured" for given in (bw_given, flops_given))
    # ``source`` names both where they agree; each peak's own says which a figure (MBU, MFU) stands on
    source = bw_source if bw_source == flops_source else f"bandwidth {bw_source}, flops {flops_source}"
    return {**peaks, "source": source, "bandwidth_source": bw_source, "flops_source": flops_source}


PEAK_FIELDS = ("bandwidth_gbs", "bandwidth_kind", "copy_gbs", "flops", "source", "bandwidth_source", "flops_source",
               "device", "dtype", "cache")  # fmt: skip


@dataclass(frozen=True)
class PhaseCounts:
    bytes: float
    flops: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("nan")


def _linear_params(args: ModelArgs) -> int:
    """Weights that a token multiplies through (every layer's linears and the output head)."""
    d, h, kv, f = args.dim, args.head_dim, args.n_kv_heads, args.intermediate_size
    per_layer = d * args.n_heads * h * 2 + 2 * d * kv * h + 3 * d * f
    return args.n_layers * per_layer + args.vocab_size * d


def _embedding_table_bytes(args: ModelArgs, elem: int, table_bytes: int | None) -> int:
    """Stored embedding bytes a step reads only B rows of: ``table_bytes`` when the prepared model told
    (``unread_table_bytes``), else an untied table of ``args``' shape."""
    if table_bytes is not None:
        return table_bytes
    return 0 if args.tie_embeddings else args.vocab_size * args.dim * elem


def unread_table_bytes(model: torch.nn.Module) -> int | None:
    """Stored bytes of the embedding table that a step reads only B rows of: the whole table, unless the output
    head multiplies through that very tensor (tied embeddings, head not replaced). A tied model whose head an
    engine replaced (``quantized engine.layers=[all]``: an int8 copy) keeps the fp32 table beside it, unread.
    None for a model without a ``tok_embeddings`` table (the count then follows ``tie_embeddings``)."""
    table = getattr(getattr(model, "tok_embeddings", None), "weight", None)
    if not isinstance(table, torch.Tensor):
        return None
    head = getattr(getattr(model, "output", None), "weight", None)
    if isinstance(head, torch.Tensor) and head.data_ptr() == table.data_ptr():
        return 0
    return table.numel() * table.element_size()


def decode_counts(
    args: ModelArgs, weight_bytes: int, rows: int, context: float, elem: int, table_bytes: int | None = None
) -> PhaseCounts:
    """One decode step for ``rows`` sequences, each attending ``context`` cached positions on average plus its
    new one. ``table_bytes``: the stored embedding bytes not read whole (``unread_table_bytes``; default from
    ``args.tie_embeddings``)."""
    kv_row = 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem  # K and V of one position, all layers
    weights = weight_bytes - _embedding_table_bytes(args, elem, table_bytes) + rows * args.dim * elem
    bytes_ = weights + rows * kv_row * (context + 1)
    attn = 4 * args.n_layers * args.n_heads * args.head_dim * (context + 1)  # QK^T and AV over the positions
    return PhaseCounts(bytes=float(bytes_), flops=float(rows * (2 * _linear_params(args) + attn)))


def prefill_counts(
    args: ModelArgs, weight_bytes: int, rows: int, prompt: int, elem: int, table_bytes: int | None = None
) -> PhaseCounts:
    """Prefill of ``prompt`` tokens for ``rows`` sequences (causal attention: prompt^2 / 2 pairs)."""
    kv_row = 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem
    bytes_ = weight_bytes - _embedding_table_bytes(args, elem, table_bytes) + rows * prompt * (args.dim * elem + kv_row)
    attn = 2 * args.n_layers * args.n_heads * args.head_dim * prompt * prompt
    return PhaseCounts(bytes=float(bytes_), flops=float(rows * (2 * _linear_params(args) * prompt + attn)))


def roofline(
    args: ModelArgs,
    weight_bytes: int,
    elem: int,
    rows: int,
    prompt_len: int,
    gen_len: int,
    tpot_ms: float,
    ttft_ms: float,
    peaks: dict[str, Any],
    table_bytes: int | None = None,
) -> dict[str, Any]:
    """The record's roofline section: counts per phase, achieved rates, MBU and MFU against ``peaks``.

    TPOT times the gen_len - 1 decode steps after the first token; step i (1-based) runs at position
    prompt_len + i - 1, so it attends prompt_len + i - 1 cached positions: their mean is ``context``."""
    context = prompt_len + (gen_len - 2) / 2
    dec = decode_counts(args, weight_bytes, rows, context, elem, table_bytes)
    pre = prefill_counts(args, weight_bytes, rows, prompt_len, elem, table_bytes)
    bw, flops = peaks["bandwidth_gbs"] * 1e9, peaks["flops"]
    dec_s, pre_s = tpot_ms / 1e3, ttft_ms / 1e3
    return {
        "peaks": {k: peaks.get(k) for k in PEAK_FIELDS},
        "decode": {
            "bytes_per_step": dec.bytes,
            "flops_per_step": dec.flops,
            "rows": rows,
            "mean_context": context,
            "intensity": dec.intensity,
            "achieved_gbs": dec.bytes / dec_s / 1e9,
            "achieved_gflops": dec.flops / dec_s / 1e9,
            "mbu": dec.bytes / dec_s / bw,
        },
        "prefill": {
            "bytes": pre.bytes,
            "flops": pre.flops,
            "intensity": pre.intensity,
            "achieved_gbs": pre.bytes / pre_s / 1e9,
            "achieved_gflops": pre.flops / pre_s / 1e9,
            "mfu": pre.flops / pre_s / flops,
        },
    }
