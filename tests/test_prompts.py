"""Inputs of the timed generations: fresh for every repetition (a cache must not flatter the number), never
zeros, real held-out text when the model was trained on it (DESIGN, "Measuring right")."""

from __future__ import annotations

import json
from itertools import combinations

import torch
from conftest import FAST_POINT

from harness.config import validate
from harness.records import RECORD_NAME

REPS = range(6)


def _distinct(prompts: list[torch.Tensor]) -> bool:
    return all(not torch.equal(a, b) for a, b in combinations(prompts, 2))


def test_random_prompts_differ_per_repetition_and_are_never_zero(compose_cfg):
    from harness.point import _prompt

    spec = validate(compose_cfg(*FAST_POINT, "workload.batch_size=3"))
    prompts = [_prompt(spec, rep, None) for rep in REPS]
    vocab = spec.model.args.vocab_size
    assert all(p.shape == (3, 16) and p.dtype == torch.int64 for p in prompts)
    assert _distinct(prompts)
    assert all(int(p.min()) >= 1 and int(p.max()) < vocab for p in prompts)  # no zeros, real token ids
    assert all(len({tuple(row.tolist()) for row in p}) == 3 for p in prompts)  # the rows of a batch differ too
    assert torch.equal(_prompt(spec, 2, None), prompts[2])  # fixed by the point's seed and the repetition
    other_seed = validate(compose_cfg(*FAST_POINT, "workload.batch_size=3", "seed=1"))
    assert not torch.equal(_prompt(other_seed, 0, None), prompts[0])


def test_trained_prompts_are_windows_of_the_held_out_text(compose_cfg):
    from harness.corpus import load_corpus
    from harness.point import _prompt

    spec = validate(compose_cfg(*FAST_POINT, "model.weights=trained", "workload.batch_size=2"))
    corpus = load_corpus()
    heldout = corpus.tokens("heldout")
    prompts = [_prompt(spec, rep, heldout) for rep in REPS]
    assert _distinct(prompts) and all(p.shape == (2, 16) for p in prompts)
    text = bytes(heldout.tolist())
    for p in prompts:
        for row in p:
            window = bytes(row.tolist())
            assert window in text  # a contiguous window of held-out text (byte-level tokens)
            assert 0 not in window  # text, not padding


def test_a_run_times_a_fresh_nonzero_prompt_in_every_repetition(run_harness, tmp_path, monkeypatch):
    """What the timed generations were actually given (a spy on the point's generate): one prompt per warm-up
    and timed repetition, no two alike, none with a zero."""
    from harness import point

    prompts: list[torch.Tensor] = []
    real_generate = point.generate

    def spy(model, prompt, *args, **kwargs):
        prompts.append(prompt.detach().clone().cpu())
        return real_generate(model, prompt, *args, **kwargs)

    monkeypatch.setattr(point, "generate", spy)
    code = run_harness("run", *FAST_POINT, "workload.batch_size=2", "monitor.enabled=false",
                       f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert code == 0
    rec = json.loads((tmp_path / RECORD_NAME).read_text())
    reps, warmups = rec["timing"]["reps"], len(rec["timing"]["warmup_times_s"])
    assert reps >= 5 and len(prompts) == warmups + reps
    assert _distinct(prompts)
    assert all(p.shape == (2, 16) and int(p.min()) >= 1 for p in prompts)
