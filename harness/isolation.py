"""Keeping one bad point from costing the rest: deadlines, and points run in their own process.

* ``deadline(seconds)`` interrupts a point that runs too long in this process (SIGALRM; work inside one
  long C call is interrupted when it returns to Python). Building a shared cache entry (reference training, a
  distilled student) pauses it (``deadline_paused``): that work is done once for every point that needs it, and
  cut off it would start again from scratch in each of them.
* ``run_isolated(...)`` runs the point in a fresh child process (spawned, so CUDA state is never inherited).
  The parent waits at most the deadline (counted from the child's start-up, itself limited to
  STARTUP_LIMIT_S, and not counting the cache entries the child builds), kills the child when it is exceeded,
  and writes the record itself when the child could not: killed by a signal (kill -9, the kernel's
  out-of-memory killer, a segfault), exited abnormally, left an unreadable record, did not start, or timed
  out. This works under every Hydra launcher, in-process or not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.cache import set_build_pause
from harness.config import PointSpec, validate
from harness.records import RECORD_NAME, RecordError, read_record, write_record

log = logging.getLogger(__name__)


class PointTimeout(BaseException):
    """Raised in the point's thread when its deadline passes. A BaseException so that an engine's own
    ``except Exception`` cannot swallow it."""


# A deadline that falls inside an ``import`` waits for it: interrupted, the module is dropped while the
# submodules it had finished stay in sys.modules, unbound to the package imported again later, and every later
# point of the process fails ("module 'sympy.core' has no attribute 'symbol'"). Up to this long past the deadline.
IMPORT_GRACE_S = 60.0
IMPORT_RETRY_S = 0.05


def _in_import(frame: Any) -> bool:
    """Whether ``frame`` or a caller of it runs import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_pause = {"depth": 0, "total_s": 0.0}  # open deadline_paused blocks, and the seconds they lasted in this process


def paused_s() -> float:
    """Seconds deadlines were paused in this process so far (cache entries built): a point's share is the
    difference across it."""
    return float(_pause["total_s"])


@contextmanager
def deadline_paused() -> Iterator[None]:
    """Stop the running deadline's timer while a shared cache entry is built, and re-arm it with what was left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    left = 0.0
    if not _pause["depth"]:
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        if left:
            signal.setitimer(signal.ITIMER_REAL, 0)
    _pause["depth"] += 1
    t0 = time.monotonic()
    try:
        yield
    finally:
        _pause["depth"] -= 1
        if not _pause["depth"]:
            _pause["total_s"] += time.monotonic() - t0
            if left:
                signal.setitimer(signal.ITIMER_REAL, left)


set_build_pause(deadline_paused)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise PointTimeout in this (main) thread after ``seconds`` (not counting ``deadline_paused`` blocks); no
    limit when None or not the main thread."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def elapsed() -> float:
        return time.monotonic() - started - (paused_s() - paused_before)

    def expire(signum: int, frame: Any) -> None:
        late = elapsed() - seconds
        if late < IMPORT_GRACE_S and _in_import(frame):  # let the import finish: a half-run module stays broken
            signal.setitimer(signal.ITIMER_REAL, IMPORT_RETRY_S)
            return
        raise PointTimeout(f"point exceeded measure.timeout_s={seconds:g} s")

    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)  # a deadline around this one (0: none)
    started, paused_before = time.monotonic(), paused_s()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
            if outer_left:  # re-arm the outer deadline with what is left of it (at least a moment: it is due)
                signal.setitimer(signal.ITIMER_REAL, max(outer_left - elapsed(), 1e-3))


STARTUP_LIMIT_S = 600.0  # a child that has not even imported its modules by then is counted as hung


@contextmanager
def _shared_pause(shared: Any) -> Iterator[None]:
    """deadline_paused in an isolated child, told to the parent that keeps its deadline: ``shared`` holds the
    builds open now and the seconds they took."""
    with shared.get_lock():
        shared[0] += 1
    t0 = time.monotonic()
    try:
        with deadline_paused():
            yield
    finally:
        with shared.get_lock():
            shared[0] -= 1
            shared[1] += time.monotonic() - t0


def wait_for(child: Any, timeout_s: float | None, shared: Any) -> bool:
    """Wait for ``child`` at most ``timeout_s`` of its own time, not counting the cache entries it builds (never
    killed while it builds one); returns whether it ran past that."""
    if not timeout_s:
        child.join()
        return False
    start = time.monotonic()
    while child.is_alive():
        left = start + timeout_s + shared[1] - time.monotonic()
        if left <= 0 and not shared[0]:
            return True
        child.join(min(max(left, 0.0), 0.5) or 0.5)
    return False


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _end_with_parent(parent_pid: int) -> None:
    """Be sent SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere) and take it as an
    interruption: a parent killed by a CI timeout or ``docker stop`` must not leave its child measuring past
    the deadline only the parent keeps. The parent may have died before the request: checked after it."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _child(
    cfg: dict[str, Any], out_dir: str, sweep: dict[str, Any], log_level: int, ready: Any, shared: Any,
    parent_pid: int,
) -> None:
    """Entry point of the isolated process: validate again (nothing but plain data crosses) and run. An
    interruption (Ctrl-C reaches the whole process group; SIGTERM, the parent's death) is recorded by the point
    itself and ends the child with 130, without multiprocessing's traceback."""
    logging.basicConfig(level=log_level, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    try:
        _end_with_parent(parent_pid)
        from harness.point import run_point

        set_build_pause(lambda: _shared_pause(shared))
        spec = validate(cfg)
        ready.set()  # the deadline counts from here: interpreter start-up and imports are not the point's time
        run_point(spec, Path(out_dir), sweep, timeout_s=None)
    except KeyboardInterrupt:
        sys.exit(130)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode)
        hint = " (kill -9, or the kernel's out-of-memory killer)" if sig == signal.SIGKILL else ""
        return f"the point's process was killed by signal {sig.name} ({-exitcode}){hint}"
    return f"the point's process exited with code {exitcode} without writing its record"


def run_isolated(spec: PointSpec, out_dir: Path, sweep: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Run the point in a child process and return its record (written by the child, or here if it died)."""
    from harness.env import fingerprint
    from harness.point import apply_process_settings, identity
    from harness.records import point_key

    record_path = Path(out_dir) / RECORD_NAME
    record_path.unlink(missing_ok=True)  # a previous attempt's record must not pass for this one's
    ctx = mp.get_context("spawn")
    started = time.time()
    ready, shared = ctx.Event(), ctx.Array("d", 2)  # shared: builds open in the child, seconds they took
    level = logging.getLogger().getEffectiveLevel()
    args = (spec.cfg, str(out_dir), sweep, level, ready, shared, os.getpid())
    child = ctx.Process(target=_child, args=args, daemon=False)
    child.start()
    startup_end = started + STARTUP_LIMIT_S
    while child.is_alive() and not ready.is_set() and time.time() < startup_end:
        ready.wait(min(1.0, max(startup_end - time.time(), 0.0)))
    startup_s = time.time() - started if ready.is_set() else None
    stuck = child.is_alive() and not ready.is_set()  # still starting up: the deadline never began
    if not stuck:
        wait_for(child, timeout_s, shared)
    timed_out = child.is_alive()
    if timed_out:
        child.kill()
        child.join()
    unreadable = None
    if not timed_out and record_path.exists():
        try:
            return read_record(record_path)
        except RecordError as exc:  # written atomically, so only something else could have left this
            log.warning("%s", exc)
            unreadable = exc
    status = "timeout" if timed_out and not stuck else "failed"
    if stuck:
        error = (f"the point's process did not start within {STARTUP_LIMIT_S:g} s (interpreter start-up, imports, "
                 "config validation; its process was killed)")  # fmt: skip
    elif timed_out:
        error = f"point exceeded measure.timeout_s={timeout_s:g} s (its process was killed)"
    elif unreadable is not None:
        error = f"the point's process exited with code {child.exitcode}; its record is unreadable: {unreadable}"
    else:
        error = _death(child.exitcode)
    ident = identity(spec)
    apply_process_settings(spec)  # the fingerprint counts torch's threads: the child's, as its own record would have
    record = {
        "status": status,
        "error": error,
        "point_key": point_key(ident),
        "identity": ident,
        "config": spec.cfg,
        "env": fingerprint(spec.device),
        "sweep": sweep,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "duration_s": time.time() - started,
        "isolation": {
            "process_exitcode": child.exitcode,
            "timed_out": timed_out and not stuck,
            "startup_hung": stuck,
            "startup_s": startup_s,  # spawn to ready: what the deadline does not count
        },
    }
    write_record(out_dir, record)
    return read_record(record_path)
