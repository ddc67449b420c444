"""The reference model of a point and its prepared engine, kept across the points of a sweep.

Points of a sweep usually share a model and differ in engine or batch size. Building a 350M-parameter model
takes seconds and preparing an engine (quantizing, pruning, distilling) can take longer, so the last reference
and the last prepared engine are kept. Only one of each: a new shape frees the old one first, so two large
models never sit in memory together. Trained weights come from the checkpoint cache (training on first use).
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import torch
from torch import nn

from engines.base import PrepareContext
from engines.llama import Transformer
from harness.config import PointSpec
from harness.corpus import load_corpus
from harness.training import ensure_trained, load_trained

_reference: tuple[str, Transformer, dict[str, Any]] | None = None
_prepared: tuple[str, nn.Module] | None = None


def reference_key(spec: PointSpec) -> str:
    """Identity of the reference weights: shape, weights kind, seed, device, dtype (and training setup)."""
    parts: list[Any] = [spec.model.name, spec.model.weights, spec.model.args.to_dict(), spec.seed, str(spec.device)]
    parts.append(str(spec.dtype))
    if spec.model.weights == "trained":
        parts += [spec.corpus.path, spec.corpus.heldout_every, spec.train.__dict__]
    return json.dumps(parts, sort_keys=True, default=str)


def release() -> None:
    global _reference, _prepared
    _reference = _prepared = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reference_model(spec: PointSpec) -> tuple[Transformer, dict[str, Any]]:
    """The point's reference model and how it was obtained (build seconds; training summary if trained)."""
    global _reference
    key = reference_key(spec)
    if _reference is not None and _reference[0] == key:
        return _reference[1], {**_reference[2], "build_s": 0.0, "cached": True}
    release()
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
    info["build_s"] = time.perf_counter() - t0
    _reference = (key, model, info)
    return model, {**info, "cached": False}


def prepared_model(spec: PointSpec, model: nn.Module, ctx: PrepareContext) -> tuple[nn.Module, float]:
    """``spec.engine.prepare(model, ctx)``, reused while the reference and the variant stay the same."""
    global _prepared
    key = json.dumps([reference_key(spec), spec.engine.name, spec.engine.param_dict()], sort_keys=True, default=str)
    if _prepared is not None and _prepared[0] == key:
        return _prepared[1], 0.0
    _prepared = None
    gc.collect()
    t0 = time.perf_counter()
    prepared = spec.engine.prepare(model, ctx)
    _prepared = (key, prepared)
    return prepared, time.perf_counter() - t0
