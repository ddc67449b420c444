"""On-disk caching of prepared weights: a lock per entry and atomic writes.

Several processes of one sweep (joblib, SLURM array) may ask for the same trained checkpoint or student at
once; the lock makes one of them build it while the others wait and then load it. Files are written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn


def cache_key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Weights as safetensors (tied tensors stored once) plus a JSON sidecar, each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp), metadata={"key": str(meta.get("key", ""))})
    os.replace(tmp, path)
    _atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, default=str))


def load_weights(model: nn.Module, path: Path, device: str) -> dict[str, Any]:
    """Load weights saved by ``save_weights`` into ``model``; returns the sidecar metadata."""
    load_model(model, str(path), strict=True, device=device)
    return json.loads(path.with_suffix(".json").read_text())


def cached(path: Path) -> bool:
    return path.exists() and path.with_suffix(".json").exists()
