"""Quality of an engine: agreement with the eager reference on the same weights, and perplexity.

Teacher-forced on held-out windows (corpus text when the weights are trained, seeded random ids otherwise):
top-1 agreement (fraction of positions whose most likely next token is the reference's), mean KL divergence
KL(reference || engine) in nats per token, and, for trained weights, perplexity and bits per byte of the engine
itself. Greedy-generation agreement counts how many leading tokens an engine generates exactly as the
reference does. Logits go through the same ``forward(tokens, input_pos)`` paths that are timed: each window is
prefilled up to its last ``decode`` positions, which are then fed one token at a time through the KV cache, so
the single-token decode path (a decode-attention kernel, a CUDA graph's replay) is scored too, on its own as
``decode_top1_agreement`` / ``decode_kl``. Both models take the same path, so identical engines score exactly
1 and 0. Positions whose logits are NaN or +inf count in ``nonfinite_fraction``: their KL and perplexity are
not numbers, which a record must not read as "not measured".

Computed once per prepared engine (not per batch size) and memoized in-process. The reference's own outputs
are computed once per reference too (``ReferenceOutputs``) and shared by every engine evaluated against it
while it is held (the engines of a group timed in turns); the eager engine, which is the reference itself,
costs no second pass.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.generate import greedy, setup_caches
from harness.records import perplexity

# Sequences scored per forward pass, whatever the point's batch size: quality is measured once per prepared
# engine and shared by its batch sizes (recorded as ``quality.rows``; part of ``quality.inputs_id``).
CHUNK_ROWS = 4


@torch.inference_mode()
def _logits(model: nn.Module, tokens: Tensor, decode: int = 0) -> Tensor:
    """fp32 logits of every position of ``tokens`` [n, L]: one prefill of the first L - ``decode`` tokens, then
    one single-token step through the KV cache for each of the last ``decode``."""
    n, length = tokens.shape
    setup_caches(model, n, length)
    pos = torch.arange(length, device=tokens.device)
    first = length - decode
    out = [model(tokens[:, :first], pos[:first]).float()]
    out += [model(tokens[:, t : t + 1], pos[t : t + 1]).float() for t in range(first, length)]
    return torch.cat(out, dim=1) if decode else out[0]


# Reference log-probs are kept for reuse only up to this size (fp32 positions x vocabulary): 2,048 positions of
# a 32k vocabulary (256 MiB) are; Llama-3's 128k vocabulary at the same length is recomputed per engine instead.
KEEP_LOG_PROBS_BYTES = 512 * 2**20


class ReferenceOutputs:
    """The reference's outputs on the quality inputs, computed on first use and kept for the next engine.

    Keyed by the caller's id for (reference weights, quality inputs); ``teacher_forced`` and
    ``greedy_agreement`` take it in place of recomputing the reference's side.
    """

    def __init__(self, reference: nn.Module, tokens: Tensor, share: bool = True, decode: int = 0) -> None:
        self.reference = reference
        self.decode = decode
        self.keep = share and tokens.numel() * _vocab(reference) * 4 <= KEEP_LOG_PROBS_BYTES
        self._log_probs: dict[int, Tensor] = {}
        self._greedy: dict[tuple[int, ...], Tensor] = {}

    def log_probs(self, i: int, x: Tensor) -> Tensor:
        """log-softmax of the reference's logits for chunk ``i`` (rows ``x``)."""
        if i in self._log_probs:
            return self._log_probs[i]
        lp = torch.log_softmax(_logits(self.reference, x, self.decode), dim=-1)
        if self.keep:
            self._log_probs[i] = lp
        return lp

    def greedy(self, prompts: Tensor, gen_len: int) -> Tensor:
        key = (*prompts.shape, gen_len, hash(prompts.cpu().numpy().tobytes()))
        if key not in self._greedy:
            setup_caches(self.reference, prompts.shape[0], prompts.shape[1] + gen_len)
            self._greedy[key] = greedy(self.reference, prompts, gen_len)
        return self._greedy[key]


def _vocab(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0)) or 1


_reference_outputs: dict[str, ReferenceOutputs] = {}


def reference_outputs(reference_id: str, reference: nn.Module, tokens: Tensor, decode: int = 0) -> ReferenceOutputs:
    """The kept outputs of the reference under ``reference_id`` (one reference at a time)."""
    held = _reference_outputs.get(reference_id)
    if held is None or held.reference is not reference or held.decode != decode:
        _reference_outputs.clear()
        held = _reference_outputs[reference_id] = ReferenceOutputs(reference, tokens, decode=decode)
    return held


def forget_reference() -> None:
    """Drop the kept reference outputs (the reference model itself is being dropped)."""
    _reference_outputs.clear()


@torch.inference_mode()
def teacher_forced(
    reference: nn.Module,
    model: nn.Module,
    tokens: Tensor,
    with_ppl: bool,
    ref: ReferenceOutputs | None = None,
    decode: int = 0,
) -> dict[str, float]:
    """top-1 agreement, mean KL(reference || model) and (with_ppl) the model's NLL over ``tokens`` [n, L], the
    last ``decode`` positions of each window computed by single-token steps and also scored on their own."""
    if not 0 <= decode < tokens.shape[1]:
        raise ValueError(f"decode positions: {decode} is not allowed; allowed: 0..{tokens.shape[1] - 1}")
    if ref is None:
        ref = ReferenceOutputs(reference, tokens, share=False, decode=decode)  # one chunk held at a time
    elif ref.decode != decode:
        raise ValueError(f"the reference's outputs took {ref.decode} decode positions, not {decode}")
    first = tokens.shape[1] - decode
    agree = kl = nll = 0.0
    dec_agree = dec_kl = 0.0
    positions = nonfinite = ref_nonfinite = 0
    for i in range(0, tokens.shape[0], CHUNK_ROWS):
        x = tokens[i : i + CHUNK_ROWS]
        lp_ref = ref.log_probs(i, x)
        lp = lp_ref if model is reference else torch.log_softmax(_logits(model, x, decode), dim=-1)
        same = lp_ref.argmax(-1) == lp.argmax(-1)
        div = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0)  # NaN where the model's logits are
        agree += float(same.sum())
        kl += float(div.sum())
        dec_agree += float(same[:, first:].sum())
        dec_kl += float(div[:, first:].sum())
        nonfinite += int(lp.isnan().any(-1).sum())  # log_softmax is NaN where a logit is NaN or +inf
        ref_nonfinite += int(lp_ref.isnan().any(-1).sum())
        if with_ppl:
            nll += float(F.nll_loss(lp[:, :-1].reshape(-1, lp.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        positions += x.numel()
    out = {"top1_agreement": agree / positions, "kl": kl / positions, "n_tokens": positions,
           "nonfinite_fraction": nonfinite / positions, "reference_nonfinite_fraction": ref_nonfinite / positions,
           "decode_positions": decode, "rows": CHUNK_ROWS}  # fmt: skip
    if decode:
        n_decode = tokens.shape[0] * decode
        out.update(decode_top1_agreement=dec_agree / n_decode, decode_kl=dec_kl / n_decode, decode_n_tokens=n_decode)
    if with_ppl:
        mean_nll = nll / (positions - tokens.shape[0])
        out.update(nll=mean_nll, ppl=perplexity(mean_nll), bits_per_byte=mean_nll / math.log(2))
    return out


@torch.inference_mode()
def greedy_agreement(
    reference: nn.Module, model: nn.Module, prompts: Tensor, gen_len: int, ref: ReferenceOutputs | None = None
) -> float:
    """Mean number of leading tokens ``model`` generates exactly as ``reference`` does (0..gen_len)."""
    if prompts.shape[0] == 0 or gen_len == 0:
        return math.nan
    ref = ref if ref is not None else ReferenceOutputs(reference, prompts, share=False)
    expected = ref.greedy(prompts, gen_len)
    if model is reference:
        got = expected
    else:
        setup_caches(model, prompts.shape[0], prompts.shape[1] + gen_len)
        got = greedy(model, prompts, gen_len)
    same = (expected == got).int()
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
    reference_id: str | None = None,
    decode: int = 0,
) -> dict[str, Any]:
    """The quality section of a record; memoized under ``key`` (the prepared engine's identity). With
    ``reference_id`` (reference weights and quality inputs), the reference's outputs are kept for the next engine.
    ``decode``: how many trailing positions of each window go through single-token decode steps."""
    if key in _memo:
        return lookup(key)
    t0 = time.perf_counter()
    ref = reference_outputs(reference_id, reference, windows, decode) if reference_id is not None else None
    out: dict[str, Any] = {"reference": "eager", "trained": trained}
    out.update(teacher_forced(reference, model, windows, with_ppl=trained, ref=ref, decode=decode))
    out["greedy_agreement_len"] = greedy_agreement(reference, model, greedy_prompts, greedy_len, ref=ref)
    out["greedy_len"] = greedy_len
    if not trained:
        out.update(ppl=None, bits_per_byte=None)
    out["seconds"] = time.perf_counter() - t0
    _memo[key] = out
    return {**out, "cached": False}
