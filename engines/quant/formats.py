"""Quantization formats as plain tensor math: what each scheme stores and what it means.

The kernels (``engines.quant.cpu``) and the tests share these functions, so a kernel is checked against the
format it claims to implement. Scales are computed in fp32; a kernel may keep them in a narrower dtype.

- int8, per output channel, symmetric: ``w ~= q * scale``, ``q`` in [-127, 127], ``scale = max|w_row| / 127``;
  the round-trip error of every element is at most ``scale / 2``.
- int4, per group of ``group_size`` consecutive input channels, asymmetric: ``w ~= q * scale + min``, ``q`` in
  [0, 15], ``scale = (max - min) / 15``; the round-trip error is at most ``scale / 2`` within each group.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127
INT4_LEVELS = 15
_TINY = 1e-12  # an all-zero row or group gets this scale, not a division by zero


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp32 [N]): per-channel symmetric."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(_TINY)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def _groups(w: Tensor, group_size: int) -> Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    return w.float().reshape(n, k // group_size, group_size)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (q uint8 [N, K] with values 0..15, scale fp32 [N, K/g], minimum fp32 [N, K/g])."""
    g = _groups(w, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / INT4_LEVELS).clamp_min(_TINY)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8)
    return q.reshape(w.shape), scale, lo


def dequantize_int4(q: Tensor, scale: Tensor, minimum: Tensor, group_size: int) -> Tensor:
    g = _groups(q, group_size)
    return (g * scale.float()[..., None] + minimum.float()[..., None]).reshape(q.shape)


def int4_kernel_scales(scale: Tensor, minimum: Tensor, dtype: torch.dtype) -> Tensor:
    """The tinygemm layout of group parameters, [K/g, N, 2] of (scale, zero), for ``w = (q - 8) * scale + zero``
    (the same values as ``q * scale + minimum``: zero = minimum + 8 * scale). Used by the CPU and CUDA kernels."""
    zero = minimum + 8 * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
