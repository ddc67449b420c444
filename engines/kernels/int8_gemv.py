"""Int8 weight-only matmul (a GEMV at decode's few rows), dequantized inside the kernel.

``y = x @ (q * scale[:, None]).T`` for per-output-channel symmetric int8 weights ``q`` [N, K] (the quantized
engine's ``int8`` format, ``engines.quant.formats.quantize_int8``). Decode is bound by reading the weights:
the kernel reads 1 byte per weight instead of 2 (bf16/fp16) or 4 (fp32), converts it in registers and applies
the channel's scale once per output after the reduction. Dequantizing first (``dequantize_int8(q, s) @ x``)
would write and read back a full-precision copy of the weight on every call: 1 + 2 x 4 bytes per weight in fp32,
against 1 here, about 9x less weight traffic (3x against a plain bf16 matmul).

``Int8TritonLinear`` is the ``nn.Linear`` replacement the quantized engine installs with ``engine.backend=triton``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from engines.kernels import tuning
from engines.quant.cpu import QuantLinear
from engines.quant.formats import quantize_int8

GPU_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in (
        (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3)
    )
]
_CONFIGS = tuning(GPU_CONFIGS, triton.Config({"BLOCK_N": 128, "BLOCK_K": 256}))


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _int8_matmul_kernel(
    X, W, S, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # int64 row offsets: a prefill through the output head has M * N past 2**31 (32768 rows x 128256)
    row_x, row_w, row_y = rm.to(tl.int64) * stride_xm, rn.to(tl.int64) * stride_wn, rm.to(tl.int64) * stride_ym
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row_x[:, None] + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        w = tl.load(W + row_w[None, :] + rk[:, None], mask=(rn < N)[None, :] & (rk < K)[:, None], other=0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)  # int8 -> activation dtype in registers
    scale = tl.load(S + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(Y + row_y[:, None] + rn[None, :], y.to(Y.dtype.element_ty), mask=out_mask)


def int8_weight_only_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``x @ (q * scale[:, None]).T`` for x [..., K], int8 q [N, K] and per-channel scales [N]; x's dtype out."""
    k = x.shape[-1]
    n = q.shape[0]
    if q.shape[1] != k or q.dtype != torch.int8 or scale.shape != (n,) or q.stride(-1) != 1:
        raise ValueError(f"int8 matmul: x [..., {k}] and int8 weight {tuple(q.shape)} {q.dtype} disagree")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 64  # decode's few rows, or a prefill's many
    grid = lambda meta: (triton.cdiv(m, block_m), triton.cdiv(n, meta["BLOCK_N"]))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _int8_matmul_kernel[grid](
        x2, q, scale, y, m, n, k, x2.stride(0), q.stride(0), y.stride(0), PRECISION=precision, BLOCK_M=block_m
    )
    return y.reshape(*x.shape[:-1], n)


class Int8TritonLinear(QuantLinear):
    """Per-channel int8 weights (the int8_weight_only format) multiplied by the Triton kernel above."""

    scheme = "int8_weight_only"
    kernel: ClassVar[str] = "Triton int8 weight-only matmul (engines.kernels.int8_gemv; dequantized in the kernel)"

    def __init__(self, linear: nn.Linear, group_size: int = 0) -> None:
        super().__init__(linear.in_features, linear.out_features)
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scale.to(linear.weight.dtype))

    def matmul(self, x: Tensor) -> Tensor:
        return int8_weight_only_matmul(x, self.weight_int8, self.scales)
