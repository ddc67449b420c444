"""`harness report DIR [DIR ...] [-o FILE]`: write the comparative HTML report of one or more result directories.

Bad input (a missing path, a directory without records) is one line on stderr and exit status 2; an unreadable
record is named in a warning and the other records are still reported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.cli import OneLineParser, UsageError

PROG = "harness report"
EXIT_OK, EXIT_USAGE = 0, 2


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Write one self-contained HTML report (plotly.js inlined, opens from disk) of the records "
        "under the given sweep or run directories.",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep or run directory (or record.json)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="output file (default: DIR/report.html)")
    return p


def _error(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `harness report`; returns the exit status."""
    try:
        opts = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        return _error(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")

    from harness.report import ReportError, write_report

    if opts.output is not None and opts.output.is_dir():
        return _error(f"{opts.output}: is a directory; give a file name for -o")
    try:
        out = write_report(opts.dirs, opts.output)
    except ReportError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot write the report: {exc}")
    print(f"Report: {out}")
    return EXIT_OK
