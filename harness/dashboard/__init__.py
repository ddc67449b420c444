"""The performance dashboard over the history database: ``write_dashboard(db, out)`` -> a static site.

Trend charts per point (model × variant × batch × workload) and environment, with CI bands and the confirmed
steps; a table of those steps with the last good and first bad commits; the latest gate verdicts; every stored
sweep, linked to its report. The page is built by the report's page helpers (plotly.js inlined once, opens from
disk) and reuses its table preparation and figure functions. Written as a folder (``index.html`` plus the
sweeps' reports under ``reports/``, hard-linked when the filesystem allows: publishable as-is) or as one file
(``-o FILE.html``, reports linked where they lie).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from harness import history
from harness.dashboard import figures, page
from harness.dashboard.data import TRENDS, failed_points, find_steps, history_frame, never_measured
from harness.records import write_bytes_atomic
from harness.report import figures as report_figures
from harness.report.data import prepare
from harness.report.page import Section, render
from harness.report.tables import esc

DEFAULT_OUT = Path("results") / "dashboard"
INDEX = "index.html"
REPORTS = "reports"
TITLE = "LLM inference performance over history"


class DashboardError(ValueError):
    """Nothing to show (no database, no sweep, no measured point); the message names the path."""


def _place_report(src: Path, dst: Path) -> None:
    """Hard-link the report into the site (no extra disk), copying across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def report_urls(sweeps: pd.DataFrame, out_file: Path, folder: bool, with_reports: bool = True) -> dict[str, str]:
    """sweep id -> link to its report, relative to the page; only reports that exist now."""
    urls: dict[str, str] = {}
    if not with_reports:
        return urls
    for sid, report in zip(sweeps["id"], sweeps["report"], strict=True):
        if not report or not Path(report).is_file():
            continue
        if folder:
            _place_report(Path(report), out_file.parent / REPORTS / f"{sid}.html")
            urls[sid] = f"{REPORTS}/{sid}.html"
        else:
            urls[sid] = quote(Path(os.path.relpath(report, out_file.parent)).as_posix())
    return urls


def latest_sweep_figure(data: pd.DataFrame):
    """TPOT vs batch of the newest sweep with ok points, drawn by the report's own figure function."""
    if data.empty:
        return None
    newest = data.loc[data["t"].idxmax(), "sweep_id"]
    latest = prepare(data[data["sweep_id"].eq(newest)])
    title = report_figures.ci_title(latest, f"Newest sweep with measured points ({newest}): TPOT p50 vs batch size",
                                    "tpot_ms_ci_coverage")  # fmt: skip
    return report_figures.by_batch(
        latest, "tpot_ms_p50", title, "TPOT p50 (ms)", ci=("tpot_ms_ci_low", "tpot_ms_ci_high"),
        coverage="tpot_ms_ci_coverage",
    )  # fmt: skip


def build_html(
    sweeps: pd.DataFrame, points: pd.DataFrame, gate: dict[str, Any] | None, urls: dict[str, str], db: str
) -> tuple[str, pd.DataFrame]:
    """The page, and the steps it lists."""
    data = history_frame(points)
    if data.empty:
        raise DashboardError(f"{db}: no measured (ok) point in {len(sweeps)} stored sweep(s)")
    steps = find_steps(data)
    failed = failed_points(points, data)
    colors = figures.series_colors(list(data["series"]))
    notes = [
        "One line per point and environment fingerprint (measurements from different machines or software stacks "
        "are never joined), over the start time of each sweep; bands are the 95% CI of the median (of fewer than 6 "
        "samples: the sample range, its coverage in the hover). A step needs a "
        "change beyond the gate's threshold that lasts at least 3 sweeps at a consistent level, is at least 3.5× "
        "the sweep-to-sweep noise, and is significant (p < 0.001) between sweeps and on the raw samples. ✕: the "
        "point was not measured in that sweep (failed, oom, timeout or skipped; the hover says why), drawn at its "
        "level before (a point never measured in its environment has no line: it is listed under Never measured). "
        "A dashed vertical line marks where an environment fingerprint is first measured; grey ticks along the "
        "bottom, where the measured commit changes (its SHA in the hover). Fidelity scored on other inputs "
        "(quality.* settings, seed or corpus) starts a new line and is never a step. Click a point to open its "
        "sweep's report."
    ]
    sections = [Section("filters", "Filters", page.filter_bar(data))]
    n_reg = int(steps["kind"].eq("regression").sum()) if len(steps) else 0
    sections.append(Section(
        "steps", f"Steps ({n_reg} regressions, {len(steps) - n_reg} improvements)",
        page.steps_table(steps, urls) if len(steps) else "",
        note="" if len(steps) else "No step: every series stayed within its noise and the gate's thresholds.",
    ))  # fmt: skip
    if gate is not None:
        sections.append(Section("gate", "Latest gate verdicts", page.gate_section(gate)))
    else:
        note = "No gate verdicts stored (harness history add --gate gate.json, or harness dashboard --gate FILE)."
        sections.append(Section("gate", "Latest gate verdicts", note=note))
    for spec in TRENDS:
        fig = figures.trend(data, spec, steps, colors, urls, failed)
        under = f"<p class='note'>{esc(spec.note)}</p>" if fig is not None and spec.note else ""
        sections.append(Section(f"trend-{spec.id}", spec.title, under, figure=fig,
                                note="" if fig is not None else "Not measured in any stored sweep."))  # fmt: skip
    latest = latest_sweep_figure(data)
    if latest is not None:
        newest_ok = data.loc[data["t"].idxmax(), "sweep_id"]
        stored = sweeps.assign(_t=pd.to_datetime(sweeps["started_at"], utc=True, format="ISO8601", errors="coerce"))
        newer = stored[stored["_t"] > data["t"].max()]
        note = (f"The {len(newer)} sweep(s) stored after {newest_ok} have no measured (ok) point: "
                f"{', '.join(map(str, newer['id']))}." if len(newer) else "")  # fmt: skip
        sections.append(Section("latest", "Newest sweep with measured points", figure=latest, note=note))
    never = never_measured(points, data)
    if len(never):  # no line to mark a ✕ on: listed, so a point that never worked is not a silent gap
        title = f"Never measured ({len(never)} point{'s' if len(never) > 1 else ''})"
        note = ("No stored sweep measured these points in their environment (each record failed, oom, timed out or "
                "was skipped), so no trend has a line for them.")  # fmt: skip
        sections.append(Section("never", title, page.never_measured_table(never, urls), note=note))
    sections.append(Section("sweeps", "Stored sweeps", page.sweeps_table(sweeps, urls)))
    return render(TITLE, page.header(db, sweeps, data, notes), sections), steps


def write_dashboard(
    db: str | Path = history.DEFAULT_DB, out: str | Path = DEFAULT_OUT, gate: str | Path | None = None,
    with_reports: bool = True,
) -> tuple[Path, pd.DataFrame]:  # fmt: skip
    """Write the dashboard of the history in ``db``: a folder (``out/index.html``) or, when ``out`` ends in
    ``.html``, one file. ``gate``: a `harness compare --json` file shown instead of the newest stored one.
    Returns the page's path and the steps found."""
    out = Path(out)
    folder = out.suffix.lower() != ".html"
    out_file = out / INDEX if folder else out
    conn = history.connect(db, create=False)
    try:
        sweeps = history.sweeps(conn)
        if sweeps.empty:
            raise DashboardError(f"{db}: no sweep stored (add sweeps with `harness history add DIR`)")
        points = history.points(conn)
        doc = history.read_gate(gate) if gate is not None else history.latest_gate(conn)
    finally:
        conn.close()
    if gate is not None:
        doc["_source"] = str(gate)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    urls = report_urls(sweeps, out_file, folder, with_reports)
    text, steps = build_html(sweeps, points, doc, urls, str(db))
    write_bytes_atomic(out_file, text)
    return out_file, steps
