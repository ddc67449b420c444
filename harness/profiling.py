"""Where decode time goes: torch.profiler over a few decode steps, after the timed window (never inside it).

The decoding loop calls its clock once per token; a clock that starts the profiler at the first mark (prefill
done) and stops it after ``steps`` more marks profiles exactly ``steps`` decode steps. The trace is written as
Chrome-trace JSON (opens in Perfetto or chrome://tracing) next to the record, and time is broken down by op
category. Ops' self times do not cover the host time between ops (Python, dispatch); that remainder is kept
as ``framework_overhead`` so the categories add up to the wall time of the profiled steps.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from engines.generate import generate, setup_caches

CATEGORIES = ("matmul", "attention", "norm", "elementwise", "copy", "other")
_RULES = [
    # softmax of attention scores (SDPA's math path); not log_softmax, which beam search runs over the vocabulary
    ("attention", r"scaled_dot_product|flash|fmha|efficient_attention|(?<!log_)softmax|attn|attention"),
    # cuBLAS 12.4+ names most sm_90 GEMMs nvjet_* (and their split-K reduction splitKreduce_kernel)
    ("matmul", r"(^|::)(mm|addmm|bmm|baddbmm|matmul|linear|dot|gemv|gemm)\b|_weight_int\d+pack_mm|quantized::linear|"
               r"int8|int4|fp8|_scaled_mm|cutlass|cublas|gemm|gemv|xmma|sgemm|hgemm|wgmma|ampere_|sm90_|nvjet|"
               r"splitkreduce"),
    ("norm", r"rsqrt|(^|::)mean\b|(^|::)pow\b|norm"),
    ("copy", r"copy|(^|::)to\b|_to_copy|contiguous|clone|index_copy|index_select|indexfunc|cat|stack|memcpy|"
             r"memset|empty"),
    ("elementwise", r"(^|::)(add|mul|sub|div|silu|gelu|neg|exp|cos|sin|where|argmax|topk|masked_fill|fill_)|"
                    r"elementwise|vectorized|unrolled|log_softmax|swiglu|rope"),
]  # fmt: skip


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, pattern in _RULES:
        if re.search(pattern, lowered):
            return category
    return "other"


class _ProfilingClock:
    """Starts ``prof`` at the first mark (prefill done) and stops it ``steps`` marks later."""

    def __init__(self, prof: profile, steps: int, device: torch.device) -> None:
        self.prof, self.steps, self.device = prof, steps, device
        self.marks = 0
        self.wall_s = 0.0

    def start(self) -> None:
        self.marks = 0

    def mark(self) -> None:
        self.marks += 1
        if self.marks == 1:
            self._sync()
            self.prof.start()
            self._t0 = time.perf_counter()
        elif self.marks == self.steps + 1:
            self._sync()
            self.wall_s = time.perf_counter() - self._t0
            self.prof.stop()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _self_times_ms(prof: profile, device: torch.device) -> dict[str, float]:
    """Self time per op name: host time on CPU; on CUDA, kernel time per kernel. The profiler lists each kernel
    twice, as its own device event and inside the CPU op that launched it (a kernel launched outside any op, a
    Triton kernel's, only the first way): only device events are counted, as torch's own table does."""
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for evt in prof.key_averages():
        if device.type == "cuda":
            if evt.device_type == DeviceType.CPU or getattr(evt, "is_user_annotation", False):
                continue
            us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            out[evt.key] = out.get(evt.key, 0.0) + us / 1e3
    return out


def profile_decode(
    model: nn.Module,
    prompt: torch.Tensor,
    decoding: str,
    num_beams: int,
    rows: int,
    steps: int,
    out_dir: Path,
    device: torch.device,
    cache_len: int | None = None,
) -> dict[str, Any]:
    """Profile ``steps`` decode steps of one generation; returns the record's profile section.

    ``cache_len`` is the timed run's KV-cache length: a cache of another length is another shape, which the
    compiled engine recompiles for, CUDA graphs re-capture and autotuned kernels re-tune, all of it inside the
    profiled steps. One unprofiled generation first absorbs whatever ``setup_caches`` resets (captured graphs)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=False)
    clock = _ProfilingClock(prof, steps, device)
    setup_caches(model, rows, max(cache_len or 0, prompt.shape[1] + steps + 1))
    generate(model, prompt, steps + 1, decoding, num_beams)
    generate(model, prompt, steps + 1, decoding, num_beams, clock)
    trace = Path(out_dir) / "trace.json"
    prof.export_chrome_trace(str(trace))
    per_op = _self_times_ms(prof, device)
    breakdown = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in per_op.items():
        breakdown[categorize(name)] += ms
    wall_ms = clock.wall_s * 1e3
    attributed = sum(breakdown.values())
    overhead = max(wall_ms - attributed, 0.0)
    breakdown["other"] += overhead
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {
        "trace": trace.name,
        "steps": steps,
        "clock": "device kernel time" if device.type == "cuda" else "host time",
        "total_ms": wall_ms,
        "breakdown_ms": breakdown,
        "framework_overhead_ms": overhead,
        "top_ops_ms": [[name, ms, categorize(name)] for name, ms in top],
    }
