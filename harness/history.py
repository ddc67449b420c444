"""History of sweeps: a SQLite database (stdlib ``sqlite3``) that the dashboard and step detection read.

Each sweep is stored under an id that hashes the content of its records (so adding the same sweep twice, from
wherever it was copied, changes nothing), with the git SHA of the measured code, its start time and its
environment fingerprint. Each record is stored once: a later state of a stored sweep (resumed with
``resume=true``, which rewrites its failed records and its ``sweep.json``) supersedes it, where the two share a
record (the same measurement, from wherever it was copied) or, for a resumed sweep that rewrote every record, it
is the newest sweep stored from the same directory before it that it really resumes: a true resume keeps the
first run's ``started_at`` in ``sweep.json`` and adds ``resumed_at``, or the two measured the same git commit.
A sweep of another commit is never replaced (CI measures one folder afresh for each commit, with ``resume=true``
as a harmless default). The points of the stored one that the new one holds again are replaced, its others kept.
A folder holding sweeps (``sweep.json`` below it, none of its own) is refused, naming the sweeps to add one by one.

Every record is kept whole (compressed), raw samples included, beside its table row
(``harness.records.flatten``). One transaction per sweep: a sweep is stored completely or not at all, and a
missing, empty, corrupted or partial sweep directory is refused with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from harness.progress import SWEEP_META, missing_points, read_sweep_meta
from harness.records import RecordError, find_records, flatten, read_record, table

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_DB = Path("results") / "history.sqlite"
REPORT_NAME = "report.html"
GATE_NAME = "gate.json"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sweeps (
  id TEXT PRIMARY KEY,          -- hash of the content of the sweep's records
  git_sha TEXT,                 -- the measured code (NULL: not a git checkout)
  git_dirty INTEGER,
  started_at TEXT NOT NULL,     -- ISO-8601 UTC
  fingerprint TEXT,             -- environment fingerprint of most points (each point keeps its own)
  hostname TEXT,
  device_name TEXT,
  n_points INTEGER NOT NULL,
  n_ok INTEGER NOT NULL,
  source TEXT NOT NULL,         -- the directory it was added from
  report TEXT,                  -- its report.html when it existed
  command TEXT,
  added_at TEXT NOT NULL
);
CREATE TABLE points (
  sweep_id TEXT NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
  path TEXT NOT NULL,           -- the record's path inside the sweep directory
  point_key TEXT,
  fingerprint TEXT,
  status TEXT,
  row TEXT NOT NULL,            -- the table row, JSON
  samples BLOB,                 -- raw samples, zlib-compressed JSON
  record BLOB NOT NULL,         -- the whole record, zlib-compressed JSON
  PRIMARY KEY (sweep_id, path)
);
CREATE INDEX points_series ON points (point_key, fingerprint);
CREATE TABLE gates (
  id TEXT PRIMARY KEY,          -- hash of the document
  source TEXT NOT NULL,
  added_at TEXT NOT NULL,
  doc TEXT NOT NULL             -- the JSON of `harness compare --json`
);
"""


class HistoryError(ValueError):
    """Bad history input (missing, empty, corrupted or partial sweep; unreadable database); names the path."""


@dataclass
class Sweep:
    """A sweep directory read and checked, ready to store."""

    id: str
    source: Path
    started_at: str
    git_sha: str | None
    git_dirty: bool | None
    fingerprint: str | None
    hostname: str | None
    device_name: str | None
    command: str | None
    report: Path | None
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path inside the sweep, record)
    resumed: bool = False  # some record was measured with resume=true (in this directory's earlier sweep)
    resumed_at: str | None = None  # sweep.json's: written only where a resume found an earlier sweep.json there
    superseded: list[str] = field(default_factory=list)  # what `add` replaced, one line each

    @property
    def n_ok(self) -> int:
        return sum(1 for _, r in self.records if r.get("status") == "ok")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _content_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "_path"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _common(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def _utc(text: str) -> str:
    """An ISO-8601 time as UTC (a time without zone is taken as UTC)."""
    t = datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def read_sweep(directory: str | Path) -> Sweep:
    """Read and check one sweep (or run) directory. Raises HistoryError naming the directory when it is missing
    or empty, when a record is unreadable or an ok record has no raw samples (corrupted), or when points its
    ``sweep.json`` planned have no record (partial)."""
    d = Path(directory)
    if not d.exists():
        raise HistoryError(f"{d}: no such directory")
    if not d.is_dir():
        raise HistoryError(f"{d}: not a directory (give a sweep or run directory)")
    if not (d / SWEEP_META).is_file():
        nested = sorted(p.parent for p in d.rglob(SWEEP_META))
        if nested:
            more = f" (and {len(nested) - 10} more)" if len(nested) > 10 else ""
            names = " ".join(str(p) for p in nested[:10]) + more
            raise HistoryError(
                f"{d}: holds {len(nested)} sweep(s) ({SWEEP_META} below it, none of its own), nothing stored: "
                f"add each sweep directory on its own: harness history add {names}"
            )
    paths = find_records(d)
    if not paths:
        raise HistoryError(f"{d}: empty: no record.json found (is this a sweep or run directory?)")
    records = []
    for path in paths:
        try:
            rec = read_record(path)
        except RecordError as exc:
            raise HistoryError(f"{d}: corrupted sweep, nothing stored: {exc}") from None
        if rec["status"] == "ok" and not (rec.get("samples") or {}).get("tpot_ms"):
            raise HistoryError(f"{d}: corrupted sweep, nothing stored: {path}: status ok but no raw samples")
        records.append((path.relative_to(os.path.abspath(d)).as_posix(), rec))
    missing = missing_points(d)
    if missing:
        first = " ".join(missing[0]["overrides"] or [])
        raise HistoryError(
            f"{d}: partial sweep, nothing stored: {len(missing)} point(s) planned in {SWEEP_META} have no record "
            f"(first: job {missing[0]['job']}: {first})"
        )
    meta = read_sweep_meta(d)
    times = [r["started_at"] for _, r in records if r.get("started_at")]
    started = meta.get("started_at") or (min(times) if times else None)
    if not started:
        raise HistoryError(f"{d}: no start time in {SWEEP_META} or in its records")
    try:
        started = _utc(str(started))
    except ValueError:
        raise HistoryError(f"{d}: start time {started!r} is not ISO-8601") from None
    envs = [r.get("env") or {} for _, r in records]
    ok_envs = [e for (_, r), e in zip(records, envs, strict=True) if r.get("status") == "ok"] or envs
    git = [e.get("git") or {} for e in ok_envs]
    report = d / REPORT_NAME
    command = meta.get("command")
    return Sweep(
        id=hashlib.sha256("".join(sorted(_content_hash(r) for _, r in records)).encode()).hexdigest()[:16],
        source=d.resolve(),
        started_at=started,
        git_sha=_common([g.get("sha") for g in git]),
        git_dirty=_common([g.get("dirty") for g in git]),
        fingerprint=_common([e.get("id") for e in ok_envs]),
        hostname=_common([e.get("hostname") for e in ok_envs]),
        device_name=_common([e.get("device_name") for e in ok_envs]),
        command=" ".join(map(str, command)) if isinstance(command, list) else command,
        report=report.resolve() if report.is_file() else None,
        records=records,
        resumed=any((r.get("config") or {}).get("resume") is True for _, r in records),
        resumed_at=str(meta["resumed_at"]) if meta.get("resumed_at") else None,
    )


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """Open (and, with ``create``, create) the history database; checks its schema version."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise HistoryError(f"{path}: no history database (add sweeps with `harness history add DIR`)")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.is_dir():
        raise HistoryError(f"{path}: is a directory; --db takes a database file")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = ON")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            with conn:
                conn.executescript(SCHEMA)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return conn
        row = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise HistoryError(f"{path}: not a history database ({exc})") from None
    if row is None:
        conn.close()
        raise HistoryError(f"{path}: not a history database (no schema_version)")
    if int(row[0]) > SCHEMA_VERSION:
        conn.close()
        raise HistoryError(f"{path}: schema_version {row[0]} is newer than this harness ({SCHEMA_VERSION})")
    return conn


def _pack(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj, default=str).encode(), 6)


def _unpack(blob: bytes | None) -> Any:
    return json.loads(zlib.decompress(blob)) if blob else None


def _later(a: str, b: str) -> bool:
    """Whether ISO-8601 time ``a`` is strictly after ``b``."""
    try:
        return datetime.fromisoformat(a) > datetime.fromisoformat(b)
    except (TypeError, ValueError):
        return False


def _when(iso: str | None) -> datetime:
    """An ISO-8601 time for ordering (unreadable ones first)."""
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _resumes(sweep: Sweep, started: str, git_sha: str | None) -> bool:
    """Whether ``sweep`` is a later state of the stored sweep that started at ``started`` from ``git_sha``: never
    across commits; a true resume (``resumed_at`` and the same start), or the same commit measured again."""
    if sweep.git_sha and git_sha and sweep.git_sha != git_sha:
        return False
    same_start = _when(started) == _when(sweep.started_at)
    return bool(sweep.resumed_at and same_start) or bool(sweep.git_sha and sweep.git_sha == git_sha)


def _superseded(conn: sqlite3.Connection, sweep: Sweep) -> tuple[dict[str, list[str]], str | None]:
    """The stored points that ``sweep`` holds again, per stored sweep: those of the stored sweeps it is a later
    state of (they share a record, or it rewrote every record resuming the newest one added from its directory)
    whose point it holds. Second: the id of a stored sweep that ``sweep`` is an older state of (started later,
    holds all its points), when there is one: then nothing is to be stored."""
    keys = {r["point_key"] for _, r in sweep.records if r.get("point_key")}
    hashes = {_content_hash(r) for _, r in sweep.records}
    starts = {str(r.get("started_at")) for _, r in sweep.records}
    related: set[str] = set()
    if keys:  # a record in common: the same point key and start first (cheap), then the same content
        marks = ",".join("?" * len(keys))
        query = f"SELECT rowid, sweep_id, row FROM points WHERE point_key IN ({marks})"
        candidates = [(i, sid) for i, sid, row in conn.execute(query, [*keys])
                      if str(json.loads(row).get("started_at")) in starts]  # fmt: skip
        for rowid, sid in candidates:
            if sid not in related:
                blob = conn.execute("SELECT record FROM points WHERE rowid = ?", (rowid,)).fetchone()[0]
                if _content_hash(_unpack(blob)) in hashes:
                    related.add(sid)
    if (sweep.resumed or sweep.resumed_at) and not related:
        # every record rewritten (all had failed): the state it resumes is the newest one stored from its
        # directory before it that it really resumes, not every sweep ever added from there (a folder CI measures
        # afresh each time, possibly with resume=true)
        query = "SELECT id, started_at, git_sha FROM sweeps WHERE source = ?"
        stored = conn.execute(query, (str(sweep.source),)).fetchall()
        before = [(started, sid) for sid, started, sha in stored
                  if not _later(started, sweep.started_at) and _resumes(sweep, started, sha)]  # fmt: skip
        if before:
            related.add(max(before, key=lambda b: _when(b[0]))[1])
    drop: dict[str, list[str]] = {}
    for sid in sorted(related):
        started = conn.execute("SELECT started_at FROM sweeps WHERE id = ?", (sid,)).fetchone()[0]
        stored = conn.execute("SELECT path, point_key FROM points WHERE sweep_id = ?", (sid,)).fetchall()
        if keys and _later(started, sweep.started_at) and keys <= {k for _, k in stored}:
            return {}, sid
        paths = [path for path, key in stored if key in keys]
        if paths:
            drop[sid] = paths
    return drop, None


def add(conn: sqlite3.Connection, sweep: Sweep) -> bool:
    """Store ``sweep`` in one transaction; False when a sweep with its id is already stored, or a later state of
    it (nothing changes). Where it is a later state of stored sweeps, their points that it holds again are
    replaced (a stored sweep left without points goes); ``sweep.superseded`` and the log say what went."""
    if conn.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep.id,)).fetchone():
        return False
    drop, newer = _superseded(conn, sweep)
    if newer is not None:
        log.info("unchanged: sweep %s from %s is an earlier state of stored sweep %s", sweep.id, sweep.source, newer)
        return False
    notes = []
    with conn:
        for sid, paths in drop.items():
            n_points, source = conn.execute("SELECT n_points, source FROM sweeps WHERE id = ?", (sid,)).fetchone()
            conn.executemany("DELETE FROM points WHERE sweep_id = ? AND path = ?", [(sid, p) for p in paths])
            left = conn.execute("SELECT count(*), sum(status = 'ok') FROM points WHERE sweep_id = ?", (sid,)).fetchone()
            if left[0]:
                conn.execute("UPDATE sweeps SET n_points = ?, n_ok = ? WHERE id = ?", (left[0], left[1] or 0, sid))
                notes.append(
                    f"replaced: {len(paths)} of the {n_points} points of sweep {sid} (from {source}) "
                    f"by sweep {sweep.id}, a later state of the same sweep; it keeps its other {left[0]}"
                )
            else:
                conn.execute("DELETE FROM sweeps WHERE id = ?", (sid,))
                notes.append(f"replaced: sweep {sid} (from {source}) by sweep {sweep.id}, a later state of the same "
                             "sweep (resumed or re-measured): each record is stored once")  # fmt: skip
        conn.execute(
            "INSERT INTO sweeps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sweep.id, sweep.git_sha, None if sweep.git_dirty is None else int(sweep.git_dirty), sweep.started_at,
             sweep.fingerprint, sweep.hostname, sweep.device_name, len(sweep.records), sweep.n_ok,
             str(sweep.source), str(sweep.report) if sweep.report else None, sweep.command, _now()),
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (sweep.id, rel, rec.get("point_key"), (rec.get("env") or {}).get("id"), rec.get("status"),
                 json.dumps(flatten(rec), default=str), _pack(rec.get("samples")) if rec.get("samples") else None,
                 _pack({k: v for k, v in rec.items() if k != "_path"}))
                for rel, rec in sweep.records
            ],
        )  # fmt: skip
    sweep.superseded = notes
    for note in notes:
        log.info("%s", note)
    return True


def read_gate(path: str | Path) -> dict[str, Any]:
    """A `harness compare --json` document, checked enough to be shown."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise HistoryError(f"{path}: cannot read gate verdicts ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistoryError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or "headline" not in doc:
        raise HistoryError(f"{path}: not the JSON of `harness compare --json` (no headline/rows)")
    return doc


def add_gate(conn: sqlite3.Connection, path: str | Path) -> bool:
    """Store gate verdicts; False when the same document is already stored."""
    doc = read_gate(path)
    text = json.dumps(doc, sort_keys=True)
    gid = hashlib.sha256(text.encode()).hexdigest()[:16]
    if conn.execute("SELECT 1 FROM gates WHERE id = ?", (gid,)).fetchone():
        return False
    with conn:
        conn.execute("INSERT INTO gates VALUES (?, ?, ?, ?)", (gid, str(Path(path).resolve()), _now(), text))
    return True


def latest_gate(conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc, source, added_at FROM gates ORDER BY added_at DESC, rowid DESC LIMIT 1").fetchone()
    return {**json.loads(row[0]), "_source": row[1], "_added_at": row[2]} if row else None


def sweeps(conn: sqlite3.Connection) -> pd.DataFrame:
    """One row per stored sweep, oldest first."""
    return pd.read_sql_query("SELECT * FROM sweeps ORDER BY started_at, id", conn)


def points(conn: sqlite3.Connection, samples: tuple[str, ...] = ("ttft_ms", "tpot_ms")) -> pd.DataFrame:
    """The table of every stored point (``harness.records.table``), with its sweep's ``sweep_id``,
    ``sweep_started_at``, ``sweep_git_sha``, ``sweep_report`` and ``sweep_source``, and ``samples.<metric>`` raw
    samples for the metrics in ``samples``."""
    query = (
        "SELECT p.row, p.samples, s.id, s.started_at, s.git_sha, s.report, s.source FROM points p "
        "JOIN sweeps s ON s.id = p.sweep_id ORDER BY s.started_at, s.id, p.path"
    )
    rows = []
    for row, blob, sid, started, sha, report, source in conn.execute(query):
        r = json.loads(row)
        r.update(sweep_id=sid, sweep_started_at=started, sweep_git_sha=sha, sweep_report=report, sweep_source=source)
        raw = (_unpack(blob) or {}) if samples else {}
        for m in samples:
            r[f"samples.{m}"] = raw.get(m)
        rows.append(r)
    return table(rows)


def record(conn: sqlite3.Connection, sweep_id: str, path: str) -> dict[str, Any] | None:
    """The whole stored record of one point."""
    row = conn.execute("SELECT record FROM points WHERE sweep_id = ? AND path = ?", (sweep_id, path)).fetchone()
    return _unpack(row[0]) if row else None
