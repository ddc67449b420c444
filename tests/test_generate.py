"""Decoding loops: greedy vs a cache-free reference, beam search vs greedy and vs exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch

from engines.generate import beam_search, cache_rows, generate, greedy
from engines.llama import ModelArgs, Transformer


def cache_free_greedy(model, prompt, gen_len):
    seq = prompt
    for _ in range(gen_len):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1] :]


def sequence_logprob(model, prompt, continuation):
    """log p(continuation | prompt) from one full forward without any cache."""
    seq = torch.cat([prompt, continuation], dim=1)
    logp = torch.log_softmax(model(seq).float(), dim=-1)
    p = prompt.shape[1]
    picked = logp[:, p - 1 : -1].gather(-1, continuation[..., None]).squeeze(-1)
    return picked.sum(-1)


class CountingClock:
    def __init__(self):
        self.starts, self.marks = 0, 0

    def start(self):
        self.starts += 1

    def mark(self):
        self.marks += 1


def test_greedy_matches_cache_free_decoding(small_model):
    prompt = torch.randint(1, 97, (3, 11))
    small_model.setup_caches(3, 11 + 9)
    clock = CountingClock()
    out = greedy(small_model, prompt, 9, clock)
    with torch.inference_mode():
        ref = cache_free_greedy(small_model, prompt, 9)
    assert torch.equal(out, ref)
    assert clock.starts == 1 and clock.marks == 9  # one mark per token, the first ends TTFT


def test_beam_search_with_one_beam_equals_greedy(small_model):
    prompt = torch.randint(1, 97, (4, 13))
    small_model.setup_caches(4, 13 + 12)
    g = greedy(small_model, prompt, 12)
    small_model.setup_caches(cache_rows(4, "beam", 1), 13 + 12)
    b, _ = beam_search(small_model, prompt, 12, num_beams=1)
    assert torch.equal(g, b)


def test_beam_search_is_exhaustive_when_beams_cover_all_prefixes():
    """With vocab V and gen_len L, V**(L-1) beams keep every prefix: the result is the exact best sequence."""
    args = ModelArgs(
        vocab_size=5,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=48,
        max_seq_len=32,
        tie_embeddings=False,
    )
    model = Transformer.build(args, seed=7)
    with torch.no_grad():  # sharpen the random model so sequences differ clearly in probability
        model.output.weight.mul_(40)
    v, length, batch = 5, 3, 2
    prompt = torch.randint(0, v, (batch, 6))
    beams = v ** (length - 1)
    model.setup_caches(batch * beams, 6 + length)
    tokens, score = beam_search(model, prompt, length, num_beams=beams)
    with torch.inference_mode():
        for b in range(batch):
            cands = torch.tensor(list(itertools.product(range(v), repeat=length)))
            lp = sequence_logprob(model, prompt[b : b + 1].expand(len(cands), -1), cands)
            best = lp.argmax()
            assert torch.equal(tokens[b], cands[best])
            assert score[b].item() == pytest.approx(lp[best].item(), abs=1e-4)


def test_beam_scores_match_cache_free_recomputation(small_model):
    """Reordering the KV cache between steps is right iff each returned score equals a fresh forward's."""
    prompt = torch.randint(1, 97, (2, 9))
    small_model.setup_caches(cache_rows(2, "beam", 4), 9 + 10)
    clock = CountingClock()
    tokens, score = beam_search(small_model, prompt, 10, num_beams=4, clock=clock)
    with torch.inference_mode():
        ref = sequence_logprob(small_model, prompt, tokens)
    torch.testing.assert_close(score, ref, rtol=1e-4, atol=1e-4)
    assert clock.marks == 10 and tokens.shape == (2, 10)


def test_generate_dispatch_and_errors(small_model):
    prompt = torch.randint(1, 97, (1, 5))
    small_model.setup_caches(1, 5 + 4)
    assert generate(small_model, prompt, 4).shape == (1, 4)
    with pytest.raises(ValueError, match="decoding"):
        generate(small_model, prompt, 4, decoding="nucleus")
    assert cache_rows(3, "beam", 4) == 12 and cache_rows(3, "greedy", 1) == 3


def test_the_decoding_loops_prefill_needs_no_host_read_to_start_at_zero(monkeypatch, small_model):
    """The prefill's positions are declared by the loop that made them: telling a prefill from 0 apart from a
    later chunk reads nothing from the device (on CUDA a read would sync inside the timed TTFT)."""
    from engines.positions import from_zero_positions, starts_at_zero

    declared = from_zero_positions(torch.arange(8))
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    assert starts_at_zero(declared, 8) and not reads
    assert starts_at_zero(torch.arange(8), 8) and len(reads) == 1  # undeclared: read, and still right
    assert not starts_at_zero(torch.arange(3, 11), 8) and not starts_at_zero(torch.arange(1), 1)
    reads.clear()
    small_model.setup_caches(1, 24)
    greedy(small_model, torch.randint(1, small_model.args.vocab_size, (1, 8)), 4)
    assert not reads
