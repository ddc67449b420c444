"""Kernel microbenchmarks: each Triton kernel of ``engines.kernels`` against the eager PyTorch composition it
replaces, on Llama-3.2-1B / Llama-3-8B shapes in bf16 (decode rows, and a prefill). CUDA only: the interpreted
kernels' timings mean nothing, so without CUDA the whole module is skipped. Not part of ``make test`` (pytest's
testpaths is tests/). Each benchmark's group is the kernel and shape, so ``triton`` and ``eager`` sit side by side.

    .venv/bin/python -m pytest benchmarks/kernels --benchmark-save=kernels   # .benchmarks/<machine>/NNNN_kernels.json
    .venv/bin/python -m pytest benchmarks/kernels --benchmark-compare            # against the last saved run
    .venv/bin/pytest-benchmark compare 0001 0002 --group-by=group --columns=median,iqr,ops

Every call ends with ``torch.cuda.synchronize()`` so that the host timer sees the device work; both
implementations pay that same fixed cost.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("kernel microbenchmarks need CUDA (interpreted kernels have no meaningful timings)",
                allow_module_level=True)  # fmt: skip

import torch.nn.functional as F  # noqa: E402

from engines.kernels.attention import decode_attention  # noqa: E402
from engines.kernels.int8_gemv import int8_weight_only_matmul  # noqa: E402
from engines.kernels.rmsnorm import add_rmsnorm  # noqa: E402
from engines.kernels.rope import rope_  # noqa: E402
from engines.kernels.swiglu import swiglu  # noqa: E402
from engines.llama import apply_rope  # noqa: E402
from engines.quant.formats import quantize_int8  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
IMPLS = ("triton", "eager")


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, dtype=DT)


def run(benchmark, group: str, fn, bytes_moved: int) -> None:
    benchmark.group = group
    benchmark.extra_info["bytes_min"] = bytes_moved  # what the fused kernel must read and write at least

    def call():
        fn()
        torch.cuda.synchronize()

    call()  # compile and autotune outside the measurement
    benchmark(call)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,dim", [(1, 2048), (8, 4096), (512, 4096)])
def test_add_rmsnorm(benchmark, impl, rows, dim):
    x, r, w = rand(rows, dim), rand(rows, dim), rand(dim)

    def eager():
        h = x + r
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(h) * w, h

    fn = (lambda: add_rmsnorm(x, r, w, 1e-5)) if impl == "triton" else eager
    run(benchmark, f"add_rmsnorm {rows}x{dim}", fn, 4 * rows * dim * 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,width", [(1, 8192), (8, 14336), (512, 8192)])
def test_swiglu(benchmark, impl, rows, width):
    g, u = rand(rows, width), rand(rows, width)
    fn = (lambda: swiglu(g, u)) if impl == "triton" else (lambda: F.silu(g) * u)
    run(benchmark, f"swiglu {rows}x{width}", fn, 3 * rows * width * 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,s,hq,hkv,d", [(1, 1, 32, 8, 64), (8, 1, 32, 8, 128), (1, 512, 32, 8, 128)])
def test_rope(benchmark, impl, b, s, hq, hkv, d):
    q, k = rand(b, s, hq, d), rand(b, s, hkv, d)
    angles = torch.rand(s, d // 2, device=DEV) * 6.28
    cos, sin = angles.cos(), angles.sin()
    if impl == "triton":
        fn = lambda: rope_(q, k, cos, sin)
    else:
        fn = lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    run(benchmark, f"rope b{b} s{s} {hq}:{hkv}x{d}", fn, 2 * b * s * (hq + hkv) * d * 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "b,hq,hkv,d,t,pos", [(1, 32, 8, 64, 4096, 4000), (8, 32, 8, 128, 2048, 1000), (1, 32, 8, 128, 32768, 30000)]
)
def test_decode_attention(benchmark, impl, b, hq, hkv, d, t, pos):
    q, k, v = rand(b, hq, d), rand(b, hkv, t, d), rand(b, hkv, t, d)
    input_pos = torch.tensor([pos], device=DEV)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=DEV))
    if impl == "triton":
        fn = lambda: decode_attention(q, k, v, input_pos)
    else:  # the reference model's path: the causal mask's row over the whole static cache
        fn = lambda: F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=mask[None, None, input_pos], enable_gqa=True
        )
    run(benchmark, f"decode_attention b{b} {hq}:{hkv}x{d} cache {t} pos {pos}", fn, 2 * b * hkv * (pos + 1) * d * 2)


@pytest.mark.parametrize("impl", ("triton", "eager", "bf16"))
@pytest.mark.parametrize("m,k,n", [(1, 2048, 8192), (8, 4096, 14336), (1, 4096, 4096)])
def test_int8_weight_only_matmul(benchmark, impl, m, k, n):
    x, w = rand(m, k), rand(n, k) * 0.02
    q, scale = quantize_int8(w)
    scale = scale.to(DT)
    if impl == "triton":
        fn = lambda: int8_weight_only_matmul(x, q, scale)
    elif impl == "eager":  # dequantize, then matmul: a full-precision copy of the weight on every call
        fn = lambda: x @ (q.to(DT) * scale[:, None]).T
    else:  # the unquantized bf16 matmul, for scale
        fn = lambda: F.linear(x, w)
    run(benchmark, f"int8_matmul {m}x{k}x{n}", fn, n * k + m * k * 2 + m * n * 2)
