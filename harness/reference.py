"""The reference model of a point and its prepared engine, kept across the points of a sweep.

Points of a sweep usually share a model and differ in engine or batch size. Building a 350M-parameter model
takes seconds and preparing an engine (quantizing, pruning, distilling) can take longer, so the last reference
and the last prepared engine are kept. Only one of each: a new shape frees the old one first, so two large
models never sit in memory together. Points timed in turns (harness.interleave) need several prepared engines
at once: ``hold`` names the variants that stay prepared until the group is done. Trained weights come from the
checkpoint cache (training on first use).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.base import PrepareContext
from engines.llama import Transformer
from harness import fidelity
from harness.config import PointSpec
from harness.corpus import load_corpus
from harness.training import ensure_trained, load_trained, resolved_train

_reference: tuple[str, Transformer] | None = None
_reference_info: dict[str, dict[str, Any]] = {}
_prepared: dict[str, nn.Module] = {}  # the last prepared engine, or the held ones
_held: set[str] = set()


def device_name(device: torch.device) -> str:
    """The device with its index resolved (``cuda`` and ``cuda:0`` are one GPU, and so one set of weights)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return str(device)


def reference_key(spec: PointSpec) -> str:
    """Identity of the reference weights: shape, weights kind, seed, device, dtype (and the training setup as it
    runs on this device: ``precision=auto`` trains in bf16 on one machine and fp32 on another)."""
    parts: list[Any] = [spec.model.name, spec.model.weights, spec.model.args.to_dict(), spec.seed]
    parts.append(device_name(spec.device))
    parts.append(str(spec.dtype))
    if spec.model.weights == "trained":
        corpus = load_corpus(spec.corpus.path, spec.corpus.heldout_every)
        parts += [corpus.sha256, asdict(resolved_train(spec.train, spec.device))]
    return json.dumps(parts, sort_keys=True, default=str)


def weights_key(spec: PointSpec, info: dict[str, Any]) -> str:
    """The name engines' own caches (calibration statistics, masks, students) give the reference weights: its
    identity and, for trained weights, the checkpoint's content (its sha256, from its sidecar; else the file's size
    and mtime), so a checkpoint trained again (``harness train --force``) is not pruned or distilled from
    statistics of the one it replaced, and a cache restored without mtimes is still hit."""
    parts: list[Any] = [reference_key(spec)]
    if sha := (info.get("training") or {}).get("sha256"):
        parts.append(sha)
    elif checkpoint := info.get("checkpoint"):
        stat = Path(checkpoint).stat()
        parts.append([stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def prepared_key(spec: PointSpec) -> str:
    """Identity of a prepared engine: the reference weights, the engine and its parameters, and the corpus when
    the engine calibrates on it (trained weights name it already; on random weights another corpus prunes other
    weights, so its engine and quality are another's)."""
    parts: list[Any] = [reference_key(spec), spec.engine.name, spec.engine.param_dict()]
    if spec.model.weights != "trained" and spec.engine.reads_corpus():
        parts.append(load_corpus(spec.corpus.path, spec.corpus.heldout_every).sha256)
    return json.dumps(parts, sort_keys=True, default=str)


def _libc_trim() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and a process's RSS would still carry a
    model it no longer holds)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _free() -> None:
    gc.collect()
    _libc_trim()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release() -> None:
    global _reference
    _reference = None
    fidelity.forget_reference()
    _prepared.clear()
    _held.clear()
    _free()


def _release_other_than(key: str) -> None:
    """Drop the reference and the prepared engines not made from reference ``key``: a point that builds this
    reference again only to measure quality (another quality config) keeps the engine it can reuse."""
    global _reference
    _reference = None
    fidelity.forget_reference()
    other = {k for k in (*_prepared, *_held) if json.loads(k)[0] != key}
    for k in other & set(_prepared):
        del _prepared[k]
    _held.difference_update(other)
    _free()


def hold(keys: set[str]) -> None:
    """Keep the engines prepared under ``keys`` (``prepared_key``) when others are prepared; drop every other."""
    _held.clear()
    _held.update(keys)
    for key in [k for k in _prepared if k not in keys]:
        del _prepared[key]
    _free()


def release_reference(keep: nn.Module | list[nn.Module]) -> None:
    """Drop the reference unless it is one of ``keep`` (an engine that is the reference itself), so that the
    timed window holds only what the engines use (peak memory is then theirs, not theirs plus a second model)."""
    global _reference
    kept = keep if isinstance(keep, list) else [keep]
    fidelity.forget_reference()  # the reference's kept quality outputs never reach a timed window
    if _reference is not None and not any(_reference[1] is m for m in kept):
        _reference = None
    _free()


def reference_model(spec: PointSpec) -> tuple[Transformer, dict[str, Any]]:
    """The point's reference model and how it was obtained (build seconds; training summary if trained)."""
    global _reference
    key = reference_key(spec)
    if _reference is not None and _reference[0] == key:
        return _reference[1], reference_info(spec)
    _release_other_than(key)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"weights": spec.model.weights}
    if spec.model.weights == "trained":
        corpus = load_corpus(spec.corpus.path, spec.corpus.heldout_every)
        ckpt, meta = ensure_trained(
            spec.model.name, spec.model.args, corpus, spec.train, spec.seed, spec.device, spec.cache_dir
        )
        model = load_trained(spec.model.args, ckpt, spec.device, spec.dtype)
        info["training"] = {k: v for k, v in meta.items() if k != "losses"}
        info["checkpoint"] = str(ckpt)
    else:
        model = Transformer.build(spec.model.args, device=spec.device, dtype=spec.dtype, seed=spec.seed)
    _reference = (key, model)
    _reference_info[key] = info
    return model, {**info, "build_s": time.perf_counter() - t0, "cached": False}


def reference_info(spec: PointSpec) -> dict[str, Any]:
    """How the reference was obtained when it was last built in this process (nothing is built now)."""
    return {**_reference_info.get(reference_key(spec), {"weights": spec.model.weights}), "build_s": 0.0, "cached": True}


def cached_prepared(spec: PointSpec) -> nn.Module | None:
    """The prepared engine of the previous point (or a held one) when it had the same reference and variant."""
    return _prepared.get(prepared_key(spec))


def prepare(spec: PointSpec, model: nn.Module, ctx: PrepareContext) -> tuple[nn.Module, float]:
    """``spec.engine.prepare(model, ctx)``, kept for the next points of the same variant."""
    for key in [k for k in _prepared if k not in _held]:
        del _prepared[key]
    _free()
    t0 = time.perf_counter()
    prepared = spec.engine.prepare(model, ctx)
    _prepared[prepared_key(spec)] = prepared
    return prepared, time.perf_counter() - t0
