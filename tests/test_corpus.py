"""Corpus: the default text needs no download, splits deterministically, and user files work."""

from __future__ import annotations

import pytest
import torch

from harness.corpus import BYTE_VOCAB, CorpusError, load_corpus, split_chunks, unigram_bits_per_byte, windows


def test_default_corpus_is_pythons_own_documentation():
    c = load_corpus()
    ident = c.identity()
    assert c.name == "python-docs" and ident["files"][0].endswith("pydoc_data/topics.py")
    assert ident["bytes"] > 300_000 and len(ident["sha256"]) == 64
    assert 0.03 < ident["heldout_bytes"] / ident["bytes"] < 0.07  # every 20th 4 KiB chunk
    assert load_corpus() is c  # parsed once per process
    tokens = c.tokens("train")
    assert tokens.dtype == torch.int64 and int(tokens.max()) < BYTE_VOCAB and int(tokens.min()) >= 0


def test_split_is_deterministic_disjoint_and_complete():
    data = bytes(range(256)) * 1000
    train, held = split_chunks(data, 5)
    assert len(train) + len(held) == len(data)
    assert split_chunks(data, 5) == (train, held)
    assert held == b"".join(data[i : i + 4096] for i in range(4 * 4096, len(data), 5 * 4096))


def test_user_corpus_and_its_errors(tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 2000).encode()
    path = tmp_path / "mine.txt"
    path.write_bytes(text)
    c = load_corpus(str(path))
    assert c.name == "mine.txt" and c.identity()["bytes"] == len(text)
    assert c.sha256 != load_corpus().sha256
    assert load_corpus(str(path), heldout_every=10).sha256 != c.sha256  # the split is part of the identity
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(CorpusError, match=r"corpus.path: .*small.txt.* has 9 bytes; at least 65536"):
        load_corpus(str(small))
    with pytest.raises(CorpusError, match=r"corpus.path: cannot read"):
        load_corpus(str(tmp_path / "missing.txt"))
    mid = tmp_path / "mid.txt"  # 75 KB: 19 chunks, and every 20th would be held out: none
    mid.write_bytes(text[:75_000])
    with pytest.raises(CorpusError, match=r"corpus.heldout_every: 20 .* has 19; use at most 19 or a larger file"):
        load_corpus(str(mid))
    assert load_corpus(str(mid), heldout_every=19).identity()["heldout_bytes"] == 75_000 - 18 * 4096  # the last


def test_a_held_out_split_shorter_than_one_window_is_refused_up_front(tmp_path, compose_cfg):
    """16 full chunks and 10 bytes, every 17th held out: 10 held-out bytes cannot give a 256-token quality window
    nor a 128-token prompt. Trained weights refuse it in validation, naming the field; random weights never read it."""
    from harness.config import ConfigError, validate

    path = tmp_path / "tail.txt"
    path.write_bytes(bytes(range(256)) * 256 + b"0123456789")
    spec = ["model=tiny", f"corpus.path={path}", "corpus.heldout_every=17"]
    with pytest.raises(ConfigError, match=r"^corpus\.heldout_every: the held-out split of .*tail\.txt' has 10 bytes, "
                                          r"fewer than the 256 of one window \(quality\.seq_len\); hold out more"):
        validate(compose_cfg(*spec, "model.weights=trained"))
    validate(compose_cfg(*spec, "model.weights=random"))
    with pytest.raises(ConfigError, match=r"^corpus\.heldout_every: 20 holds out every 20th 4096-byte chunk"):
        validate(compose_cfg(*spec[:2], "model.weights=trained"))  # of 17 chunks none would be held out


def test_held_out_text_is_not_repeated_in_the_training_split():
    """pydoc's topics nest (``compound`` holds ``if``, ``while``...): those inside another are dropped, so no
    256-byte stretch of held-out text also appears in the training split."""
    from harness.corpus import distinct_topics

    inner, outer, other = "x" * 400, "y" + "x" * 400 + "y", "z" * 400
    assert distinct_topics({"a": inner, "b": outer, "c": other}) == [outer, other]
    assert distinct_topics({"if": "same text", "else": "same text"}) == ["same text"]  # one copy of identical topics
    c = load_corpus()
    windows_held = [c.heldout[i : i + 256] for i in range(0, len(c.heldout) - 256, 64)]
    assert len(windows_held) > 200 and not any(w in c.train for w in windows_held)


def test_unigram_baseline_and_windows():
    c = load_corpus()
    bpb = unigram_bits_per_byte(c)
    assert 4.0 < bpb < 5.5  # English prose: about 4.5-5 bits per byte without context
    w = windows(c.tokens("heldout"), 3, 64, seed=1)
    assert w.shape == (3, 64) and torch.equal(w, windows(c.tokens("heldout"), 3, 64, seed=1))
    assert not torch.equal(w, windows(c.tokens("heldout"), 3, 64, seed=2))
