"""Llama-family reference decoder with a static KV cache (gpt-fast style).

RMSNorm, rotary embeddings (with Llama-3 frequency scaling), grouped-query attention and a SwiGLU MLP; tied or
untied embeddings. ``forward(tokens, input_pos)`` writes keys/values into a preallocated cache at ``input_pos``;
``forward(tokens)`` without positions is a plain causal forward that ignores the cache (the ground truth the
cache is tested against, and what training's held-out figures use; the harness's quality metrics go through
the cache, prefill and decode steps, as the timed generations do).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engines.positions import starts_at_zero


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    intermediate_size: int = 704
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_scaling: dict[str, float] | None = field(default=None, hash=False)
    head_dim: int = 0  # 0: dim // n_heads (set explicitly when heads are removed from a model)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Keep only the fields of the shape (a model config also carries its name, weights, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count from the shape alone (tied embeddings counted once)."""
        d, h, kv, f = self.dim, self.head_dim, self.n_kv_heads, self.intermediate_size
        attn = d * self.n_heads * h + 2 * d * kv * h + self.n_heads * h * d
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + d


class KVCache(nn.Module):
    """Preallocated keys/values, [batch, kv_heads, max_seq, head_dim], filled in place at input_pos."""

    def __init__(self, batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache

    def reorder(self, index: Tensor) -> None:
        """Beam search: row i of the cache becomes row index[i]."""
        self.k_cache.copy_(self.k_cache.index_select(0, index))
        self.v_cache.copy_(self.v_cache.index_select(0, index))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one dispatched op instead of six: a batch-1 decode step on a CPU is mostly per-op overhead
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device) -> Tensor:
    """Inverse frequencies, with Llama-3's long-context scaling when ``rope_scaling`` is set."""
    inv = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    s = args.rope_scaling
    if not s:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old_len / wavelen) - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def rope_pair_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """[..., D/2] cos/sin tables -> the [..., D] tables of ``rotate_pairs``: cos repeated for both members of a
    pair, sin signed (-sin, +sin)."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def rotate_pairs(x: Tensor, cos2: Tensor, sin2: Tensor) -> Tensor:
    """RoPE on interleaved pairs (Meta's layout) as x * cos2 + swap(x) * sin2, with [S, D] pair tables (see
    ``rope_pair_tables``): three kernels (a product, a pair swap, a fused multiply-add) where the textbook form
    (split, four products, a difference, a sum, a stack) takes about ten, which dominate a decode step's RoPE
    on a CPU. x: [B, S, H, D]; the tables in fp32, [S, D] or already [S, 1, D] (as ``Transformer.forward`` passes
    them, shaped once per step rather than in every layer)."""
    if cos2.dim() == 2:
        cos2, sin2 = cos2[:, None], sin2[:, None]
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    y = torch.addcmul(xf * cos2, swapped, sin2)
    return y if y.dtype == x.dtype else y.type_as(x)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (Meta's layout). x: [B, S, H, D]; cos/sin: [S, D/2] in fp32."""
    return rotate_pairs(x, *rope_pair_tables(cos, sin))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        """cos/sin: the [S, D] or [S, 1, D] tables of ``rotate_pairs`` (``Transformer.positions(..., pairs=True)``)."""
        b, s, _ = x.shape
        q = rotate_pairs(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = rotate_pairs(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        return self.wo(self.attend(q, k, v, mask, input_pos))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """Rotated q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq * D], through the cache when there is one. One
        function for every engine that keeps the reference's attention (the fused engine's ablations too).
        ``mask`` None with ``input_pos``: a prefill from position 0 (see ``Transformer.positions``)."""
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_heads != self.n_kv_heads
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if s == 1:
                # decode: a KV group's query heads are the query rows of one attention over that group's keys,
                # so keys and values are not expanded per query head (about half the time on a CPU)
                y = F.scaled_dot_product_attention(q.reshape(b, self.n_kv_heads, -1, self.head_dim), k, v,
                                                   attn_mask=mask)  # fmt: skip
                return y.reshape(b, 1, self.n_heads * self.head_dim)
            if mask is not None:  # a chunk at a later offset: the masked static cache
                return self._sdpa(q, k, v, mask, gqa)
            # prefill from 0: causal over the S rows it wrote, whatever the cache's length, and without a mask
            # (a mask with enable_gqa sends CUDA's SDPA to its math backend)
            k, v = k[:, :, :s], v[:, :, :s]
        elif q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 training on CPU: the flash-attention backward is ~4x slower in bf16 than in fp32
            with torch.autocast("cpu", enabled=False):
                return self._sdpa(q.float(), k.float(), v.float(), None, gqa)
        return self._sdpa(q, k, v, None, gqa)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gqa: bool) -> Tensor:
        """Causal (``mask`` None) or masked attention: [B, H, S, D] in, [B, S, Hq * D] out."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.n_heads * self.head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def _embedding_weight(args: ModelArgs) -> Tensor:
    """nn.Embedding's N(0, 1) init, skipped on the meta device, where every model here is built before ``build``
    or a checkpoint sets its weights: the meta kernel of ``normal_`` imports torch._dynamo (and with it inductor
    and triton), a second and a half of the start of every process that builds a model."""
    weight = torch.empty(args.vocab_size, args.dim)
    return weight if weight.is_meta else nn.init.normal_(weight)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=_embedding_weight(args))
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.causal_mask: Tensor | None = None
        self._rope: tuple[Tensor, Tensor] | None = None
        self._rope_pairs: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(cls, args: ModelArgs, device="cpu", dtype=torch.float32, seed: int = 0) -> Transformer:
        """Random weights with a fixed seed, allocated once on the target device (no per-module init)."""
        with torch.device("meta"):
            model = cls(args)
        model = model.to(dtype=dtype).to_empty(device=device)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        gen = torch.Generator(device=device).manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * args.n_layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02, generator=gen)
        return model.eval()

    def rope(self, device) -> tuple[Tensor, Tensor]:
        """cos/sin tables in fp32 for every position, built once per device (kept out of .to(dtype))."""
        if self._rope is None or self._rope[0].device != torch.device(device):
            t = torch.arange(self.args.max_seq_len, device=device, dtype=torch.float32)
            ang = torch.outer(t, rope_frequencies(self.args, device))
            self._rope = (ang.cos(), ang.sin())
            self._rope_pairs = rope_pair_tables(*self._rope)
        return self._rope

    def rope_pairs(self, device) -> tuple[Tensor, Tensor]:
        """The [max_seq, D] tables of ``rotate_pairs``, built with ``rope`` (once per device)."""
        self.rope(device)
        return self._rope_pairs

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate the static KV cache and causal mask for one workload shape."""
        if max_seq_length > self.args.max_seq_len:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's {self.args.max_seq_len}")
        w = self.tok_embeddings.weight  # the head may be a quantized module without a .weight
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch_size, max_seq_length, a.n_kv_heads, a.head_dim, w.dtype, w.device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=w.device))

    def positions(
        self, tokens: Tensor, input_pos: Tensor | None, pairs: bool = False, from_zero: bool | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """The attention mask and RoPE tables of these positions (no mask and no cache without input_pos): cos/sin
        [S, D/2], or with ``pairs`` the [S, D] tables of ``rotate_pairs``. A prefill from position 0 has no mask
        either: its attention is causal over the cache rows it writes (``from_zero``: whether it starts at 0,
        read from ``input_pos`` when not given)."""
        cos, sin = self.rope_pairs(tokens.device) if pairs else self.rope(tokens.device)
        s = tokens.shape[1]
        if input_pos is None:
            return None, cos[:s], sin[:s]
        if self.causal_mask is None:
            raise RuntimeError("call setup_caches() before forward with input_pos")
        if starts_at_zero(input_pos, s) if from_zero is None else (from_zero and s > 1):
            return None, cos[:s], sin[:s]
        return self.causal_mask[None, None, input_pos], cos[input_pos], sin[input_pos]

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, from_zero: bool | None = None) -> Tensor:
        """tokens [B, S] -> logits [B, S, vocab]. With input_pos, uses and fills the KV cache (``from_zero``: see
        ``positions``; a compiled caller passes it, since reading input_pos would break its graph)."""
        mask, cos, sin = self.positions(tokens, input_pos, pairs=True, from_zero=from_zero)
        cos, sin = cos[:, None], sin[:, None]  # [S, 1, D]: broadcast over heads, shaped once for every layer
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x)).float()
