"""On-disk caching of prepared weights: a lock per entry, atomic writes, and hits that are checked.

Several processes of one sweep (joblib, SLURM array) may ask for the same trained checkpoint or student at
once; the lock makes one of them build it while the others wait and then load it. Files are written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind (nor its temporary file).
A hit must be usable: its sidecar holds the file's sha256 (checked at the first load in a process) and, given the
model it loads into, its tensor names and shapes must be the model's. An entry that fails either is rebuilt; one
that cannot be read at all (permissions, I/O) is left alone and the error names it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

log = logging.getLogger(__name__)


class CacheUnreadable(OSError):
    """A cache entry that is there but cannot be read (permissions, I/O): not removed, since the file is likely
    fine for its owner; the message is one line naming the file."""


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


# What pauses a caller's deadline while an entry is built (harness.isolation installs its own): an entry is built
# once for every point that needs it, so its time is none of theirs.
_pause: Callable[[], AbstractContextManager[Any]] = nullcontext


def set_build_pause(pause: Callable[[], AbstractContextManager[Any]]) -> None:
    global _pause
    _pause = pause


class Build:
    """How long building a cache entry took (``seconds``, set when the ``building`` block ends)."""

    seconds: float = 0.0


@contextmanager
def building() -> Iterator[Build]:
    """Around the build of a cache entry, under its lock: deadlines are paused, and the time is measured."""
    build, t0 = Build(), time.perf_counter()
    try:
        with _pause():
            yield build
    finally:
        build.seconds = time.perf_counter() - t0


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it over ``path``. The temporary file is
    removed on any failure (a full disk, a deadline, Ctrl-C), and the result gets the umask's permissions:
    safetensors creates its files owner-only, and a cache shared by a team must be readable by the team."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o666 & ~_umask())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_entry(path: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> str:
    """A cache entry: the file (``write(tmp)``) and its JSON sidecar, which holds ``meta`` and the file's sha256
    (returned: the writer then names the entry as a later reader of the sidecar does)."""
    atomic_write(path, write)
    sha = file_sha256(path)
    _verified[str(path)] = (_stat(path), sha)
    text = json.dumps({**meta, "sha256": sha}, indent=1, default=str)
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    return sha


def save_weights(model: nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Weights as safetensors (tied tensors stored once) plus a JSON sidecar, each written atomically; their
    sha256."""
    return write_entry(path, lambda tmp: save_model(model, str(tmp), metadata={"key": str(meta.get("key", ""))}), meta)


def load_weights(model: nn.Module, path: Path, device: str) -> dict[str, Any]:
    """Load weights saved by ``save_weights`` into ``model``; returns the sidecar metadata."""
    load_model(model, str(path), strict=True, device=device)
    return json.loads(path.with_suffix(".json").read_text())


def layout_mismatch(path: Path, model: nn.Module) -> str | None:
    """Why the tensors in ``path`` cannot load into ``model`` (a name missing, unexpected or of another shape), or
    None. Tied tensors count once, as ``save_model`` stores them; a model on the meta device serves."""
    state = model.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for name, shape in shapes.items():
        if name not in state:
            return f"unexpected tensor {name}"
        if tuple(state[name].shape) != shape:
            return f"{name} has shape {list(shape)}, the model {list(state[name].shape)}"
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in shapes for n in names)]
    if not missing:
        return None
    return f"missing tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")


_verified: dict[str, tuple[tuple[int, int], str]] = {}  # path -> (size, mtime) and sha256 checked in this process


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _content_error(path: Path, meta: Any, model: nn.Module | None) -> str | None:
    """Why the entry's content is unusable (header, hash, layout), or None; OSErrors propagate."""
    if not isinstance(meta, dict):
        return "its sidecar is not a JSON object"
    with open(path, "rb"):  # permissions and I/O surface here as OSError, not as a header error
        pass
    with safe_open(str(path), framework="pt") as f:  # the header, checked against the file's size
        f.keys()
    if model is not None and (why := layout_mismatch(path, model)):  # cheap, from the header: before the hash
        return why
    sha = meta.get("sha256")  # entries written before hashes were stored have none: header and layout checks only
    if sha and _verified.get(str(path)) != (_stat(path), sha):
        actual = file_sha256(path)
        if actual != sha:
            return f"its sha256 {actual[:12]}... is not the {sha[:12]}... its sidecar recorded"
        _verified[str(path)] = (_stat(path), sha)
    return None


def cached(path: Path, model: nn.Module | None = None) -> bool:
    """Whether the cache entry at ``path`` (safetensors and its JSON sidecar) is there and usable: it reads, its
    content hash is the one recorded, and (given ``model``) its tensors are the model's. One that is not (a file cut
    short by a full disk or a killed copy, bit rot, a layout from older code) is removed with a one-line warning
    naming it, so the caller builds it again instead of failing on it in every later run. One that cannot be read
    (permissions, I/O) raises CacheUnreadable and stays. Call it under the entry's lock."""
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return False
    try:
        why = _content_error(path, json.loads(sidecar.read_text()), model)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        why = f"it cannot be read ({' '.join(str(exc).split())})"
    except OSError as exc:
        raise CacheUnreadable(
            f"cache entry {path} cannot be read ({exc.__class__.__name__}: {exc.strerror or exc}): "
            "left in place; fix its permissions, remove it, or use another cache_dir"
        ) from None
    if why is None:
        return True
    log.warning("cache entry %s is unusable (%s): removed, it is built again", path, why)
    path.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    _verified.pop(str(path), None)
    return False
