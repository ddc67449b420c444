"""Which weights to prune: scores, exact masks, and calibration statistics collected from corpus text.

- Scores: ``magnitude`` |W_ij|; ``wanda`` |W_ij| * ||X_j||_2 (Sun et al. 2023, "A Simple and Effective Pruning
  Approach for LLMs"), the weight times the L2 norm of its input feature over calibration tokens, so a small
  weight on a loud input survives and a large one on a silent input goes.
- Masks: ``unstructured_mask`` removes exactly round(sparsity * numel) weights of a layer, the lowest-scored of
  the layer or of each output row (Wanda's comparison group); ``two_four_mask`` keeps the two best of every four
  consecutive input weights (the 2:4 pattern sparse tensor cores take).
- Calibration (``collect``): forward pre-hooks on every linear layer sum x_j^2 per input feature over the
  calibration windows, and on each attention output projection the squared norm of each KV group's
  contribution to the residual stream (for structured pruning). Statistics are cached on disk by a key of the
  reference weights and the exact calibration tokens, seed and size (``calibration_key``).
- Structured importance: the norm over calibration tokens of what an FFN channel or a KV group (its query
  heads with their keys and values) adds to the residual stream; ``engines.surgery.shrink`` cuts the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engines.cache import building, cache_key, cached, write_entry
from engines.llama import Attention
from engines.train import random_windows

CALIBRATION_VERSION = 1  # bump when what ``collect`` computes changes: old cache entries are then never read


# -- scores and masks ---------------------------------------------------------------------------------------
def weight_score(weight: Tensor, input_sq: Tensor | None = None) -> Tensor:
    """|W| (magnitude), or |W| * ||X_j||_2 (wanda) given the summed squares of each input feature."""
    score = weight.detach().float().abs()
    return score if input_sq is None else score * input_sq.to(score.device).sqrt()[None, :]


def unstructured_mask(score: Tensor, sparsity: float, granularity: str = "layer") -> Tensor:
    """Keep-mask [out, in] that removes exactly ``round(sparsity * numel)`` weights of the layer: the lowest-scored
    of the whole layer (``layer``), or of each output row (``row``, Wanda's comparison group), spread over the
    rows as evenly as the count allows (rows differ by at most one weight; the rows whose next weight scores
    lowest give the extra ones)."""
    total = round(sparsity * score.numel())
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if total == 0:
        return keep
    if granularity == "layer":
        keep.view(-1)[score.flatten().topk(total, largest=False, sorted=False).indices] = False
        return keep
    if granularity != "row":
        raise ValueError(f"granularity: {granularity!r} is not allowed; allowed: layer, row")
    k, extra = divmod(total, score.shape[0])
    idx = score.topk(k + (extra > 0), dim=1, largest=False, sorted=True).indices
    keep.scatter_(1, idx[:, :k], False)
    if extra:
        rows_more = score.gather(1, idx[:, k:]).squeeze(1).topk(extra, largest=False).indices
        keep[rows_more, idx[rows_more, k]] = False
    return keep


def two_four_mask(score: Tensor) -> Tensor:
    """Keep-mask [out, in] with the two highest-scored weights of every four consecutive inputs of a row."""
    rows, cols = score.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 input features, got {cols}")
    groups = score.reshape(rows, cols // 4, 4)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(rows, cols)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool mask as bits, 8 to a byte (the on-disk mask cache is 1/32 of the fp32 weights)."""
    flat = mask.flatten().to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.flatten()[: math.prod(shape)].view(shape).bool()


# -- calibration ----------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Activation statistics of the reference over the calibration tokens."""

    key: str
    n_tokens: int
    input_sq: dict[str, Tensor]  # linear name -> sum over tokens of x_j^2 per input feature, fp32
    group_sq: dict[str, Tensor]  # attention.wo name -> sum over tokens of ||wo_g y_g||^2 per KV group, fp32
    cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def calibration_windows(tokens: Tensor, seqs: int, seq_len: int, seed: int) -> Tensor:
    """``seqs`` windows of ``seq_len`` corpus tokens at offsets drawn from ``seed``: [seqs, seq_len]."""
    return random_windows(tokens, seqs, seq_len, torch.Generator().manual_seed(seed))


def random_calibration_windows(vocab_size: int, seqs: int, seq_len: int, seed: int) -> Tensor:
    """``seqs`` windows of token ids drawn uniformly from 1..vocab_size-1 by ``seed`` (as random-weight prompts
    and quality windows are): [seqs, seq_len]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, max(vocab_size, 2), (seqs, seq_len), generator=gen)


def calibration_key(reference_key: str, windows: Tensor, seed: int) -> str:
    """Identity of a calibration: the reference weights and the exact tokens (hashed), their count, length and
    seed. Any change of corpus, seed or size gives another key, so another cache entry."""
    digest = hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    seqs, seq_len = windows.shape
    return cache_key({
        "reference": reference_key, "tokens_sha256": digest, "seqs": seqs, "seq_len": seq_len, "seed": seed,
        "version": CALIBRATION_VERSION,
    })  # fmt: skip


def _accumulate_input(store: dict[str, Tensor], name: str, module: nn.Module, args: tuple) -> None:
    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
    sq = x.pow(2).sum(0)
    store[name] = store[name] + sq if name in store else sq


def _accumulate_groups(store: dict[str, Tensor], name: str, attn: Attention, module: nn.Module, args: tuple):
    """Per KV group g: ||wo[:, cols_g] @ y[cols_g]||^2 summed over tokens, where cols_g are the output columns
    of g's query heads (what removing the group takes away from the residual stream)."""
    y = args[0].detach().float().reshape(-1, attn.n_kv_heads, attn.n_heads // attn.n_kv_heads * attn.head_dim)
    w = module.weight.detach().float().view(module.weight.shape[0], attn.n_kv_heads, -1)
    sq = torch.einsum("tgk,dgk->tgd", y, w).pow(2).sum((0, 2))
    store[name] = store[name] + sq if name in store else sq


@torch.inference_mode()
def collect(model: nn.Module, windows: Tensor, batch_size: int = 4) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run ``model`` (plain causal forward, no KV cache) over ``windows`` with hooks on every linear layer;
    returns (input_sq, group_sq). The hooks are removed afterwards: ``model`` is left as it was."""
    input_sq: dict[str, Tensor] = {}
    group_sq: dict[str, Tensor] = {}
    handles = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                handles.append(mod.register_forward_pre_hook(partial(_accumulate_input, input_sq, name)))
            if isinstance(mod, Attention):
                hook = partial(_accumulate_groups, group_sq, f"{name}.wo", mod)
                handles.append(mod.wo.register_forward_pre_hook(hook))
        device = next(model.parameters()).device
        for batch in windows.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return ({k: v.cpu() for k, v in input_sq.items()}, {k: v.cpu() for k, v in group_sq.items()})


def calibrate(model: nn.Module, windows: Tensor, key: str, path: Path | None) -> Calibration:
    """Calibration statistics of ``model`` on ``windows``, read from ``path`` when cached there, else collected
    (and saved to ``path`` unless it is None)."""
    if path is not None and cached(path):
        tensors, meta = load_tensors(path)
        split = _split_prefixed(tensors)
        return Calibration(key, meta["n_tokens"], split["input_sq"], split["group_sq"], cached=True, info=meta)
    meta = {"key": key, "n_tokens": windows.numel(), "seqs": windows.shape[0], "seq_len": windows.shape[1]}
    if path is None:
        input_sq, group_sq = collect(model, windows)
    else:
        with building():  # a cache entry, once for every point that calibrates alike: not one point's time
            input_sq, group_sq = collect(model, windows)
            tensors = {f"input_sq/{k}": v for k, v in input_sq.items()}
            tensors |= {f"group_sq/{k}": v for k, v in group_sq.items()}
            save_tensors(path, tensors, meta)
    return Calibration(key, windows.numel(), input_sq, group_sq, cached=False, info=meta)


def _split_prefixed(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {"input_sq": {}, "group_sq": {}}
    for name, t in tensors.items():
        prefix, _, rest = name.partition("/")
        out[prefix][rest] = t
    return out


# -- structured importance -------------------------------------------------------------------------------------
def ffn_channel_importance(model: nn.Module, cal: Calibration, layer: int) -> Tensor:
    """Norm over calibration tokens of each FFN channel's contribution to the residual stream:
    ||h_c||_2 * ||w2[:, c]|| with h = silu(w1 x) * w3 x (the input of w2; a rank-1 term, so this is exact)."""
    w2 = model.layers[layer].feed_forward.w2.weight
    return cal.input_sq[f"layers.{layer}.feed_forward.w2"].sqrt() * w2.detach().float().norm(dim=0).cpu()


def kv_group_importance(cal: Calibration, layer: int) -> Tensor:
    """Norm over calibration tokens of each KV group's contribution to the residual stream: its query heads'
    attention outputs through their columns of wo (the keys and values act only through those heads)."""
    return cal.group_sq[f"layers.{layer}.attention.wo"].sqrt()


# -- cache files -----------------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Tensors as safetensors plus a JSON sidecar with their sha256, each written atomically (engines.cache)."""
    write_entry(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)), meta)


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())
