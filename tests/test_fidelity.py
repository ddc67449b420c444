"""Quality metrics: identity, uniform model, a perturbed engine, a broken decode path, NaN and overflowing logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from engines.llama import ModelArgs, Transformer
from harness import fidelity
from harness.fidelity import evaluate, greedy_agreement, teacher_forced


@pytest.fixture(scope="module")
def model():
    return Transformer.build(ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                       intermediate_size=128, max_seq_len=128), seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(0))


def test_an_engine_against_itself_agrees_fully(model, tokens):
    for other in (model, copy.deepcopy(model)):
        q = teacher_forced(model, other, tokens, with_ppl=True)
        assert q["top1_agreement"] == 1.0 and q["kl"] == 0.0 and q["n_tokens"] == tokens.numel()
        assert greedy_agreement(model, other, tokens[:, :16], 12) == 12.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(model, tokens):
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.output.weight.zero_()  # untied: logits are all zero, every token has probability 1/256
    q = teacher_forced(model, uniform, tokens, with_ppl=True)
    assert math.isclose(q["ppl"], 256.0, rel_tol=1e-5)
    assert math.isclose(q["bits_per_byte"], 8.0, rel_tol=1e-5)


def test_a_perturbed_engine_loses_agreement(model, tokens):
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    q = teacher_forced(model, noisy, tokens, with_ppl=False)
    assert 0.0 < q["top1_agreement"] < 1.0 and q["kl"] > 0.0 and "ppl" not in q
    agree = greedy_agreement(model, noisy, tokens[:, :16], 12)
    assert 0.0 <= agree < 12.0


def test_kl_is_reference_to_engine_per_position_and_top1_counts_argmax_matches(model, tokens):
    """The figures against a direct computation: KL(reference || engine), not the reverse, averaged over every
    position; top-1 agreement the fraction of positions whose argmax agrees."""
    import torch.nn.functional as F

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        lp_ref, lp = (torch.log_softmax(m(tokens).float(), dim=-1) for m in (model, noisy))
    q = teacher_forced(model, noisy, tokens, with_ppl=False)
    forward = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    reverse = float((lp.exp() * (lp - lp_ref)).sum(-1).mean())
    assert q["kl"] == pytest.approx(forward, rel=1e-4) and abs(forward - reverse) > 0.01 * forward
    assert q["top1_agreement"] == pytest.approx(float((lp_ref.argmax(-1) == lp.argmax(-1)).float().mean()))
    assert q["kl"] == pytest.approx(float(F.kl_div(lp, lp_ref, log_target=True, reduction="sum")) / tokens.numel(),
                                    rel=1e-4)  # fmt: skip


def test_greedy_agreement_counts_only_the_leading_run(model, monkeypatch):
    """Tokens that match again after a first difference do not count: generation has diverged by then."""
    expected = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    got = torch.tensor([[1, 9, 3, 4], [1, 2, 3, 9]])  # 1 leading match, then 3
    monkeypatch.setattr(fidelity.ReferenceOutputs, "greedy", lambda self, prompts, n: expected)
    monkeypatch.setattr(fidelity, "greedy", lambda m, prompts, n: got)
    other = copy.deepcopy(model)
    assert greedy_agreement(model, other, torch.zeros(2, 4, dtype=torch.long), 4) == 2.0  # (1 + 3) / 2


def test_evaluate_is_memoized_per_prepared_engine(model, tokens):
    first = evaluate("k-memo", model, model, tokens, tokens[:2, :8], 4, trained=False)
    second = evaluate("k-memo", model, model, tokens, tokens[:2, :8], 4, trained=False)
    assert first["cached"] is False and second["cached"] is True
    assert first["ppl"] is None and second["top1_agreement"] == first["top1_agreement"] == 1.0


def _count_forwards(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_reference_outputs_are_computed_once_per_reference(model, tokens):
    """Engines evaluated against one held reference share its outputs; the reference itself needs one pass."""
    fidelity.forget_reference()
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fresh = evaluate("k-fresh", model, noisy, tokens, tokens[:2, :8], 4, trained=True)
    calls, handle = _count_forwards(model)
    try:
        itself = evaluate("k-ref-eager", model, model, tokens, tokens[:2, :8], 4, trained=True, reference_id="r")
        passes_for_itself = len(calls)
        other = evaluate("k-ref-noisy", model, noisy, tokens, tokens[:2, :8], 4, trained=True, reference_id="r")
        assert len(calls) == passes_for_itself  # the reference ran for the first engine only
        fidelity.forget_reference()
        evaluate("k-ref-noisy-2", model, noisy, tokens, tokens[:2, :8], 4, trained=True, reference_id="r")
        assert len(calls) == 2 * passes_for_itself  # forgotten: computed again
    finally:
        handle.remove()
    assert itself["top1_agreement"] == 1.0 and itself["kl"] == 0.0 and itself["greedy_agreement_len"] == 4.0
    for k in ("top1_agreement", "kl", "ppl", "greedy_agreement_len"):
        assert other[k] == pytest.approx(fresh[k], rel=1e-6)


def test_large_reference_log_probs_are_not_kept(model, tokens, monkeypatch):
    monkeypatch.setattr(fidelity, "KEEP_LOG_PROBS_BYTES", 1)
    ref = fidelity.ReferenceOutputs(model, tokens)
    ref.log_probs(0, tokens[:4])
    assert not ref.keep and ref._log_probs == {}
    monkeypatch.undo()
    alone = fidelity.ReferenceOutputs(model, tokens, share=False)  # one engine's pass: nothing held after a chunk
    alone.log_probs(0, tokens[:4])
    assert not alone.keep and alone._log_probs == {}


class _Wrapped(nn.Module):
    """An engine around ``model`` whose logits ``corrupt(logits, tokens)`` rewrites (None: unchanged)."""

    def __init__(self, model, corrupt) -> None:
        super().__init__()
        self.inner, self.corrupt, self.args = model, corrupt, model.args

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        self.inner.setup_caches(max_batch_size, max_seq_length)

    def forward(self, tokens, input_pos=None):
        logits = self.inner(tokens, input_pos)
        return self.corrupt(logits, tokens)


def test_decode_positions_go_through_the_kv_cache_one_token_at_a_time(model, tokens):
    """The last ``decode`` positions are single-token steps: for the same engine they match the prefill's logits
    (KL ~ 0), and an engine broken only on decode steps is caught there, though its prefill is exact."""
    q = teacher_forced(model, copy.deepcopy(model), tokens, with_ppl=True, decode=8)
    assert q["top1_agreement"] == 1.0 and q["decode_top1_agreement"] == 1.0 and q["decode_kl"] == 0.0
    assert q["decode_positions"] == 8 and q["nonfinite_fraction"] == 0.0
    prefill_only = teacher_forced(model, model, tokens, with_ppl=True)
    assert q["ppl"] == pytest.approx(prefill_only["ppl"], rel=1e-5)  # the cached steps compute the same function
    shapes = []
    spy = _Wrapped(model, lambda logits, t: shapes.append(t.shape[1]) or logits)
    teacher_forced(model, spy, tokens[:4], with_ppl=False, decode=8)
    assert shapes == [40] + [1] * 8

    def random_on_decode(logits, t):
        return torch.randn_like(logits) * 5 if t.shape[1] == 1 else logits

    broken = teacher_forced(model, _Wrapped(model, random_on_decode), tokens, with_ppl=False, decode=8)
    assert broken["decode_top1_agreement"] < 0.2 and broken["decode_kl"] > 1.0
    assert broken["top1_agreement"] == pytest.approx(40 / 48 + 8 / 48 * broken["decode_top1_agreement"])
    blind = teacher_forced(model, _Wrapped(model, random_on_decode), tokens, with_ppl=False)  # prefill only
    assert blind["top1_agreement"] == 1.0 and "decode_top1_agreement" not in blind
    with pytest.raises(ValueError, match="decode positions: 48 is not allowed; allowed: 0..47"):
        teacher_forced(model, model, tokens, with_ppl=False, decode=48)


def test_nan_logits_are_counted_not_read_as_unmeasured(model, tokens):
    def nan_at_two_positions(logits, t):
        logits = logits.clone()
        logits[:, :2, 7] = float("nan")
        return logits

    q = teacher_forced(model, _Wrapped(model, nan_at_two_positions), tokens, with_ppl=True)
    assert q["nonfinite_fraction"] == pytest.approx(2 / 48)
    assert math.isnan(q["kl"]) and math.isnan(q["ppl"])
    plus_inf = teacher_forced(model, _Wrapped(model, lambda lg, t: lg.index_fill(1, torch.tensor([3]), math.inf)),
                              tokens, with_ppl=False)  # fmt: skip
    assert plus_inf["nonfinite_fraction"] == pytest.approx(1 / 48)


def test_an_overflowing_perplexity_is_infinite_not_an_error(model, tokens):
    """Logits scaled up 1e5 (a lost dequantization scale) put the mean NLL past exp()'s range."""
    q = teacher_forced(model, _Wrapped(model, lambda lg, t: lg * 1e5), tokens, with_ppl=True)
    assert q["nll"] > 710 and q["ppl"] == math.inf and q["nonfinite_fraction"] == 0.0 and math.isfinite(q["kl"])
