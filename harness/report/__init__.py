"""The comparative HTML report of one or more sweeps: ``write_report(paths)`` -> one self-contained file.

It reads only ``harness.records.load()`` and the record files, so the figure functions (``figures``) and
tables (``tables``) work on any table of points, e.g. a dashboard over many sweeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.progress import SWEEP_META, missing_points, read_sweep_meta
from harness.records import RECORD_NAME, RecordError, find_records, load, read_record, write_bytes_atomic
from harness.report import figures, header, quality, tables
from harness.report.data import TIMELINE_MAX_POINTS, prepare, timeline_frame, with_sections
from harness.report.page import Section, render

REPORT_NAME = "report.html"
OP_BREAKDOWN_LIMIT = 60


class ReportError(ValueError):
    """Nothing to report (missing path, no records, none readable); the message names the path."""


def _as_list(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]


def _sweep_of(record_path: str) -> Path | None:
    """The sweep a record file lies in: the nearest folder above it with a sweep.json. Not the record's own
    ``sweep.dir``: a sweep copied or moved elsewhere would read whatever now lies at the old path."""
    for folder in Path(record_path).resolve().parents:
        if (folder / SWEEP_META).is_file():
            return folder
    return None


def _unreadable_paths(errors: Sequence[str]) -> set[Path]:
    """The files named by ``load``'s messages ('<path>: unreadable record (…)')."""
    return {Path(e.split(": ", 1)[0]).resolve() for e in errors if ": " in e}


def _job_record(sweep: Path, missing: dict[str, Any]) -> Path:
    """Where a planned point's record would lie: its job's folder (``job_dir`` where the sweep kept Hydra's
    subdir, else the job's number, Hydra's default)."""
    return Path(missing.get("job_dir") or sweep / str(missing["job"])) / RECORD_NAME


def collect(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[dict[str, Any]], list[dict[str, Any]]]:
    """The table, the records behind its rows, and the sweep metadata of every sweep directory involved (each
    with ``missing``: the points it planned that have no record; a planned point whose job folder holds a record
    ``load`` could not read is listed as unreadable, not also as missing)."""
    if not paths:
        raise ReportError("no results directory given")
    try:
        found = find_records(paths)
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from None
    where = ", ".join(map(str, paths))
    if not found:
        raise ReportError(f"{where}: no record.json found (is this a sweep or run directory?)")
    df = load(found).copy()  # one block per dtype: the columns added below would fragment load's frame
    if df.empty:
        raise ReportError(f"{where}: none of the {len(found)} record(s) could be read")
    records = []
    for path in df["record_path"]:
        try:
            records.append(read_record(Path(path)))
        except RecordError:  # replaced between load() and now; load() already named it if it was unreadable
            continue
    dirs = {Path(p).resolve() for p in paths if Path(p).is_dir()}
    sweeps = {p: _sweep_of(p) for p in df["record_path"].dropna().unique()}
    dirs |= {d for d in sweeps.values() if d is not None}
    # where each point was found (its sweep, or a single run's folder): several sweeps of one point are told apart
    df["sweep_source"] = df["record_path"].map(lambda p: str(sweeps.get(p) or Path(p).parent))
    unreadable = _unreadable_paths(df.attrs.get("errors", []))
    metas = []
    for d in sorted(dirs):
        meta = read_sweep_meta(d)
        if meta:
            missing = [m for m in missing_points(d) if _job_record(d, m).resolve() not in unreadable]
            metas.append({**meta, "missing": missing})
    return df, records, metas


def memory_note(records: Sequence[dict[str, Any]]) -> str:
    """How peak memory was measured on each device, and what that means on CPU."""
    methods = dict.fromkeys(
        f"{(r.get('identity') or {}).get('device', '?')}: {(r.get('metrics') or {}).get('peak_memory_method')}"
        for r in records
        if (r.get("metrics") or {}).get("peak_memory_method")
    )
    measured = f"Measured as {'; '.join(methods)}. " if methods else ""
    return (
        f"{measured}MiB (2^20 bytes). On CPU this is the peak resident memory of the whole process (the harness, "
        "torch, the eager reference kept for fidelity), not of the engine alone: the weights each variant stores "
        "are in the next chart. On CUDA it is torch.cuda.max_memory_allocated after a reset (the allocator's peak)."
    )


def build_html(
    df: pd.DataFrame,
    records: Sequence[dict[str, Any]],
    metas: Sequence[dict[str, Any]] = (),
    unreadable: Sequence[str] = (),
    title: str = "LLM inference benchmark report",
) -> str:
    """The report page for a table of points and its records."""
    # several machines told apart, and several sweeps of the same points (each its own eager)
    data = with_sections(prepare(df, env_labels=True, sweep_labels=True), list(records))
    tl, monitored = timeline_frame(data, list(records))
    profiled = int(
        data[[c for c in data.columns if c.startswith("profile_") and c.endswith("_ms")]].notna().any(axis=1).sum()
    )
    n_unranked = int((data["status"].eq("ok") & ~data["representative"]).sum())
    unranked_note = (
        f"{n_unranked} point(s) have timings that are not representative (e.g. Triton kernels run by the "
        "interpreter): they are shown dotted/hollow/greyed with their reason and never ranked."
        if n_unranked
        else ""
    )

    def fig_section(sid: str, title: str, fig, absent: str, note: str = "") -> Section:
        return Section(sid, title, figure=fig, note=note if fig is not None else absent)

    memory = figures.by_batch(data, "peak_memory_mb", "Peak memory per variant (MiB)", "peak memory (MiB)", kind="bar")
    quality_fig, quality_note = quality.quality_scatter(data)

    sections = [
        Section(
            "summary",
            "Best variant per model and batch",
            f"<div class='scroll'>{tables.summary_table(data)}</div>{tables.verdict_note(data)}"
            f"{tables.speedup_note(data)}",
            note=unranked_note,
        ),
        fig_section(
            "speedup",
            "Speedup vs eager",
            figures.speedup_heatmap(data),
            "No speedup to show: no variant shares a workload with a measured, representative eager point.",
        ),
        fig_section(
            "ttft",
            "Time to first token",
            figures.by_batch(
                data,
                "ttft_ms_p50",
                figures.ci_title(data, "TTFT p50 vs batch size", "ttft_ms_ci_coverage"),
                "TTFT p50 (ms)",
                ci=("ttft_ms_ci_low", "ttft_ms_ci_high"),
                coverage="ttft_ms_ci_coverage",
            ),
            "No TTFT measured.",
        ),
        fig_section(
            "tpot",
            "Time per output token",
            figures.by_batch(
                data,
                "tpot_ms_p50",
                figures.ci_title(data, "TPOT p50 vs batch size", "tpot_ms_ci_coverage"),
                "TPOT p50 (ms)",
                ci=("tpot_ms_ci_low", "tpot_ms_ci_high"),
                coverage="tpot_ms_ci_coverage",
            ),
            "No TPOT measured.",
        ),
        fig_section(
            "throughput",
            "Decode throughput",
            figures.by_batch(
                data,
                "decode_tokens_per_s",
                "Decode tokens/s vs batch size (from the TPOT median and its CI)",
                "decode tokens/s",
                ci=("tps_ci_low", "tps_ci_high"),
                coverage="tpot_ms_ci_coverage",
            ),
            "No throughput measured.",
        ),
        Section(
            "memory",
            "Peak memory",
            f"<p class='note'>{tables.esc(memory_note(records))}</p>" if memory is not None else "",
            figure=memory,
            note="" if memory is not None else "No memory measured.",
        ),
        fig_section("weights", "Weights per variant", figures.weights_bar(data), "No record carries its weight size."),
        fig_section(
            "quality",
            "Speed vs quality",
            quality_fig,
            quality_note,
            note=" ".join(filter(None, (quality_note, tables.ONCE_PER_ENGINE))),
        ),
        fig_section(
            "utilization",
            "Utilization timelines",
            figures.timelines(tl),
            "Not measured in this sweep: no record carries a monitor timeline.",
            note=f"Showing {min(monitored, TIMELINE_MAX_POINTS)} of {monitored} monitored points.",
        ),
        fig_section(
            "roofline",
            "Roofline",
            figures.roofline(data),
            "Not measured in this sweep: no record carries a roofline section.",
        ),
        fig_section(
            "profile",
            "Op-category breakdown",
            figures.op_breakdown(data, OP_BREAKDOWN_LIMIT),
            "Not profiled in this sweep: no record carries a profile section.",
            note=f"Showing {min(profiled, OP_BREAKDOWN_LIMIT)} of {profiled} profiled points.",
        ),
        Section(
            "points",
            "All measured points",
            f"<details><summary>{int(data['status'].eq('ok').sum())} points</summary><div class='scroll'>"
            f"{tables.points_table(data)}</div></details>{tables.quality_note(data)}",
        ),
        Section(
            "failed",
            "Failed and skipped points",
            tables.failed_table(data, unreadable, [m for meta in metas for m in meta.get("missing", [])]),
        ),
    ]
    top = header.header(data, records, metas, unreadable) + (
        f"<details><summary>Configuration</summary>{header.config_table(records)}</details>"
    )
    return render(title, top, sections)


def default_output(paths: Sequence[Path]) -> Path:
    first = paths[0]
    return (first if first.is_dir() else first.parent) / REPORT_NAME


def write_report(paths: str | Path | Iterable[str | Path], out: Path | None = None) -> Path:
    """Write the report of the records under ``paths`` (default: ``<first dir>/report.html``); returns its path.

    Raises ReportError when there is nothing to report. Unreadable records are skipped with a warning (from
    ``load``) and listed in the report's failed-points table.
    """
    paths = _as_list(paths)
    df, records, metas = collect(paths)
    out = Path(out) if out is not None else default_output(paths)
    names = ", ".join(p.resolve().name for p in paths)
    text = build_html(df, records, metas, df.attrs.get("errors", []), title=f"LLM inference benchmark report: {names}")
    return write_bytes_atomic(out, text)
