"""`harness history add DIR... | list` (the history database) and `harness dashboard` (the static site).

Bad input is one line on stderr naming the path and what is allowed, and exit status 2. `history add` checks
every directory first and stores each good sweep in its own transaction; a missing, empty, corrupted or partial
one is named on its own line, nothing of it is stored, the others are added, and the status is 2.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from harness import history
from harness.cli import OneLineParser, UsageError
from harness.records import RECORD_NAME

EXIT_OK, EXIT_USAGE = 0, 2


def _error(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return EXIT_USAGE


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=history.DEFAULT_DB, metavar="PATH",
                   help=f"history database (SQLite; default: {history.DEFAULT_DB})")  # fmt: skip


def history_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="harness history", description="Store sweeps in the history database the dashboard reads.")
    sub = p.add_subparsers(dest="action", metavar="{add,list}")
    sub.required = True
    add = sub.add_parser("add", help="add sweep or run directories (each one transaction; re-adding is a no-op)")
    add.add_argument("dirs", nargs="*", type=Path, metavar="DIR", help="sweep or run directory")
    add.add_argument("--gate", type=Path, action="append", default=[], metavar="FILE",
                     help="also store gate verdicts (`harness compare --json FILE`); DIR/gate.json is too")  # fmt: skip
    _db_arg(add)
    ls = sub.add_parser("list", help="list the stored sweeps, oldest first")
    ls.add_argument("--json", action="store_true", help="print JSON, one object per sweep")
    _db_arg(ls)
    return p


def _add(opts: argparse.Namespace) -> int:
    prog = "harness history add"
    if not opts.dirs and not opts.gate:
        return _error(prog, "give at least one sweep or run directory (or --gate FILE)")
    failed = False
    ready: list[history.Sweep] = []
    for d in opts.dirs:
        try:
            ready.append(history.read_sweep(d))
        except history.HistoryError as exc:
            _error(prog, str(exc))
            failed = True
    gates = []
    auto = [s.source / history.GATE_NAME for s in ready if (s.source / history.GATE_NAME).is_file()]
    for g in [*opts.gate, *auto]:
        try:
            history.read_gate(g)
            gates.append(g)
        except history.HistoryError as exc:
            _error(prog, str(exc))
            failed = True
    if not ready and not gates:
        return EXIT_USAGE
    try:
        conn = history.connect(opts.db)
    except (history.HistoryError, sqlite3.Error) as exc:
        return _error(prog, str(exc) if isinstance(exc, history.HistoryError) else f"{opts.db}: {exc}")
    try:
        for s in ready:
            added = history.add(conn, s)
            what = "added" if added else "unchanged (already stored)"
            for note in s.superseded:  # a later state of a stored sweep replaces it: each record stored once
                print(note)
            print(f"{what}: sweep {s.id}, commit {(s.git_sha or 'none')[:10]}, {s.started_at[:19]}, "
                  f"{s.n_ok}/{len(s.records)} ok points, from {s.source}")  # fmt: skip
        for g in gates:
            print(f"{'added' if history.add_gate(conn, g) else 'unchanged (already stored)'}: gate verdicts {g}")
    except sqlite3.Error as exc:
        return _error(prog, f"{opts.db}: {exc} (the sweep being added was not stored)")
    finally:
        conn.close()
    print(f"History: {opts.db}")
    return EXIT_USAGE if failed else EXIT_OK


def _list(opts: argparse.Namespace) -> int:
    try:
        conn = history.connect(opts.db, create=False)
    except history.HistoryError as exc:
        return _error("harness history list", str(exc))
    try:
        df = history.sweeps(conn)
    finally:
        conn.close()
    if opts.json:
        rows = df.astype(object).where(df.notna(), None).to_dict(orient="records")  # NaN is not JSON: null
        print(json.dumps(rows, indent=1, default=str, allow_nan=False))
        return EXIT_OK
    if df.empty:
        print(f"{opts.db}: no sweep stored")
        return EXIT_OK
    headers = ["started (UTC)", "sweep", "commit", "fingerprint", "ok/points", "report", "source"]
    rows = [[str(r.started_at)[:19].replace("T", " "), r.id, (r.git_sha or "none")[:10], r.fingerprint or "-",
             f"{r.n_ok}/{r.n_points}", "yes" if r.report and Path(r.report).is_file() else "no", r.source]
            for r in df.itertuples()]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for line in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print(f"{len(df)} sweep(s) in {opts.db}")
    return EXIT_OK


def history_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `harness history`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = history_parser().parse_args(argv)
    except UsageError as exc:
        prog = f"harness history {argv[0]}" if argv and argv[0] in ("add", "list") else "harness history"
        return _error(prog, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return _add(opts) if opts.action == "add" else _list(opts)


def sweep_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a sweep (or run) directory, else the sweeps below it and the single runs that
    belong to none (``results/``: ``sweeps/<ts>`` and ``runs/<ts>`` each on their own)."""
    if (root / history.SWEEP_META).is_file() or (root / RECORD_NAME).is_file():
        return [root]
    sweeps = sorted(p.parent for p in root.rglob(history.SWEEP_META))
    runs = sorted(p.parent for p in root.rglob(RECORD_NAME) if not any(s in p.parents for s in sweeps))
    return [*sweeps, *runs] or [root]


def _store_roots(prog: str, roots: Sequence[Path], db: Path) -> int:
    """Store every sweep under ``roots`` in ``db`` before the site is built; a sweep that cannot be stored
    (partial, corrupted) is named in a warning and left out, the others are stored."""
    for root in roots:
        if not root.is_dir():
            return _error(prog, f"{root}: {'no such directory' if not root.exists() else 'not a directory'}")
    ready, skipped = [], 0
    for d in (d for root in roots for d in sweep_dirs(root)):
        try:
            ready.append(history.read_sweep(d))
        except history.HistoryError as exc:
            sys.stderr.write(f"{prog}: warning: not stored: {' '.join(str(exc).split())}\n")
            skipped += 1
    try:
        conn = history.connect(db)
    except (history.HistoryError, sqlite3.Error) as exc:
        return _error(prog, str(exc) if isinstance(exc, history.HistoryError) else f"{db}: {exc}")
    try:
        added = sum(bool(history.add(conn, s)) for s in ready)
    except sqlite3.Error as exc:
        return _error(prog, f"{db}: {exc} (the sweep being added was not stored)")
    finally:
        conn.close()
    print(f"History {db}: {added} sweep(s) added, {len(ready) - added} already stored, {skipped} not stored")
    return EXIT_OK


def dashboard_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="harness dashboard",
        description="Write the performance dashboard of the history database: trends per point with CI bands, "
        "step detection (last good and first bad commit), the latest gate verdicts, links to every sweep's report.",
    )
    p.add_argument("roots", nargs="*", type=Path, metavar="DIR",
                   help="sweep directories, or folders of them (results/sweeps), to store in --db first, as "
                        "`harness history add` does (sweeps already stored are left as they are)")  # fmt: skip
    _db_arg(p)
    p.add_argument("-o", "--output", type=Path, default=Path("results") / "dashboard", metavar="DIR",
                   help="output folder (index.html, reports/; default: results/dashboard) or FILE.html")  # fmt: skip
    p.add_argument("--gate", type=Path, metavar="FILE", help="show these gate verdicts instead of the newest stored")
    p.add_argument("--no-reports", action="store_true", help="do not link the sweeps' reports into the site")
    return p


def dashboard_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `harness dashboard`; returns the exit status."""
    prog = "harness dashboard"
    try:
        opts = dashboard_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        return _error(prog, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from harness.dashboard import DashboardError, write_dashboard  # lazy: plotly loads only when a site is built

    if opts.output.suffix.lower() == ".html" and opts.output.is_dir():
        return _error(prog, f"{opts.output}: is a directory; give a folder name or a FILE.html for -o")
    if opts.output.suffix.lower() != ".html" and opts.output.is_file():
        return _error(prog, f"{opts.output}: is a file; -o takes a folder (or a FILE.html)")
    if opts.roots:
        code = _store_roots(prog, opts.roots, opts.db)
        if code != EXIT_OK:
            return code
    try:
        out, steps = write_dashboard(opts.db, opts.output, opts.gate, with_reports=not opts.no_reports)
    except (DashboardError, history.HistoryError) as exc:
        return _error(prog, str(exc))
    except (OSError, sqlite3.Error) as exc:
        return _error(prog, f"cannot write the dashboard: {exc}")
    n_reg = int(steps["kind"].eq("regression").sum()) if len(steps) else 0
    print(f"{n_reg} regression(s), {len(steps) - n_reg} improvement(s) found")
    print(f"Dashboard: {out}")
    return EXIT_OK
