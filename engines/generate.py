"""Decoding loops shared by every engine: prefill, then one forward per generated token.

Generation length is fixed (no stop token) so that every repetition does the same work. The loops never time
themselves: the harness passes a ``clock`` whose ``start()`` is called just before prefill and whose ``mark()``
is called once each time a token is ready (the first mark ends time-to-first-token).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from engines.llama import KVCache
from engines.positions import from_zero_positions


class StepClock(Protocol):
    def start(self) -> None: ...
    def mark(self) -> None: ...


class _NoClock:
    def start(self) -> None:
        pass

    def mark(self) -> None:
        pass


def setup_caches(model: nn.Module, batch_size: int, max_seq_length: int) -> None:
    model.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length)


def reorder_caches(model: nn.Module, index: Tensor) -> None:
    """Reorder every KV cache in the model along the batch axis (beam search keeps the surviving beams)."""
    for module in model.modules():
        if isinstance(module, KVCache):
            module.reorder(index)


@torch.inference_mode()
def greedy(model: nn.Module, prompt: Tensor, gen_len: int, clock: StepClock | None = None) -> Tensor:
    """prompt [B, P] -> generated tokens [B, gen_len]; caches must be set up for B x (P + gen_len)."""
    clock = clock or _NoClock()
    b, p = prompt.shape
    positions = torch.arange(p + gen_len, device=prompt.device)
    out = torch.empty(b, gen_len, dtype=prompt.dtype, device=prompt.device)
    prefill_pos = from_zero_positions(positions[:p])  # known to start at 0 without reading the device
    clock.start()
    tok = model(prompt, prefill_pos)[:, -1].argmax(-1, keepdim=True)
    out[:, :1] = tok
    clock.mark()
    for i in range(1, gen_len):
        tok = model(tok, positions[p + i - 1 : p + i])[:, -1].argmax(-1, keepdim=True)
        out[:, i : i + 1] = tok
        clock.mark()
    return out


@torch.inference_mode()
def beam_search(
    model: nn.Module, prompt: Tensor, gen_len: int, num_beams: int, clock: StepClock | None = None
) -> tuple[Tensor, Tensor]:
    """Fixed-length beam search. Returns the best beam's tokens [B, gen_len] and its log-probability [B].

    Caches must be set up for (B * num_beams) x (P + gen_len); each step reorders them to the surviving beams.
    """
    clock = clock or _NoClock()
    b, p = prompt.shape
    k = num_beams
    dev = prompt.device
    positions = torch.arange(p + gen_len, device=dev)
    rows = (torch.arange(b, device=dev) * k)[:, None]
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    tokens = torch.empty(b, k, 0, dtype=prompt.dtype, device=dev)
    prefill_pos = from_zero_positions(positions[:p])
    clock.start()
    logits = model(prompt.repeat_interleave(k, dim=0), prefill_pos)[:, -1]
    for step in range(gen_len):
        logp = torch.log_softmax(logits.float(), dim=-1)
        v = logp.shape[-1]
        scores, flat = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v).topk(k, dim=-1)
        beam, tok = flat // v, flat % v
        tokens = torch.cat([tokens.gather(1, beam[:, :, None].expand(-1, -1, step)), tok[:, :, None]], dim=2)
        clock.mark()
        if step + 1 < gen_len:
            reorder_caches(model, (rows + beam).reshape(-1))
            logits = model(tok.reshape(b * k, 1), positions[p + step : p + step + 1])[:, -1]
    best = scores.argmax(-1)
    idx = torch.arange(b, device=dev)
    return tokens[idx, best], scores[idx, best]


def generate(
    model: nn.Module,
    prompt: Tensor,
    gen_len: int,
    decoding: str = "greedy",
    num_beams: int = 1,
    clock: StepClock | None = None,
) -> Tensor:
    """Dispatch on the workload's decoding strategy; returns tokens [B, gen_len]."""
    if decoding == "greedy":
        return greedy(model, prompt, gen_len, clock)
    if decoding == "beam":
        return beam_search(model, prompt, gen_len, num_beams, clock)[0]
    raise ValueError(f"decoding must be 'greedy' or 'beam', got {decoding!r}")


def cache_rows(batch_size: int, decoding: str, num_beams: int) -> int:
    """Rows of KV cache a workload needs: one per sequence, times the beams."""
    return batch_size * (num_beams if decoding == "beam" else 1)
