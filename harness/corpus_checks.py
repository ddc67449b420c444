"""Whether the corpus's splits hold what a run reads from them, checked before any work (one line naming the field).

Trained weights read their prompts, quality windows and the training's held-out evaluation from the held-out split,
and their training windows from the train split. Every reader draws windows of L tokens with at least one token
after them (engines.train: ``random_windows``, ``heldout_nll``), so a split must hold more than L bytes.
"""

from __future__ import annotations

from engines.train import TrainConfig
from harness.config import ConfigError, CorpusSpec, ModelSpec, QualitySpec, Workload
from harness.corpus import Corpus, CorpusError, load_corpus
from harness.training import EVAL_LEN


def check_train_fits(model: ModelSpec, train: TrainConfig) -> None:
    """Training windows of ``train.seq_len`` tokens must fit the model's context (its rotary table and mask)."""
    limit = model.args.max_seq_len
    if train.seq_len > limit:
        raise ConfigError(
            f"train.seq_len: {train.seq_len} exceeds model.max_seq_len={limit} of model {model.name!r}; "
            f"allowed: 1..{limit}"
        )


def heldout_needs(model: ModelSpec, quality: QualitySpec | None, workload: Workload | None) -> list[tuple[str, int]]:
    """(what reads it, window length) for each reader of the held-out split; training's own evaluation always."""
    eval_len = min(EVAL_LEN, model.args.max_seq_len)
    needs = [(f"the held-out evaluation of training, min({EVAL_LEN}, model.max_seq_len)", eval_len)]
    if workload is not None:
        needs.append(("workload.prompt_len", workload.prompt_len))
    if quality is not None and quality.enabled:
        needs += [("quality.seq_len", quality.seq_len), ("quality.greedy_prompt_len", quality.greedy_prompt_len)]
    return needs


def check_corpus_fits(
    model: ModelSpec,
    corpus: CorpusSpec,
    train: TrainConfig,
    quality: QualitySpec | None = None,
    workload: Workload | None = None,
) -> None:
    """Refuse up front splits too short for a run of trained weights (``quality``, ``workload`` given) or for
    training alone (`harness train`, whatever model.weights says), not a point that fails once its model is built."""
    check_train_fits(model, train)
    try:
        c = load_corpus(corpus.path, corpus.heldout_every)
    except CorpusError as exc:
        raise ConfigError(str(exc)) from None
    _check_train_split(c, train)
    field, length = max(heldout_needs(model, quality, workload), key=lambda fn: fn[1])
    have = len(c.heldout)
    if have <= length:
        raise ConfigError(
            f"corpus.heldout_every: the held-out split of {c.files[0]!r} has {have} bytes; a window of {length} "
            f"({field}) needs at least {length + 1} (it and the next token); hold out more (a smaller "
            "corpus.heldout_every) or give a larger file"
        )


def check_corpus_loads(corpus: CorpusSpec) -> None:
    """The corpus a point of random weights names (calibration and quality read it) is readable and large
    enough: refused before any work, not by every point of a sweep at set-up."""
    try:
        load_corpus(corpus.path, corpus.heldout_every)
    except CorpusError as exc:
        raise ConfigError(str(exc)) from None


def _check_train_split(c: Corpus, train: TrainConfig) -> None:
    window, have = train.seq_len + 1, len(c.train)  # inputs and their shifted targets
    if have <= window:
        raise ConfigError(
            f"train.seq_len: {train.seq_len} needs a train split of at least {window + 1} bytes, and that of "
            f"{c.files[0]!r} has {have}; allowed: 1..{have - 2}, or give a larger file"
        )
