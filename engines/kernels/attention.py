"""Decode attention over the static KV cache: split-K (flash-decoding), grouped-query aware.

One new query per sequence attends to positions ``0..input_pos`` of a cache [B, Hkv, T, D]. Decode has too few
queries to fill a GPU with one program per head, so the cache length is split into chunks processed in parallel,
each keeping a running max and sum (online softmax); a second small kernel merges the chunks. Each program
serves the whole group of query heads that share one KV head, so every key and value is read from memory once
per group (the reference's ``scaled_dot_product_attention``, its group's query heads as the query rows, reads a
boolean mask over the whole cache too and materializes the [B, Hq, 1, T] scores and probabilities).

Bytes: the cache rows up to ``input_pos`` (2 x B x Hkv x (pos + 1) x D elements), once; the partial results
(B x Hq x splits x (D + 2) fp32) are small. Positions past ``input_pos`` are never read (the eager path reads the
whole static cache and the mask), which is what makes long static caches cheap early in a generation. The
position is read on the device, so the call has no host synchronization and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from engines.kernels import interpreted, reduce_max, reduce_sum, tuning

GPU_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
    for n, w, s in ((32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3))
]
_CONFIGS = tuning(GPU_CONFIGS, triton.Config({"BLOCK_N": 128}))
LOG2E = 1.4426950408889634
MIN_SPLIT = 64  # positions per chunk at least: shorter chunks cost more in merging than they gain


@triton.autotune(configs=_CONFIGS, key=["G", "D", "SPLIT_LEN"])
@triton.jit
def _decode_attention_split_kernel(
    Q, K, V, POS, PART, M, L, qk_scale, HQ, HKV, NUM_SPLITS, SPLIT_LEN, D,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    G: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    length = tl.load(POS).to(tl.int32) + 1
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([G_PAD], 0.0, tl.float32)
    acc = tl.full([G_PAD, D_PAD], 0.0, tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + reduce_sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    rows = b * HQ + h * G + g
    tl.store(PART + (rows[:, None] * NUM_SPLITS + split) * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(M + rows * NUM_SPLITS + split, m_i, mask=gmask)
    tl.store(L + rows * NUM_SPLITS + split, l_i, mask=gmask)


@triton.jit
def _decode_attention_merge_kernel(PART, M, L, OUT, NUM_SPLITS, D, SPLITS_PAD: tl.constexpr, D_PAD: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    smask = sp < NUM_SPLITS
    m = tl.load(M + row * NUM_SPLITS + sp, mask=smask, other=float("-inf"))
    l = tl.load(L + row * NUM_SPLITS + sp, mask=smask, other=0.0)  # noqa: E741
    w = tl.exp2(m - reduce_max(m, axis=0))  # empty chunks (max -inf) weigh 0
    o = tl.load(PART + (row * NUM_SPLITS + sp)[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :],
                other=0.0)  # fmt: skip
    out = reduce_sum(o * w[:, None], axis=0) / reduce_sum(w * l, axis=0)
    tl.store(OUT + row * D + d, out.to(OUT.dtype.element_ty), mask=d < D)


def num_splits(batch_kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Chunks of the cache: enough programs to fill the GPU twice over, each chunk at least MIN_SPLIT long. From
    the static cache length, not the position, so it never changes during a generation (no retuning, graphable)."""
    most = max(1, triton.cdiv(cache_len, MIN_SPLIT))
    if device.type != "cuda" or interpreted():
        return min(most, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(most, triton.cdiv(2 * sms, batch_kv_heads), 128))


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, splits: int | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over cache positions 0..input_pos[0], for q [B, Hq, D] (one query per sequence)
    and caches [B, Hkv, T, D] with Hq a multiple of Hkv (query head i reads KV head i // (Hq / Hkv))."""
    b, hq, d = q.shape
    _, hkv, t, _ = k_cache.shape
    if k_cache.shape[0] != b or k_cache.shape[-1] != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and caches {tuple(k_cache.shape)} disagree")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q and the caches must be contiguous")
    group = hq // hkv
    splits = splits or num_splits(b * hkv, t, q.device)
    split_len = triton.cdiv(t, splits)
    part = torch.empty(b * hq, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b * hq, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)  # noqa: E741
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32 rounding)
    _decode_attention_split_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, input_pos, part, m, l, LOG2E / math.sqrt(d), hq, hkv, splits, split_len, d,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D_PAD=max(16, triton.next_power_of_2(d)),
        PRECISION=precision,
    )  # fmt: skip
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    _decode_attention_merge_kernel[(b * hq,)](
        part, m, l, out, splits, d, SPLITS_PAD=triton.next_power_of_2(splits), D_PAD=triton.next_power_of_2(d)
    )
    return out
