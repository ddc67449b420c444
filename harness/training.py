"""Reference training: the embedded quality baseline, trained once and cached.

The checkpoint (safetensors) is keyed by the model shape, the corpus hash, the training config, the seed, the
device type and TRAIN_VERSION, so a change to any of them trains anew and an unchanged setup loads in
milliseconds. A file lock keeps two processes of one sweep from training the same checkpoint twice; the file is
written atomically, and a cached one whose tensors no longer fit the model (or whose hash is wrong) is trained
again. Training pauses the point's deadline (engines.cache.building): it is done once for the whole sweep.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from engines.cache import building, cache_key, cached, file_lock, load_weights, save_weights
from engines.llama import ModelArgs, Transformer
from engines.train import TrainConfig, fit, heldout_nll, resolve_precision
from harness.corpus import Corpus, bits_per_byte, unigram_bits_per_byte
from harness.progress import format_duration

log = logging.getLogger(__name__)


# bump when what training computes changes (fit, lm_loss, the model's math under the same tensor names): older
# checkpoints are then never read
TRAIN_VERSION = 1
EVAL_LEN = 256  # the held-out evaluation's window (engines.train.heldout_nll), capped by model.max_seq_len


def checkpoint_key(args: ModelArgs, corpus: Corpus, cfg: TrainConfig, seed: int, device_type: str) -> str:
    """The checkpoint's cache key. ``max_seq_len`` is left out (it sizes the rotary table, not the trained weights),
    except as the held-out evaluation's window it caps (the summary's bits per byte)."""
    shape = {k: v for k, v in args.to_dict().items() if k != "max_seq_len"}
    return cache_key({"args": shape, "corpus": corpus.sha256, "train": asdict(cfg), "seed": seed, "dev": device_type,
                      "eval_len": min(EVAL_LEN, args.max_seq_len), "version": TRAIN_VERSION})  # fmt: skip


def resolved_train(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """The training config as it runs on ``device`` (``precision=auto`` becomes fp32 or bf16): the checkpoint's
    key and a point's identity both name trained weights by it."""
    return replace(cfg, precision=resolve_precision(cfg.precision, device))


def _progress_logger(cfg: TrainConfig, every: int):
    t0 = time.perf_counter()

    def on_step(step: int, loss: float, lr: float, rate: float) -> None:
        if step % every and step != cfg.steps:
            return
        elapsed = time.perf_counter() - t0
        eta = elapsed / step * (cfg.steps - step)
        log.info(
            "train step %d/%d  loss %.3f (%.2f bits/byte)  lr %.2e  %.0f tok/s  ETA %s",
            step, cfg.steps, loss, bits_per_byte(loss), lr, rate, format_duration(eta),
        )  # fmt: skip

    return on_step


def train_reference(
    name: str, args: ModelArgs, corpus: Corpus, cfg: TrainConfig, seed: int, device: torch.device
) -> tuple[Transformer, dict[str, Any]]:
    """Train a fresh reference model on the corpus; returns it with the training summary."""
    if args.vocab_size < 256:
        raise ValueError(f"model.vocab_size: a byte-level corpus needs at least 256 tokens, got {args.vocab_size}")
    model = Transformer.build(args, device=device, dtype=torch.float32, seed=seed)
    unigram = unigram_bits_per_byte(corpus)
    init_bpb = bits_per_byte(heldout_nll(model, corpus.tokens("heldout"), EVAL_LEN))
    log.info("training %s (%.2fM params) on %s: %d steps of %dx%d tokens, %s", name, args.num_params() / 1e6,
             corpus.name, cfg.steps, cfg.batch_size, cfg.seq_len, resolve_precision(cfg.precision, device))  # fmt: skip
    t0 = time.perf_counter()
    losses = fit(model, corpus.tokens("train"), cfg, on_step=_progress_logger(cfg, every=max(cfg.steps // 10, 1)))
    seconds = time.perf_counter() - t0
    heldout = bits_per_byte(heldout_nll(model, corpus.tokens("heldout"), EVAL_LEN))
    info = {
        "model": name,
        "steps": cfg.steps,
        "train": asdict(cfg),
        "seconds": seconds,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_train_loss": losses[-1] if losses else math.nan,
        "losses": losses,
        "heldout_bits_per_byte": heldout,
        "init_heldout_bits_per_byte": init_bpb,
        "unigram_bits_per_byte": unigram,
        "corpus": corpus.identity(),
        "seed": seed,
        "device": device.type,
    }
    log.info("trained in %s: held-out %.3f bits/byte (unigram baseline %.3f, untrained %.3f)",
             format_duration(seconds), heldout, unigram, init_bpb)  # fmt: skip
    return model, info


def ensure_trained(
    name: str,
    args: ModelArgs,
    corpus: Corpus,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    cache_dir: Path,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Path of the cached checkpoint and its training summary, training it first when missing."""
    cfg = resolved_train(cfg, device)
    key = checkpoint_key(args, corpus, cfg, seed, device.type)
    ckpt = Path(cache_dir) / "checkpoints" / f"{name}-{key}.safetensors"
    with file_lock(ckpt.with_suffix(".lock")):
        if not force and cached(ckpt, layout(args)):
            return ckpt, {**json.loads(ckpt.with_suffix(".json").read_text()), "cached": True}
        if cfg.warmup_steps >= cfg.steps:  # allowed (a schedule under test), but rarely what was meant
            log.warning("train.warmup_steps=%d is not below train.steps=%d: the learning rate never reaches "
                        "train.lr=%g", cfg.warmup_steps, cfg.steps, cfg.lr)  # fmt: skip
        with building() as build:
            model, info = train_reference(name, args, corpus, cfg, seed, device)
            info["key"] = key
            # as the sidecar holds it: the reference's name in engines' caches (``reference.weights_key``) is then
            # the same in this process as in every later one, which reads it from there
            info["sha256"] = save_weights(model, ckpt, info)
        log.info("checkpoint: %s (built in %s)", ckpt, format_duration(build.seconds))
    return ckpt, {**info, "build_s": build.seconds, "cached": False}


def layout(args: ModelArgs) -> Transformer:
    """The model's tensors (names and shapes, tied ones shared) without memory: what a cached checkpoint must hold."""
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def load_trained(args: ModelArgs, ckpt: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    model = Transformer.build(args, device=device, dtype=torch.float32, seed=0)
    load_weights(model, ckpt, str(device))
    return model.to(dtype).eval()
