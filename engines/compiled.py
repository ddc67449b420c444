"""The compiled engine: torch.compile (inductor) of the decode step and of prefill.

``engine.mode``: ``default``, ``reduce-overhead`` (CUDA graphs: each step replayed without per-kernel launches;
CUDA only) or ``max-autotune`` (matmul templates benchmarked at compile time; on a CPU inductor's C++ GEMM
templates, on CUDA Triton's, plus CUDA graphs). Decode (one token per sequence) and prefill are separate
compiled functions over a copy of the reference that shares its weights, both ``fullgraph=True`` and static by
default: one graph per shape (batch, prompt length, cache size). The static KV cache is a module buffer updated
in place and ``input_pos`` a tensor, so decoding never recompiles per token (tests check dynamo's counters).

Inductor options that matter for decode on a CPU are engine parameters: ``freezing`` (weights become constants,
folded at compile time; with ``weight_prepack`` inductor re-lays them out once for MKL/oneDNN GEMMs),
``cpp_wrapper`` (a C++ wrapper instead of Python around the kernels: less per-call overhead) and ``dynamic``
(``true``: graphs generic in the prompt length; batch size and cache length stay static). ``null`` for freezing
and cpp_wrapper means on for a CPU, off for CUDA: on this repository's ``small`` at batch 1 on a CPU, with
library GEMVs, decode was 1.01x eager without freezing, 1.05x with freezing and prepacked weights, and 1.10x
with the C++ wrapper too (one thread, same run).

``gemv`` is how the products of a decode step are computed, where each weight meets one token per sequence.
``library`` leaves them to the GEMM library (MKL/oneDNN on a CPU, cuBLAS on CUDA). ``reduction`` writes each such
product with at most ``gemv_max_rows`` rows of activations as a broadcast multiply and a sum over the input
dimension; inductor fuses that into one vectorized, parallel reduction that streams the weight once (it does the
same on CUDA when it tunes with coordinate descent). ``auto`` picks ``reduction`` on a CPU, ``library`` on CUDA.
On the README's 2-core CPU a library GEMV of one activation row read fp32 weights at 11-17 GB/s and the reduction
at 29-32 GB/s, the machine's read bandwidth; ``small`` at batch 1 decoded 2.45x faster than eager with it and
1.06x with library GEMVs (benchmarks/compiled_vs_eager.py). At 8 rows the reduction re-reads the weight per row
and loses to the library (5 GB/s against 10), hence the default limit of 4.

Compilation is lazy and never timed: the first call of each new shape compiles it (and, with CUDA graphs, runs
a decode step again to record the graph; re-running a step rewrites the same cache rows with the same values),
which happens in the quality measurement and in warm-up, outside the timed window. Prefill is compiled without
CUDA graphs, as in gpt-fast (a graph would hold its [B, S, vocab] logits in the graph pool, plus a clone per
call). Each compilation is appended to ``engine_info["compile"]`` (shape, phase, seconds); the record of a point
carries that point's own (``point_info``: a prepared engine is reused by later points of the same variant), and
``metrics.warmup_s`` includes those of the timed shape (compiled in warm-up).
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.base import Engine, PrepareContext, choice, register
from engines.base import weight_bytes as plain_weight_bytes
from engines.positions import starts_at_zero

MODES = ("default", "reduce-overhead", "max-autotune")
GEMV = ("auto", "reduction", "library")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 64  # shapes per compiled function (quality, then each batch size of a sweep), not per token
CUDA_GRAPH_WARM_CALLS = 2  # cudagraph trees run a new graph once, then record it, then replay


@dataclass(frozen=True)
class CompiledParams:
    mode: str = choice("default", MODES, "reduce-overhead: CUDA graphs (CUDA only); max-autotune: GEMM templates")
    freezing: bool | None = None
    weight_prepack: bool = True
    cpp_wrapper: bool | None = None
    dynamic: bool = False
    prefill: bool = True  # compile prefill too (false: prefill runs eager, only decode is compiled)
    gemv: str = choice("auto", GEMV, "products with few activation rows: a fused reduction or the GEMM library")
    gemv_max_rows: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"engine.mode: {self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if self.gemv_max_rows < 1:
            raise ValueError(f"engine.gemv_max_rows: {self.gemv_max_rows} is not allowed; allowed: an integer >= 1")

    def gemv_for(self, device: torch.device) -> str:
        """``reduction`` or ``library`` on this device (``auto``: reduction on a CPU)."""
        if self.gemv != "auto":
            return self.gemv
        return "reduction" if device.type == "cpu" else "library"


class ReductionGemvLinear(nn.Module):
    """A replacement for ``nn.Linear`` inside the compiled region. An input of at most ``max_rows`` rows (a decode
    step at small batch) is computed as ``(x[..., None, :] * W).sum(-1)``, which inductor turns into one reduction
    kernel that reads each weight once, vectorized and split across threads. It sums in fp32 whatever the dtype.
    Larger inputs (prefill, large batches) call ``F.linear``: there the reduction would re-read W for every row.
    So does a call outside torch.compile (the cacheless forward of quality metrics). The module holds the
    linear's own parameters, so no weight is copied."""

    def __init__(self, linear: nn.Linear, max_rows: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.max_rows = max_rows

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() > self.max_rows or not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)  # run eagerly, the product would be materialized
        y = (x.unsqueeze(-2) * self.weight).sum(-1, dtype=torch.float32)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def use_reduction_gemv(model: nn.Module, max_rows: int) -> int:
    """Swap every ``nn.Linear`` of ``model`` (an engine's own module tree) for ``ReductionGemvLinear``."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]  # fmt: skip
    for parent, name, child in swaps:
        setattr(parent, name, ReductionGemvLinear(child, max_rows))
    return len(swaps)


def inductor_options(params: CompiledParams, device: torch.device) -> dict[str, Any]:
    """torch.compile ``options``: the mode's own options plus the engine's inductor settings."""
    from torch._inductor import list_mode_options

    opts: dict[str, Any] = dict(list_mode_options(params.mode))
    if device.type != "cuda":
        opts.pop("triton.cudagraphs", None)
        opts.pop("coordinate_descent_tuning", None)  # tunes Triton kernels only
    opts["freezing"] = device.type == "cpu" if params.freezing is None else params.freezing
    opts["cpp.weight_prepack"] = params.weight_prepack
    opts["cpp_wrapper"] = device.type == "cpu" if params.cpp_wrapper is None else params.cpp_wrapper
    return opts


def _decode_step(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    return model(tokens, input_pos)


def _prefill(model: nn.Module, tokens: Tensor, input_pos: Tensor, from_zero: bool) -> Tensor:
    return model(tokens, input_pos, from_zero=from_zero)  # read outside: reading input_pos would break the graph


def recompile_kwargs() -> dict[str, Any]:
    """``torch.compile``'s per-function recompile limit where this torch has it (2.12+); before that, the
    process-wide dynamo limit is raised instead. Under ``fullgraph=True`` the default limit (8) is an error, and
    a sweep gives one compiled function a shape per quality pass and per batch size."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": RECOMPILE_LIMIT, "isolate_recompiles": True}
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return {}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledModel(nn.Module):
    """The reference's forward through two compiled functions: decode (one token per sequence) and prefill."""

    def __init__(self, model: nn.Module, params: CompiledParams, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.args = model.args
        self.cuda_graphs = device.type == "cuda" and params.mode in CUDA_GRAPH_MODES
        self.options = inductor_options(params, device)
        self.gemv = params.gemv_for(device)
        if self.gemv == "reduction":
            use_reduction_gemv(model, params.gemv_max_rows)
        compile_kw = dict(fullgraph=True, dynamic=params.dynamic, **recompile_kwargs())
        self._decode = torch.compile(_decode_step, options=self.options, **compile_kw)
        # prefill without CUDA graphs (as gpt-fast): a graph would keep its [B, S, vocab] logits in the graph pool
        # and need a clone of them per call, for launches that a prefill's size makes negligible anyway
        self.prefill_options = {**self.options, "triton.cudagraphs": False} if self.cuda_graphs else self.options
        self._prefill = _prefill
        if params.prefill:
            self._prefill = torch.compile(_prefill, options=self.prefill_options, **compile_kw)
        self._weight_bytes = plain_weight_bytes(model)
        self.compile_log: dict[str, Any] = new_compile_log()  # since prepare
        self._point_log: dict[str, Any] = new_compile_log()  # since the current point began (``point_info``)

    def weight_bytes(self) -> int:
        """The module's weights (frozen constants and prepacked copies are working copies of them)."""
        return self._weight_bytes

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        self.model.setup_caches(max_batch_size=max_batch_size, max_seq_length=max_seq_length)
        device = self.model.output.weight.device
        tables = (*self.model.rope(device), *self.model.rope_pairs(device))  # built here, never when compiled
        if self.cuda_graphs:  # fixed addresses: cudagraphs neither copy them per replay nor re-record
            for t in (*tables, self.model.causal_mask):
                torch._dynamo.mark_static_address(t)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        if input_pos is None:  # the cacheless causal forward (tests, training-style use): not a compiled path
            return self.model(tokens)
        decode = tokens.shape[1] == 1
        call = self._call_decode if decode else self._call_prefill
        before = _graphs_compiled()
        t0 = time.perf_counter()
        out = call(tokens, input_pos)
        if _graphs_compiled() != before:
            for _ in range(CUDA_GRAPH_WARM_CALLS if self.cuda_graphs and decode else 0):
                out = call(tokens, input_pos)
            if tokens.device.type == "cuda":
                torch.cuda.synchronize(tokens.device)
            self._log_compile("decode" if decode else "prefill", tokens, time.perf_counter() - t0)
        return out

    def _call_decode(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        if not self.cuda_graphs:
            return self._decode(self.model, tokens, input_pos)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer in use
        return self._decode(self.model, tokens, input_pos).clone()  # the next replay overwrites the graph's output

    def _call_prefill(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self._prefill(self.model, tokens, input_pos, starts_at_zero(input_pos, tokens.shape[1]))

    def _log_compile(self, phase: str, tokens: Tensor, seconds: float) -> None:
        cache = self.model.layers[0].attention.kv_cache.k_cache.shape
        event = {"phase": phase, "tokens": list(tokens.shape), "cache_rows": cache[0], "cache_len": cache[2],
                 "seconds": round(seconds, 3)}  # fmt: skip
        for log in (self.compile_log, self._point_log):
            log["events"].append(dict(event))
            log["count"] += 1
            log["seconds"] = round(log["seconds"] + seconds, 3)

    def point_info(self) -> dict[str, Any]:
        """``engine_info`` for a point that begins now: its ``compile`` holds this point's compilations only
        (filled while the point runs: quality, warm-up), not those of earlier points that reused this engine."""
        self._point_log = new_compile_log()
        return {**self.engine_info, "compile": self._point_log,
                "compiled_before": {k: self.compile_log[k] for k in ("count", "seconds")}}  # fmt: skip


def new_compile_log() -> dict[str, Any]:
    return {"count": 0, "seconds": 0.0, "events": []}


C_COMPILERS = ("cc", "gcc", "clang")


def triton_launcher_unavailable() -> str | None:
    """Triton builds each kernel's CUDA launcher with the host C compiler at first launch (``CC``, else cc, gcc
    or clang on PATH); CUDA runtime images often have none, and the point would fail mid-run instead of skipping."""
    cc = os.environ.get("CC")
    if (cc and shutil.which(cc)) or any(shutil.which(c) for c in C_COMPILERS):
        return None
    return "Triton on CUDA needs a host C compiler to build its launchers (set CC, or put cc, gcc or clang on PATH)"


def _unavailable_compiler(device: torch.device) -> str | None:
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile on CUDA needs triton (not importable here)"
        return triton_launcher_unavailable()
    if device.type == "cpu":
        from torch._inductor import config

        names = config.cpp.cxx if isinstance(config.cpp.cxx, list | tuple) else (config.cpp.cxx,)
        if not any(n and shutil.which(n) for n in (*names, "g++", "c++", "clang++")):
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++) on PATH"
        return None
    return f"torch.compile's inductor backend has no {device.type} support here"


@register
class CompiledEngine(Engine):
    name = "compiled"
    Params = CompiledParams
    description = "torch.compile (inductor) of decode and prefill; modes default, reduce-overhead, max-autotune."

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        if self.params.mode == "reduce-overhead" and device.type != "cuda":
            return f"engine.mode=reduce-overhead is CUDA graphs: it needs CUDA (this device: {device.type})"
        return _unavailable_compiler(device)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        from engines.surgery import clone

        compiled = CompiledModel(clone(model, share_weights=True), self.params, ctx.device)
        compiled.engine_info = {
            "mode": self.params.mode,
            "inductor_options": compiled.options,
            "cuda_graphs": compiled.cuda_graphs,  # decode's only: prefill is compiled without them
            "dynamic": self.params.dynamic,
            "gemv": compiled.gemv,
            "gemv_max_rows": self.params.gemv_max_rows if compiled.gemv == "reduction" else None,
            "compiled_phases": ["decode", "prefill"] if self.params.prefill else ["decode"],
            # filled as shapes are first seen (quality measurement, warm-up), never in the timed window
            "compile": compiled.compile_log,
        }
        return compiled.eval()
