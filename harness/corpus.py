"""Text corpus and byte-level tokenizer for training, calibration and quality metrics.

The default corpus is the English documentation every CPython installation carries (``pydoc_data.topics``:
the language reference behind ``help()``, about 380 KB once topics repeated inside others are dropped), so nothing
is downloaded. ``corpus.path=FILE`` uses
the user's own text. Tokens are bytes (vocabulary 256), which makes perplexity directly bits per byte.

The split is deterministic: the text is cut into 4 KiB chunks and every ``heldout_every``-th chunk is held
out, so the held-out part samples the whole corpus rather than its last topics.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.train import random_windows

BYTE_VOCAB = 256
CHUNK = 4096
MIN_BYTES = 16 * CHUNK
SPLIT_VERSION = 1  # bump when how chunks are held out changes: the corpus hash (and what was trained on it) follows


class CorpusError(ValueError):
    """An unusable corpus file; the message names the field and the file."""


@dataclass(frozen=True)
class Corpus:
    name: str
    files: tuple[str, ...]
    train: bytes
    heldout: bytes
    sha256: str

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "files": list(self.files),
            "bytes": len(self.train) + len(self.heldout),
            "train_bytes": len(self.train),
            "heldout_bytes": len(self.heldout),
            "sha256": self.sha256,
        }

    def tokens(self, split: str) -> torch.Tensor:
        """The split as a 1-D uint8 tensor of byte ids, made once: windows and batches become int64 one at a time
        (engines.train), so a large corpus is not held eight times over."""
        return self._tokens[split]

    @functools.cached_property
    def _tokens(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            for name, data in (("train", self.train), ("heldout", self.heldout))
        }


def distinct_topics(topics: dict[str, str]) -> list[str]:
    """The topics, in name order, without those repeated inside another: pydoc's topics nest (``compound``
    holds ``if``, ``for``, ``while``...; ``if`` and ``else`` are one text), and a copy on both sides of the
    train/held-out split would make held-out perplexity partly a measure of memorised text. A topic counts as
    repeated when its middle 300 characters occur in a longer topic (or in an identical one earlier by name)."""
    items = sorted(topics.items())

    def repeated(name: str, text: str) -> bool:
        n = len(text)
        probe = text[n // 2 - 150 : n // 2 + 150] if n > 300 else text
        return any(probe in other for k, other in items if k != name and (len(other), name) > (n, k))

    return [text for name, text in items if not repeated(name, text)]


def _python_docs() -> tuple[str, tuple[str, ...], bytes]:
    import pydoc_data.topics as topics

    text = "\n\n".join(distinct_topics(topics.topics))
    return "python-docs", (str(Path(topics.__file__).resolve()),), text.encode("utf-8")


def split_chunks(data: bytes, heldout_every: int) -> tuple[bytes, bytes]:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    held = [c for i, c in enumerate(chunks) if i % heldout_every == heldout_every - 1]
    train = [c for i, c in enumerate(chunks) if i % heldout_every != heldout_every - 1]
    return b"".join(train), b"".join(held)


@functools.lru_cache(maxsize=4)
def load_corpus(path: str | None = None, heldout_every: int = 20) -> Corpus:
    """The default corpus, or the file at ``path`` (any bytes; at least 64 KiB)."""
    if heldout_every < 2:
        raise CorpusError(f"corpus.heldout_every: must be an integer >= 2, got {heldout_every}")
    if path is None:
        name, files, data = _python_docs()
    else:
        p = Path(path).expanduser()
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise CorpusError(f"corpus.path: cannot read {str(p)!r} ({exc.strerror or exc})") from None
        name, files = p.name, (str(p.resolve()),)
    if len(data) < MIN_BYTES:
        raise CorpusError(f"corpus.path: {files[0]!r} has {len(data)} bytes; at least {MIN_BYTES} are needed")
    chunks = math.ceil(len(data) / CHUNK)
    if chunks < heldout_every:  # not one chunk would be held out
        raise CorpusError(
            f"corpus.heldout_every: {heldout_every} holds out every {heldout_every}th {CHUNK}-byte chunk, and "
            f"{files[0]!r} has {chunks}; use at most {chunks} or a larger file"
        )
    train, heldout = split_chunks(data, heldout_every)
    return Corpus(name=name, files=files, train=train, heldout=heldout, sha256=corpus_sha256(data, heldout_every))


def corpus_sha256(data: bytes, heldout_every: int) -> str:
    """The corpus's identity: its bytes and how they are split (chunk size, held-out rate, split version), so a
    change of the split never reuses what was trained on text now held out. Hashed without a copy of the data."""
    h = hashlib.sha256(data)
    h.update(f"|heldout_every={heldout_every}|chunk={CHUNK}|split_version={SPLIT_VERSION}".encode())
    return h.hexdigest()


def unigram_bits_per_byte(corpus: Corpus) -> float:
    """Cross-entropy of the held-out bytes under the train split's byte frequencies (add-one smoothing):
    the baseline a model that ignores context reaches."""
    train = torch.bincount(corpus.tokens("train"), minlength=BYTE_VOCAB).double() + 1.0
    logp = torch.log2(train / train.sum())
    held = torch.bincount(corpus.tokens("heldout"), minlength=BYTE_VOCAB).double()
    return float(-(held * logp).sum() / held.sum())


def windows(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at seeded random offsets: [n, length]."""
    try:
        return random_windows(tokens, n, length, torch.Generator().manual_seed(seed))
    except ValueError as exc:
        raise CorpusError(f"corpus: {exc}") from None


def bits_per_byte(nats_per_token: float) -> float:
    return nats_per_token / math.log(2)
