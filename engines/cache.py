"""On-disk caching of prepared weights: a lock per entry and atomic writes.

Several processes of one sweep (joblib, SLURM array) may ask for the same trained checkpoint or student at
once; the lock makes one of them build it while the others wait and then load it. Files are written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

log = logging.getLogger(__name__)


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
    """Whether the cache entry at ``path`` (safetensors and its JSON sidecar) is there and reads. One that does not
    (a file cut short by a full disk or a killed copy, or overwritten) is removed with a warning naming it, so the
    caller builds it again instead of failing on it in every later run. Call it under the entry's lock."""
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:  # the header, checked against the file's size
            f.keys()
        json.loads(sidecar.read_text())
        return True
    except Exception as exc:  # SafetensorError, OSError, ValueError: whatever the damage, the entry is rebuilt
        log.warning("cache entry %s cannot be read (%s): removed, it is built again", path, " ".join(str(exc).split()))
        path.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        return False
