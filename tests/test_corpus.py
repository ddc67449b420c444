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
    assert tokens.dtype == torch.uint8 and int(tokens.max()) < BYTE_VOCAB and tokens.numel() == len(c.train)
    assert c.tokens("train") is tokens  # made once: a large corpus is not copied (eight times over) per use
    assert windows(tokens, 2, 16, seed=0).dtype == torch.int64  # only windows are widened


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
    with pytest.raises(ConfigError, match=r"^corpus\.heldout_every: the held-out split of .*tail\.txt' has 10 bytes; "
                                          r"a window of 256 \(.*\) needs at least 257 \(it and the next token\); hold "
                                          r"out more"):
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


def _tail_corpus(tmp_path, tail: int) -> str:
    """16 full chunks and a ``tail``-byte 17th: with corpus.heldout_every=17 the held-out split is the tail."""
    path = tmp_path / f"tail{tail}.txt"
    path.write_bytes(bytes(range(256)) * 256 + b"x" * tail)
    return str(path)


def test_every_reader_of_the_held_out_split_needs_a_window_and_one_more_token(tmp_path, compose_cfg):
    """A window of L tokens needs L + 1 held-out bytes (its next token is a target): a held-out split of exactly
    quality.seq_len bytes is refused, one more byte passes; training's own held-out evaluation (256 tokens, at most
    model.max_seq_len) counts too; train.seq_len is checked against the train split, not the held-out one."""
    from harness.config import ConfigError, validate

    base = ["model=tiny", "model.weights=trained", "corpus.heldout_every=17", "workload.prompt_len=64"]
    at = [*base, f"corpus.path={_tail_corpus(tmp_path, 300)}"]
    with pytest.raises(ConfigError, match=r"^corpus\.heldout_every: .* has 300 bytes; a window of 300 "
                                          r"\(quality\.seq_len\) needs at least 301"):
        validate(compose_cfg(*at, "quality.seq_len=300"))
    assert validate(compose_cfg(*at, "quality.seq_len=299")).quality.seq_len == 299
    # a held-out split shorter than one window of training's evaluation (not read by prompts nor quality here)
    short = [*base, f"corpus.path={_tail_corpus(tmp_path, 200)}", "quality.seq_len=128"]
    evaluation = r"\(the held-out evaluation of training, min\(256, model\.max_seq_len\)\)"
    with pytest.raises(ConfigError, match=rf"^corpus\.heldout_every: .* has 200 bytes; a window of 256 {evaluation} "
                                          r"needs at least 257"):
        validate(compose_cfg(*short))
    assert validate(compose_cfg(*short, "model.max_seq_len=192")).model.args.max_seq_len == 192  # 192 + 1 <= 200
    # train.seq_len longer than the held-out split: fine, training reads the train split
    assert validate(compose_cfg(*at, "train.seq_len=1000")).train.seq_len == 1000
    # ... which must hold one training window (train.seq_len + 1 tokens) and more: every 2nd chunk of 17 held out
    half = ["model=tiny", "model.weights=trained", "corpus.heldout_every=2", f"corpus.path={_tail_corpus(tmp_path, 1)}",
            "model.max_seq_len=40000"]  # fmt: skip
    train_bytes = 8 * 4096 + 1  # chunks 0, 2, ... 16 (the 1-byte tail)
    with pytest.raises(ConfigError, match=rf"^train\.seq_len: {train_bytes - 1} needs a train split of at least "
                                          rf"{train_bytes + 1} bytes, and that of .* has {train_bytes}; allowed: "
                                          rf"1\.\.{train_bytes - 2}, or give a larger file$"):
        validate(compose_cfg(*half, f"train.seq_len={train_bytes - 1}"))
    assert validate(compose_cfg(*half, f"train.seq_len={train_bytes - 2}")).train.seq_len == train_bytes - 2


def test_harness_train_checks_the_held_out_split_whatever_model_weights_says(run_harness, capsys, tmp_path):
    path = _tail_corpus(tmp_path, 200)
    for weights in ("random", "trained"):
        code = run_harness("train", "model=tiny", f"model.weights={weights}", f"corpus.path={path}",
                           "corpus.heldout_every=17", f"cache_dir={tmp_path}/cache")  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("harness train: error: corpus.heldout_every: ") and "needs at least 257" in err[0]
    assert not (tmp_path / "cache" / "checkpoints").exists()  # refused before any training


def test_the_corpus_hash_names_how_it_is_split(monkeypatch):
    """A change of chunk size or of the split algorithm (SPLIT_VERSION) is another corpus: what was trained on
    text now held out is never reused."""
    import hashlib

    import harness.corpus as corpus

    data = b"some text " * 100
    base = corpus.corpus_sha256(data, 20)
    assert base == hashlib.sha256(data + b"|heldout_every=20|chunk=4096|split_version=1").hexdigest()
    assert corpus.corpus_sha256(data, 10) != base
    monkeypatch.setattr(corpus, "SPLIT_VERSION", corpus.SPLIT_VERSION + 1)
    assert corpus.corpus_sha256(data, 20) != base
    monkeypatch.undo()
    monkeypatch.setattr(corpus, "CHUNK", 2048)
    assert corpus.corpus_sha256(data, 20) != base
