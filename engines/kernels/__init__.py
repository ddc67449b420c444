"""Triton kernels of the fused engine (and the quantized engine's ``backend=triton``).

Each kernel module says what it fuses and how many bytes of memory traffic that saves against the eager PyTorch
composition it replaces, and is tested against that composition.

Without CUDA the same kernels run under Triton's interpreter (``TRITON_INTERPRET=1``: every program instance
executed by numpy on the CPU), so their results can still be checked; their timings then mean nothing. Triton
decides whether a function is interpreted when ``@triton.jit`` decorates it, so this package sets the variable
when CUDA is absent before any kernel module is imported (an explicit ``TRITON_INTERPRET=0`` is respected, and
the kernels then say they cannot run). It is imported lazily (in ``prepare``/``available``), so other engines
never see the variable change. Part of ``triton.language`` (``tl.sum``, ``tl.max``, ``tl.zeros`` ...) is itself
jit functions, decorated when triton is first imported, which may have happened earlier without the variable
(``import torch._dynamo`` imports triton): the kernels use only builtins (``tl.full``, not ``tl.zeros``) and
reduce with ``reduce_sum``/``reduce_max`` below, decorated here, whose combine functions the interpreter
recognizes without calling them. A test imports torch._dynamo first to keep this true.
"""

from __future__ import annotations

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"

if not torch.cuda.is_available():
    os.environ.setdefault(INTERPRET_ENV, "1")

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton is a pinned dependency; this is a broken install
    IMPORT_ERROR = f"triton cannot be imported ({exc})"


def interpreted() -> bool:
    """Whether kernels run under Triton's interpreter (on the CPU) instead of compiled for a GPU."""
    return os.environ.get(INTERPRET_ENV, "0") == "1"


def unavailable(device: torch.device) -> str | None:
    """None when the kernels can run on ``device``, else why not."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if device.type == "cuda":
        from engines.compiled import triton_launcher_unavailable

        return triton_launcher_unavailable()
    if device.type != "cpu":
        return f"Triton kernels run on CUDA, or on the CPU under the interpreter (this device: {device.type})"
    if not interpreted():
        if torch.cuda.is_available():
            return (f"on device=cpu the Triton kernels need {INTERPRET_ENV}=1 set before the harness starts (CUDA is "
                    "present, so they are compiled for the GPU)")  # fmt: skip
        return f"no CUDA and {INTERPRET_ENV}={os.environ.get(INTERPRET_ENV)}: the Triton kernels cannot run here"
    return None


def timing_caveat(device: torch.device) -> str | None:
    """Why timings of these kernels on ``device`` are not representative (interpreted), else None."""
    if device.type == "cpu" or interpreted():
        return f"Triton kernels run under the interpreter ({INTERPRET_ENV}=1) on the CPU: timings not representative"
    return None


INTERPRETER_DTYPES = (torch.float32, torch.float16)  # the interpreter's numpy has no bfloat16


def dtype_unavailable(dtype: torch.dtype | None, device: torch.device | None = None) -> str | None:
    """Why these kernels cannot run in ``dtype`` here (None when they can, or when the dtype is not known): the
    interpreter has no bf16, and the kernels' bf16 ``tl.dot`` compiles for sm_80+ only."""
    from engines.sparse_formats import dtype_name

    if dtype is not None and interpreted() and dtype not in INTERPRETER_DTYPES:
        return f"dtype: Triton's interpreter runs fp32 and fp16 only (got {dtype_name(dtype)}); use dtype=fp32 on a CPU"
    if dtype == torch.bfloat16 and device is not None and device.type == "cuda" and not interpreted():
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return (f"dtype=bf16: the Triton kernels' bf16 matmuls need compute capability 8.0+ (this device: "
                    f"{torch.cuda.get_device_name(device)}, {cap[0]}.{cap[1]}); use dtype=fp16")  # fmt: skip
    return None


def check_dtype(dtype: torch.dtype, device: torch.device | None = None) -> None:
    if reason := dtype_unavailable(dtype, device):
        raise ValueError(reason)


def tuning(gpu: list, interpreter: object) -> list:
    """Autotuner candidates: the GPU configs, or one fixed config under the interpreter (which cannot time them;
    with a single config the autotuner runs it without benchmarking)."""
    return [interpreter] if interpreted() else list(gpu)


def row_bucket(rows: int, cap: int = 64) -> int:
    """An autotune key for the row count: its next power of two, capped. Without it the first shape seen (often a
    quality pass's prefill, many rows) fixes the block for every later one (decode: batch-size rows)."""
    return min(1 << max(rows - 1, 0).bit_length(), cap)


if IMPORT_ERROR is None:

    @triton.jit
    def reduce_sum(x, axis: tl.constexpr):
        """``tl.sum`` of fp32 values (what it compiles to), callable whatever mode triton was imported in."""
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @triton.jit
    def reduce_max(x, axis: tl.constexpr):
        """``tl.max`` (what it compiles to), callable whatever mode triton was imported in."""
        return tl.reduce(x, axis, tl.standard._elementwise_max)
