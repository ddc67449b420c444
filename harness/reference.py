"""The reference model of a point, built once per process and reused by the next points of a sweep.

Points of a sweep usually share a model and differ in engine or batch size; building a 350M-parameter model
takes seconds, so the last one is kept. Only one is kept: a new shape frees the old one first, so two large
models never sit in memory together.
"""

from __future__ import annotations

import gc
import json
import time

import torch

from engines.llama import Transformer
from harness.config import PointSpec

_cached: tuple[str, Transformer] | None = None


def _key(spec: PointSpec) -> str:
    return json.dumps(
        [spec.model.name, spec.model.weights, spec.model.args.to_dict(), spec.seed, str(spec.device), str(spec.dtype)],
        sort_keys=True,
    )


def release() -> None:
    global _cached
    _cached = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reference_model(spec: PointSpec) -> tuple[Transformer, float]:
    """The point's reference model and the seconds spent building it (0 when it came from the cache)."""
    global _cached
    key = _key(spec)
    if _cached is not None and _cached[0] == key:
        return _cached[1], 0.0
    release()
    t0 = time.perf_counter()
    model = Transformer.build(spec.model.args, device=spec.device, dtype=spec.dtype, seed=spec.seed)
    _cached = (key, model)
    return model, time.perf_counter() - t0
