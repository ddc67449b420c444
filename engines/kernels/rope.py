"""Rotary embeddings applied to q and k in place, both in one launch.

The reference's ``rotate_pairs`` (per tensor) multiplies by the cos table, swaps each pair into a new tensor and
adds the product with the signed sin table: three kernels that read and write the tensor again each, about 6x
its size in traffic, plus the tables and a fresh output tensor. Here each pair is read once and written back in
place (2x the size, no allocation), for q and k together: about two thirds less traffic, and one launch instead
of six.

q is [B, S, Hq, D] and k is [B, S, Hkv, D] (the projections' outputs viewed as heads; each token's heads must be
contiguous); cos and sin are [S, D/2] fp32 tables of the tokens' positions. Pairs are interleaved (Meta's layout).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from engines.kernels import row_bucket, tuning

GPU_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in ((1, 2), (1, 4), (2, 4), (4, 4), (4, 8))]
_CONFIGS = tuning(GPU_CONFIGS, triton.Config({"BLOCK_M": 64}))


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    width = triton.next_power_of_2(named_args["PAIRS_Q"])
    return [c for c in configs if c.kwargs["BLOCK_M"] * width <= 8192] or configs[:1]


@triton.jit
def _rotate(X, rows, row_mask, stride, pos, COS, SIN, stride_cs, HALF_D, PAIRS, BLOCK_P: tl.constexpr):
    p = tl.arange(0, BLOCK_P)
    mask = row_mask[:, None] & (p < PAIRS)[None, :]
    ptr = X + rows.to(tl.int64)[:, None] * stride + 2 * p[None, :]  # int64: past 2**31 from 524,288 tokens
    x0 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + 1, mask=mask, other=0.0).to(tl.float32)
    f = pos[:, None] * stride_cs + p[None, :] % HALF_D
    c = tl.load(COS + f, mask=mask, other=0.0)
    s = tl.load(SIN + f, mask=mask, other=0.0)
    tl.store(ptr, (x0 * c - x1 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + 1, (x1 * c + x0 * s).to(X.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_CONFIGS, key=["PAIRS_Q", "PAIRS_K", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune},
    restore_value=["Q", "K"],  # in place: each config tried while tuning starts from the same q and k
)  # fmt: skip
@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, M, S, stride_q, stride_k, stride_cs, HALF_D, PAIRS_Q, PAIRS_K, M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_PQ: tl.constexpr, BLOCK_PK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    pos = rows % S
    _rotate(Q, rows, row_mask, stride_q, pos, COS, SIN, stride_cs, HALF_D, PAIRS_Q, BLOCK_PQ)
    _rotate(K, rows, row_mask, stride_k, pos, COS, SIN, stride_cs, HALF_D, PAIRS_K, BLOCK_PK)


def _token_rows(x: Tensor) -> Tensor:
    b, s, h, d = x.shape
    if x.stride(-1) != 1 or x.stride(-2) != d:
        raise ValueError(f"rope: each token's heads must be contiguous (shape {tuple(x.shape)}, strides {x.stride()})")
    return x.view(b * s, h * d)  # raises if batch and sequence cannot be flattened without a copy


def rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [B, S, Hq, D] and k [B, S, Hkv, D] in place by cos/sin [S, D/2]; returns (q, k)."""
    b, s, _, d = q.shape
    if k.shape[:2] != (b, s) or k.shape[-1] != d or cos.shape != (s, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} disagree")
    q2, k2 = _token_rows(q), _token_rows(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    m, pq, pk = b * s, q2.shape[1] // 2, k2.shape[1] // 2
    _rope_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        q2, k2, cos, sin, m, s, q2.stride(0), k2.stride(0), cos.stride(0), d // 2, pq, pk, row_bucket(m),
        BLOCK_PQ=triton.next_power_of_2(pq), BLOCK_PK=triton.next_power_of_2(pk),
    )  # fmt: skip
    return q, k
