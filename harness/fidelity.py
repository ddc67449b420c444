"""Quality of an engine: agreement with the eager reference on the same weights, and perplexity.

Teacher-forced on held-out windows (corpus text when the weights are trained, seeded random ids otherwise):
top-1 agreement (fraction of positions whose most likely next token is the reference's), mean KL divergence
KL(reference || engine) in nats per token, and, for trained weights, perplexity and bits per byte of the engine
itself. Greedy-generation agreement counts how many leading tokens an engine generates exactly as the
reference does. Logits go through the same ``forward(tokens, input_pos)`` path that is timed.

Computed once per prepared engine (not per batch size) and memoized in-process.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.generate import greedy, setup_caches

CHUNK_ROWS = 4


@torch.inference_mode()
def _logits(model: nn.Module, tokens: Tensor) -> Tensor:
    setup_caches(model, tokens.shape[0], tokens.shape[1])
    return model(tokens, torch.arange(tokens.shape[1], device=tokens.device)).float()


@torch.inference_mode()
def teacher_forced(reference: nn.Module, model: nn.Module, tokens: Tensor, with_ppl: bool) -> dict[str, float]:
    """top-1 agreement, mean KL(reference || model) and (with_ppl) the model's NLL over ``tokens`` [n, L]."""
    agree = kl = nll = 0.0
    positions = 0
    for i in range(0, tokens.shape[0], CHUNK_ROWS):
        x = tokens[i : i + CHUNK_ROWS]
        lp_ref = torch.log_softmax(_logits(reference, x), dim=-1)
        lp = torch.log_softmax(_logits(model, x), dim=-1)
        agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0).sum())
        if with_ppl:
            nll += float(F.nll_loss(lp[:, :-1].reshape(-1, lp.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        positions += x.numel()
    out = {"top1_agreement": agree / positions, "kl": kl / positions, "n_tokens": positions}
    if with_ppl:
        mean_nll = nll / (positions - tokens.shape[0])
        out.update(nll=mean_nll, ppl=math.exp(mean_nll), bits_per_byte=mean_nll / math.log(2))
    return out


@torch.inference_mode()
def greedy_agreement(reference: nn.Module, model: nn.Module, prompts: Tensor, gen_len: int) -> float:
    """Mean number of leading tokens ``model`` generates exactly as ``reference`` does (0..gen_len)."""
    if prompts.shape[0] == 0 or gen_len == 0:
        return math.nan
    outs = []
    for m in (reference, model):
        setup_caches(m, prompts.shape[0], prompts.shape[1] + gen_len)
        outs.append(greedy(m, prompts, gen_len))
    same = (outs[0] == outs[1]).int()
    leading = same.cumprod(dim=1).sum(dim=1).float()
    return float(leading.mean())


_memo: dict[str, dict[str, Any]] = {}


def lookup(key: str) -> dict[str, Any] | None:
    """The memoized quality of a prepared engine, if it was evaluated in this process."""
    return {**_memo[key], "cached": True} if key in _memo else None


def evaluate(
    key: str,
    reference: nn.Module,
    model: nn.Module,
    windows: Tensor,
    greedy_prompts: Tensor,
    greedy_len: int,
    trained: bool,
) -> dict[str, Any]:
    """The quality section of a record; memoized under ``key`` (the prepared engine's identity)."""
    if key in _memo:
        return lookup(key)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"reference": "eager", "trained": trained}
    out.update(teacher_forced(reference, model, windows, with_ppl=trained))
    out["greedy_agreement_len"] = greedy_agreement(reference, model, greedy_prompts, greedy_len)
    out["greedy_len"] = greedy_len
    if not trained:
        out.update(ppl=None, bits_per_byte=None)
    out["seconds"] = time.perf_counter() - t0
    _memo[key] = out
    return {**out, "cached": False}
