"""Model surgery: a smaller dense Transformer cut out of a larger one, its weights copied from the kept parts.

Keeps a subset of layers (depth), of FFN channels and of key/value head groups (width). Query heads go with
their KV group, so grouped-query attention stays consistent. The same number of channels and groups is kept
in every layer, so the result is an ordinary ``Transformer`` with a smaller ``ModelArgs`` that runs the usual
prefill/decode path with its KV cache. Distillation and structured pruning both build on this.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor

from engines.llama import ModelArgs, Transformer


def evenly_spaced(n: int, keep: int) -> list[int]:
    """``keep`` of ``n`` layer indices, evenly spaced, first and last included."""
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


def ffn_importance(model: Transformer, layer: int) -> Tensor:
    """Weight-magnitude importance of each FFN channel: |w1 row| * |w3 row| * |w2 column|."""
    ff = model.layers[layer].feed_forward
    return ff.w1.weight.float().norm(dim=1) * ff.w3.weight.float().norm(dim=1) * ff.w2.weight.float().norm(dim=0)


def kv_group_importance(model: Transformer, layer: int) -> Tensor:
    """Weight-magnitude importance of each KV group: its K/V rows and its query heads' Q rows and O columns."""
    a, args = model.layers[layer].attention, model.args
    hd, group = args.head_dim, args.n_heads // args.n_kv_heads
    k = a.wk.weight.float().view(args.n_kv_heads, hd, -1).flatten(1).norm(dim=1)
    v = a.wv.weight.float().view(args.n_kv_heads, hd, -1).flatten(1).norm(dim=1)
    q = a.wq.weight.float().view(args.n_kv_heads, group * hd, -1).flatten(1).norm(dim=1)
    o = a.wo.weight.float().T.reshape(args.n_kv_heads, group * hd, -1).flatten(1).norm(dim=1)
    return q * k * v * o


def kept_width(args: ModelArgs, fraction: float) -> tuple[int, int]:
    """FFN channels and KV groups kept in each layer when ``fraction`` of the width stays: round(fraction * n),
    at least one (structured pruning keeps 1 - sparsity; distillation its ``width``)."""
    return max(1, round(fraction * args.intermediate_size)), max(1, round(fraction * args.n_kv_heads))


def shrunk_args(args: ModelArgs, n_layers: int, n_ffn: int, n_kv: int) -> ModelArgs:
    """The shape ``shrink`` builds: ``n_kv`` KV groups, each with its query heads, and ``n_ffn`` FFN channels in
    each of ``n_layers`` layers; head_dim unchanged (set explicitly, as dim // n_heads no longer gives it)."""
    group = args.n_heads // args.n_kv_heads
    return replace(
        args, n_layers=n_layers, intermediate_size=n_ffn, n_kv_heads=n_kv, n_heads=n_kv * group,
        head_dim=args.head_dim,
    )  # fmt: skip


def first_of_width(model: Transformer, fraction: float) -> Transformer:
    """The model's shape after structured pruning to ``fraction`` of its width, keeping the first channels and
    groups: for timing, where which ones are kept does not change the time (its outputs are not the pruned
    model's)."""
    n_ffn, n_kv = kept_width(model.args, fraction)
    layers = model.args.n_layers
    return shrink(model, None, [torch.arange(n_ffn)] * layers, [torch.arange(n_kv)] * layers)


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def shrink(
    model: Transformer,
    layers: list[int] | None = None,
    ffn_keep: list[Tensor] | None = None,
    kv_keep: list[Tensor] | None = None,
) -> Transformer:
    """A new model with teacher layers ``layers``, FFN channels ``ffn_keep[i]`` and KV groups ``kv_keep[i]``
    (indices into the *kept* layer i; None keeps all). The input model is not modified."""
    args = model.args
    layers = list(range(args.n_layers)) if layers is None else list(layers)
    group = args.n_heads // args.n_kv_heads
    n_ffn = args.intermediate_size if ffn_keep is None else len(ffn_keep[0])
    n_kv = args.n_kv_heads if kv_keep is None else len(kv_keep[0])
    for name, keep in (("ffn_keep", ffn_keep), ("kv_keep", kv_keep)):
        if keep is not None and (len(keep) != len(layers) or len({len(k) for k in keep}) != 1):
            raise ValueError(f"{name}: one index set per kept layer, all of the same size")
    new_args = shrunk_args(args, len(layers), n_ffn, n_kv)
    w = model.output.weight
    small = Transformer.build(new_args, device=w.device, dtype=w.dtype, seed=0)
    small.tok_embeddings.weight.copy_(model.tok_embeddings.weight)
    small.norm.weight.copy_(model.norm.weight)
    if not args.tie_embeddings:
        small.output.weight.copy_(model.output.weight)
    hd = args.head_dim
    for j, i in enumerate(layers):
        src, dst = model.layers[i], small.layers[j]
        dst.attention_norm.weight.copy_(src.attention_norm.weight)
        dst.ffn_norm.weight.copy_(src.ffn_norm.weight)
        kv = torch.arange(args.n_kv_heads) if kv_keep is None else kv_keep[j].cpu()
        q_rows = ((kv[:, None] * group + torch.arange(group)).flatten()[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (kv[:, None] * hd + torch.arange(hd)).flatten()
        q_rows, kv_rows = q_rows.to(w.device), kv_rows.to(w.device)
        sa, da = src.attention, dst.attention
        da.wq.weight.copy_(sa.wq.weight[q_rows])
        da.wk.weight.copy_(sa.wk.weight[kv_rows])
        da.wv.weight.copy_(sa.wv.weight[kv_rows])
        da.wo.weight.copy_(sa.wo.weight[:, q_rows])
        ch = torch.arange(args.intermediate_size) if ffn_keep is None else ffn_keep[j].cpu()
        ch = ch.to(w.device)
        sf, df = src.feed_forward, dst.feed_forward
        df.w1.weight.copy_(sf.w1.weight[ch])
        df.w3.weight.copy_(sf.w3.weight[ch])
        df.w2.weight.copy_(sf.w2.weight[:, ch])
    return small.eval()


def clone(model: Transformer, share_weights: bool = False) -> Transformer:
    """A deep copy without the KV caches (which belong to a workload, not to the weights). ``share_weights``: the
    copy's parameters are the reference's own tensors (a new module tree to swap modules in, no second model)."""
    saved = [layer.attention.kv_cache for layer in model.layers], model.causal_mask
    for layer in model.layers:
        layer.attention.kv_cache = None
    model.causal_mask = None
    try:
        return copy.deepcopy(model, memo={id(p): p for p in model.parameters()} if share_weights else None)
    finally:
        for layer, cache in zip(model.layers, saved[0], strict=True):
            layer.attention.kv_cache = cache
        model.causal_mask = saved[1]
