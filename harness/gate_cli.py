"""`harness compare BASE CAND` (the CI gate) and `harness export DIR --format ...`.

Exit codes of compare: 0 no regression, 1 at least one regression, 2 usage or input error (one line on stderr,
no traceback), 3 nothing gated (no gated metric of any matched point got a verdict; ``--allow-ungated``: 0). An
unreadable record is named in a warning and the other records are still compared and shown; the status is then 2
(unless something regressed: 1), since the gate cannot vouch for a point it did not read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from harness.cli import OneLineParser, UsageError
from harness.export import (
    DEFAULT_NAMES,
    FORMATS,
    PYTEST_METRICS,
    ExportError,
    missing_errors,
    read_points,
    strict_json,
    table_with_samples,
    write,
)
from harness.gate import compare
from harness.gate_noise import load_noise
from harness.gate_report import Sources, exit_code, render_markdown, render_terminal, to_json
from harness.gate_settings import (
    CORRECTIONS,
    DEFAULT_MATCH,
    DEFAULT_METRICS,
    METRICS,
    GateInputError,
    Settings,
    Thresholds,
    check_threshold,
    load_thresholds,
    parse_metric_flag,
)

COMPARE_EPILOG = f"""metrics (default: {", ".join(DEFAULT_METRICS)}): {", ".join(METRICS)}

verdicts: regression (worse: U test p < alpha, or signed-rank for points timed in turns, change beyond the
threshold and non-overlapping median CIs, all three), improvement (the same, better), no change (measured,
within the threshold), unknown (too few samples, inconclusive: beyond the threshold but not confirmed by the
tests, timings not representative, different environment fingerprints, failed or skipped on a side).
A point ok in BASE that fails in CAND (failed, oom, timeout) is a regression.

exit status: 0 no regression, 1 regression, 2 usage or input error (also when a record could not be read and
nothing regressed among the others, which are still compared), 3 nothing gated (no timed metric of any matched
point got a regression, improvement or no-change verdict; --allow-ungated makes it 0).

thresholds file (YAML or JSON):
  threshold: 0.05                       # default minimum relative change of timed metrics
  metrics: {{tpot_ms: 0.03, fidelity_top1: 0.005}}
  points:                               # later rules win; patterns as in shell globs
    - match: {{variant: "quantized*", batch_size: 1}}
      thresholds: {{tpot_ms: 0.10}}
"""


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


@contextlib.contextmanager
def _quiet_records_log() -> Iterator[None]:
    """Silence the records loader's warnings (unreadable files): the command prints them itself, once,
    prefixed with the command and side, whatever logging set-up the caller has."""
    logger = logging.getLogger("harness.records")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _read(path: Path, side: str) -> tuple[pd.DataFrame, list[str]]:
    try:
        with _quiet_records_log():
            df = read_points(path)
    except ExportError as exc:
        raise UsageError(f"{side}: {exc}") from None
    for err in df.attrs.get("errors", []):
        sys.stderr.write(f"harness compare: warning: {side}: {' '.join(str(err).split())} (skipped)\n")
    return df, [f"{side}: {e}" for e in df.attrs.get("errors", [])]


def compare_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="harness compare",
        description="Gate a candidate sweep against a baseline: match points, test every gated metric, print a "
        "table, write Markdown and JSON summaries, and exit 1 on a regression.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", type=Path, metavar="BASE", help="baseline: results directory, record.json or exported table")
    p.add_argument("cand", type=Path, metavar="CAND", help="candidate: the same kinds")
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME[:T]",
        help="gate these metrics (repeat or comma-separate; replaces the default set); NAME:T sets its threshold",
    )
    p.add_argument("--threshold", metavar="X", help="default minimum relative change of timed metrics (0.05)")
    p.add_argument("--thresholds", type=Path, metavar="FILE", help="per-metric and per-point thresholds (YAML/JSON)")
    p.add_argument(
        "--alpha", type=float, default=0.01,
        help="significance level of the U test (of the signed-rank test for points timed in turns; default 0.01)",
    )  # fmt: skip
    p.add_argument("--min-samples", type=int, default=5, help="fewer samples on a side: unknown (default 5)")
    p.add_argument(
        "--correction", choices=CORRECTIONS, default="none",
        help="holm: Holm-Bonferroni over all rank tests of the comparison, so that --alpha bounds the chance that "
        "any point of a same-code run is flagged (not each one's); default none",
    )  # fmt: skip
    p.add_argument(
        "--allow-env-mismatch",
        action="store_true",
        help="gate points whose environment fingerprints differ (said in every such reason)",
    )
    p.add_argument(
        "--allow-ungated",
        action="store_true",
        help="exit 0 rather than 3 when nothing could be gated (every timing unknown, e.g. a new runner)",
    )
    p.add_argument(
        "--history",
        type=Path,
        metavar="DB",
        help="history database (harness history add): an unpaired timed change must also exceed 3x the point's "
        "run-to-run spread of medians over its stored sweeps in the same environment",
    )
    p.add_argument(
        "--match",
        default=",".join(DEFAULT_MATCH),
        metavar="COLS",
        help="table columns that identify a point across sweeps (default point_key), e.g. "
        "model,batch_size,prompt_len,gen_len to compare two variants",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="write the Markdown summary here (it is also appended to $GITHUB_STEP_SUMMARY when set)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the JSON result here ('-': stdout, no table)")
    return p


def settings_from(opts: argparse.Namespace) -> Settings:
    """Flags over the thresholds file over built-in defaults (see ``harness.gate_settings``)."""
    thresholds = load_thresholds(opts.thresholds) if opts.thresholds else Thresholds()
    if opts.threshold is not None:
        thresholds.default = check_threshold(opts.threshold, "--threshold")
    names: list[str] = []
    for item in (x for flag in opts.metric for x in flag.split(",") if x.strip()):
        name, value = parse_metric_flag(item)
        names.append(name)
        if value is not None:
            thresholds.metrics[name] = value
    if not 0 < opts.alpha < 1:
        raise GateInputError(f"--alpha: must be within (0, 1), got {opts.alpha}")
    if opts.min_samples < 2:
        raise GateInputError(f"--min-samples: must be at least 2, got {opts.min_samples}")
    match = tuple(c.strip() for c in opts.match.split(",") if c.strip())
    if not match:
        raise GateInputError("--match: give at least one column")
    return Settings(
        metrics=tuple(dict.fromkeys(names)) or DEFAULT_METRICS,
        thresholds=thresholds,
        alpha=opts.alpha,
        min_samples=opts.min_samples,
        allow_env_mismatch=opts.allow_env_mismatch,
        match=match,
        correction=opts.correction,
        history=str(opts.history) if opts.history else None,
        allow_ungated=opts.allow_ungated,
    )


def _write_text(path: Path, text: str, append: bool = False) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if append:  # GITHUB_STEP_SUMMARY: other steps' summaries are in the file already
            with path.open("a") as fh:
                fh.write(text)
        else:  # readers (and a concurrent writer) never see a half-written --markdown/--json file
            from harness.records import write_bytes_atomic

            write_bytes_atomic(path, text)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None


def compare_main(argv: Sequence[str]) -> int:
    """Entry point of `harness compare`; returns the exit status."""
    opts = _parse(compare_parser(), argv)
    if isinstance(opts, int):
        return opts
    try:
        return _compare(opts)
    except GateInputError as exc:
        raise UsageError(str(exc)) from None
    except UsageError:
        raise
    except Exception as exc:  # exit 1 means "regressed" to CI: a crash must not read as a verdict
        logging.getLogger(__name__).debug("compare failed", exc_info=True)
        raise UsageError(f"cannot gate these inputs ({exc.__class__.__name__}: {exc}); this is a bug, please "
                         "report it with the two inputs") from None  # fmt: skip


def _compare(opts: argparse.Namespace) -> int:
    settings = settings_from(opts)
    base, base_errors = _read(opts.base, "BASE")
    cand, cand_errors = _read(opts.cand, "CAND")
    noise = load_noise(settings.history) if settings.history else None
    result = compare(base, cand, settings, noise)
    sources = Sources(
        str(opts.base),
        str(opts.cand),
        len(base),
        len(cand),
        base_errors + cand_errors,
        (base.attrs.get("source", "records"), cand.attrs.get("source", "records")),
    )
    markdown = render_markdown(result, sources)
    if opts.markdown:
        _write_text(opts.markdown, markdown)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        _write_text(Path(os.environ["GITHUB_STEP_SUMMARY"]), markdown + "\n", append=True)
    doc = json.dumps(strict_json(to_json(result, sources)), indent=1, default=str, allow_nan=False)
    if opts.json and str(opts.json) == "-":
        sys.stdout.write(doc + "\n")
    else:
        if opts.json:
            _write_text(opts.json, doc + "\n")
        sys.stdout.write(render_terminal(result, sources))
    return exit_code(result, sources)


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="harness export",
        description="Export a sweep's points: pytest-benchmark JSON (for `pytest-benchmark compare` and "
        "github-action-benchmark), the flat table as CSV or Parquet, or the table with raw samples as JSON "
        "(readable by `harness compare`).",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="results directory (or record.json)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="output file ('-': stdout, except parquet); default DIR/" + "|".join(DEFAULT_NAMES.values()),
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME",
        help=f"pytest-benchmark only: metrics to export (default: {', '.join(PYTEST_METRICS)})",
    )
    return p


def export_main(argv: Sequence[str]) -> int:
    """Entry point of `harness export`; returns the exit status."""
    opts = _parse(export_parser(), argv)
    if isinstance(opts, int):
        return opts
    metrics = [m.strip() for flag in opts.metric for m in flag.split(",") if m.strip()] or None
    if metrics and opts.format != "pytest-benchmark":
        raise UsageError("--metric applies to --format pytest-benchmark only (tables carry every metric)")
    to_stdout = opts.output is not None and str(opts.output) == "-"
    if to_stdout and opts.format == "parquet":
        raise UsageError("parquet is binary: give -o FILE")
    out = opts.output or opts.dirs[0] / DEFAULT_NAMES[opts.format]
    try:
        with _quiet_records_log():
            df = table_with_samples(opts.dirs)
        df.attrs["errors"] = list(df.attrs.get("errors", [])) + [e for d in opts.dirs for e in missing_errors(d)]
        for err in df.attrs.get("errors", []):
            sys.stderr.write(f"harness export: warning: {' '.join(str(err).split())} (skipped)\n")
        if to_stdout:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                info = write(df, opts.format, Path(tmp) / "out", metrics)
                sys.stdout.write((Path(tmp) / "out").read_text())
        else:
            info = write(df, opts.format, out, metrics)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ImportError) as exc:
        raise UsageError(f"{out}: cannot write {opts.format} ({exc.__class__.__name__}: {exc})") from None
    what = f"{info['points']} points"
    if "benchmarks" in info:
        left = ", ".join(f"{n} {why}" for why, n in info["left_out"].items() if n)
        what += f" as {info['benchmarks']} benchmarks" + (f" (left out: {left})" if left else "")
    (sys.stderr if to_stdout else sys.stdout).write(f"Exported {what} to {'stdout' if to_stdout else out}\n")
    errors = df.attrs.get("errors", [])
    if errors and opts.format in ("csv", "pytest-benchmark"):
        # the file has no place for them: a gate reading it would pass points it never saw
        sys.stderr.write(f"harness export: {opts.format} cannot carry the {len(errors)} record error(s) above; "
                         "exit 2 (json and parquet keep them for harness compare)\n")  # fmt: skip
        return 2
    return 0
