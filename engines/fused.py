"""The fused engine: the reference model with its memory-bound steps replaced by Triton kernels.

Module replacement, not a second model: the engine copies the reference's module tree (sharing every weight
tensor, so no weight is copied) and gives each RMSNorm, attention, feed-forward, block and the model itself a
subclass of its class that overrides ``forward`` with the kernels of ``engines.kernels``:

- ``rmsnorm``: each residual add fused into the RMSNorm that follows it (blocks hand ``(residual, delta)`` to the
  next block instead of their sum; the final norm adds the last one);
- ``swiglu``: ``silu(w1 x) * w3 x`` in one pass;
- ``rope``: q and k rotated in place, in one launch;
- ``attention``: split-K decode attention over the static KV cache (prefill keeps scaled_dot_product_attention).

``engine.kernels`` picks a subset (an ablation: which fusion buys what). A kernel left out is replaced by the
reference's own code for that step (the same functions eager calls), so ``kernels=[]`` dispatches exactly eager's
operations (a test counts them) and needs no Triton. ``engine.cuda_graphs=true`` (CUDA only)
replays each decode step from a CUDA graph captured per batch size, so launch overhead disappears too.

On CUDA the engine is timed like any other. Without CUDA the kernels run under Triton's interpreter (see
``engines.kernels``): fidelity is still measured, and ``timing_caveat`` marks the timings as not representative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engines.base import Engine, PrepareContext, register
from engines.llama import (
    Attention,
    FeedForward,
    RMSNorm,
    Transformer,
    TransformerBlock,
    rotate_pairs,
)  # fmt: skip
from engines.surgery import clone

KERNELS = ("rmsnorm", "swiglu", "rope", "attention")


@dataclass(frozen=True)
class FusedParams:
    kernels: tuple[str, ...] = KERNELS
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        unknown = [k for k in self.kernels if k not in KERNELS]
        if unknown or len(set(self.kernels)) != len(self.kernels):
            raise ValueError(f"engine.kernels: {list(self.kernels)} is not a list of distinct names from "
                             f"{', '.join(KERNELS)}")  # fmt: skip


class FusedRMSNorm(RMSNorm):
    fused: bool = True

    def forward(self, x: Tensor) -> Tensor:
        return self.add_forward(x, None)[0]

    def add_forward(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual)."""
        if self.fused:
            from engines.kernels.rmsnorm import add_rmsnorm

            return add_rmsnorm(x, residual, self.weight, self.eps)
        h = x if residual is None else x + residual
        return super().forward(h), h


class FusedFeedForward(FeedForward):
    fused: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(x)
        from engines.kernels.swiglu import swiglu

        return self.w2(swiglu(self.w1(x), self.w3(x)))


class FusedAttention(Attention):
    """With a kernel off, the reference's own code runs in its place (``rotate_pairs`` on the pair tables,
    ``Attention.attend``), so an ablation measures the kernel and nothing else."""

    fused_rope: bool = True
    fused_decode: bool = True

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """cos/sin: [S, D/2] tables for the rope kernel, else the reference's [S, 1, D] pair tables."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if self.fused_rope:
            from engines.kernels.rope import rope_

            rope_(q, k, cos, sin)
        else:
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        if s == 1 and self.fused_decode and input_pos is not None and self.kv_cache is not None:
            from engines.kernels.attention import decode_attention

            k_cache, v_cache = self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))
            return self.wo(decode_attention(q[:, 0], k_cache, v_cache, input_pos).reshape(b, 1, -1))
        return self.wo(self.attend(q, k, v, mask, input_pos))


class FusedBlock(TransformerBlock):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        h, delta = self.fused_forward(x, None, cos, sin, mask, input_pos)
        return h + delta

    def fused_forward(self, x: Tensor, delta: Tensor | None, cos, sin, mask, input_pos) -> tuple[Tensor, Tensor]:
        """Block input ``x + delta`` (the previous block's residual and its not yet added FFN output) ->
        (residual, this block's FFN output): the residual adds happen inside the norms."""
        normed, x = self.attention_norm.add_forward(x, delta)
        normed, h = self.ffn_norm.add_forward(self.attention(normed, cos, sin, mask, input_pos), x)
        return h, self.feed_forward(normed)


class FusedTransformer(Transformer):
    fused_rope: bool = True

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, from_zero: bool | None = None) -> Tensor:
        mask, cos, sin = self.positions(tokens, input_pos, pairs=not self.fused_rope, from_zero=from_zero)
        if not self.fused_rope:  # the reference's [S, 1, D] pair tables, shaped once for every layer
            cos, sin = cos[:, None], sin[:, None]
        x, delta = self.tok_embeddings(tokens), None
        for layer in self.layers:
            x, delta = layer.fused_forward(x, delta, cos, sin, mask, input_pos)
        return self.output(self.norm.add_forward(x, delta)[0]).float()


def fuse(model: Transformer, kernels: tuple[str, ...] = KERNELS) -> FusedTransformer:
    """A fused model sharing ``model``'s weights (``model`` itself is left as it is)."""
    fused = clone(model, share_weights=True)
    replacements = {RMSNorm: FusedRMSNorm, FeedForward: FusedFeedForward, Attention: FusedAttention,
                    TransformerBlock: FusedBlock, Transformer: FusedTransformer}  # fmt: skip
    for module in fused.modules():
        cls = replacements.get(type(module))
        if cls is None:
            continue
        module.__class__ = cls  # same state, a forward that calls the kernels
        if cls is FusedRMSNorm:
            module.fused = "rmsnorm" in kernels
        elif cls is FusedFeedForward:
            module.fused = "swiglu" in kernels
        elif cls is FusedAttention:
            module.fused_rope, module.fused_decode = "rope" in kernels, "attention" in kernels
        elif cls is FusedTransformer:
            module.fused_rope = "rope" in kernels
    return fused


class CudaGraphDecode(nn.Module):
    """Replays each decode step (one token per sequence, with the KV cache) from a CUDA graph captured on first
    use per batch size; prefill and cacheless calls run as they are. Tokens and positions are copied into the
    graph's static inputs; the kernels read the position on the device, so one graph serves every step. New
    caches (``setup_caches``) drop the graphs, whose addresses they would invalidate."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.args = getattr(model, "args", None)
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        self._graphs.clear()
        self.model.setup_caches(max_batch_size=max_batch_size, max_seq_length=max_seq_length)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        if input_pos is None or tokens.shape[1] != 1 or tokens.device.type != "cuda":
            return self.model(tokens, input_pos)
        key = (*tokens.shape, *input_pos.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(tokens, input_pos)
        graph, static_tokens, static_pos, out = self._graphs[key]
        static_tokens.copy_(tokens)
        static_pos.copy_(input_pos)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _capture(self, tokens: Tensor, input_pos: Tensor):
        static_tokens, static_pos = tokens.clone(), input_pos.clone()
        stream = torch.cuda.Stream(tokens.device)
        stream.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(stream):  # autotuning and lazy set-up run here, never inside the capture; the
            for _ in range(2):  # cache rows they write are the ones the replay writes (same tokens, same place)
                self.model(static_tokens, static_pos)
        torch.cuda.current_stream(tokens.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static_tokens, static_pos)
        return graph, static_tokens, static_pos, out


@register
class FusedEngine(Engine):
    name = "fused"
    Params = FusedParams
    description = "Triton kernels swapped in: residual+RMSNorm, SwiGLU, in-place RoPE, split-K decode attention."

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        if self.params.cuda_graphs and device.type != "cuda":
            return f"engine.cuda_graphs=true needs CUDA (this device: {device.type})"
        if not self.params.kernels:  # the reference's code throughout
            return None
        from engines import kernels

        return kernels.unavailable(device) or kernels.dtype_unavailable(dtype, device)

    def timing_caveat(self, device: torch.device) -> str | None:
        if not self.params.kernels:
            return None
        from engines import kernels

        return kernels.timing_caveat(device)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        interpreted = False
        if self.params.kernels:
            from engines import kernels

            kernels.check_dtype(ctx.dtype, ctx.device)
            interpreted = kernels.interpreted()
        fused = fuse(model, self.params.kernels)
        info = {
            "kernels": list(self.params.kernels),
            "interpreted": interpreted,
            "cuda_graphs": self.params.cuda_graphs,
            "weights": "shared with the reference (no copy)",
        }
        out: nn.Module = CudaGraphDecode(fused) if self.params.cuda_graphs else fused
        out.engine_info = info
        return out.eval()
