"""Checks that a command replaced its output file atomically (renamed over it) rather than rewriting it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def old_file(out: Path, keep: Path) -> Path:
    """An old ``out`` (text "old"), hard-linked at ``keep`` as a reader that opened it sees it, and another
    writer's temp file beside it under the fixed name older code used."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("old")
    os.link(out, keep)
    (out.parent / f".{out.name}.tmp").write_text("another writer's")
    return keep


def replaced_not_rewritten(out: Path, before: Path) -> None:
    """``out`` was renamed over (a reader holding the old file still reads it whole), the temp file is gone,
    another writer's temp file beside it was left alone, and the new file has the permissions any file written
    here gets (a report or export is for others to read, not private to its writer as a mkstemp file is)."""
    assert before.read_text() == "old" and out.read_bytes() != b"old"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, f".{out.name}.tmp"])
    assert (out.parent / f".{out.name}.tmp").read_text() == "another writer's"
