"""How a gate result is shown: a terminal table, a Markdown summary (for $GITHUB_STEP_SUMMARY or a PR comment)
and a JSON document. Functions of ``harness.gate.GateResult``; the command line decides where they go."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.export import table_rows
from harness.gate import IMPROVEMENT, NO_CHANGE, REGRESSION, UNKNOWN, VERDICTS, GateResult
from harness.gate_settings import METRICS

MARKS = {REGRESSION: "❌", IMPROVEMENT: "🚀", UNKNOWN: "❔", NO_CHANGE: "✅"}
WARN = "⚠️"
EXIT_PASS, EXIT_REGRESSION, EXIT_INPUT, EXIT_UNGATED = 0, 1, 2, 3
JSON_VERDICTS = {EXIT_PASS: "pass", EXIT_REGRESSION: REGRESSION, EXIT_INPUT: "incomplete", EXIT_UNGATED: "ungated"}


@dataclass
class Sources:
    """What was compared: the BASE and CAND paths, how many points each had, unreadable records."""

    base: str
    cand: str
    n_base: int = 0
    n_cand: int = 0
    errors: list[str] = field(default_factory=list)
    kinds: tuple[str, str] = ("records", "records")


def exit_code(result: GateResult, sources: Sources) -> int:
    """1 on a regression; else 2 when a record could not be read (the gate cannot vouch for a point it did not
    see: a corrupted record must not pass as "no regression"); else 3 when nothing was gated (no gated metric of
    any matched point got a regression, improvement or no-change verdict: a new runner or torch build makes every
    timing unknown, and that must not read as a pass) unless ``--allow-ungated``; else 0."""
    if result.regressions:
        return EXIT_REGRESSION
    if sources.errors:
        return EXIT_INPUT
    return EXIT_UNGATED if not result.decisive and not result.settings.allow_ungated else EXIT_PASS


def headline(result: GateResult, sources: Sources | None = None) -> str:
    """One line every consumer shows (terminal, Markdown, JSON, the dashboard): what the gate found, and that it
    is incomplete where records could not be read."""
    c = result.counts()
    n = len(result.points)
    if c[REGRESSION]:
        verdict = f"REGRESSION: {c[REGRESSION]} of {n} points regressed"
    elif not result.decisive:
        verdict = f"nothing gated: no {', '.join(result.gated_metrics())} verdict for any of the {n} matched points"
    else:
        verdict = "no regression"
    rest = ", ".join(f"{c[v]} {v}" for v in VERDICTS if v != REGRESSION)
    text = f"{verdict} ({rest}; {len(result.base_only)} only in BASE, {len(result.cand_only)} only in CAND)"
    if sources is not None and sources.errors:
        text += f"; incomplete: {len(sources.errors)} record(s) could not be read"
    return text


def mark(result: GateResult, sources: Sources) -> str:
    """❌ on a regression; ⚠️ when something was not gated (unreadable records, nothing gated, unknown or unmatched
    points); ✅ only when every point of both sides got a verdict and none regressed."""
    if result.regressions:
        return MARKS[REGRESSION]
    c = result.counts()
    partial = sources.errors or not result.decisive or c[UNKNOWN] or len(result.base_only) or len(result.cand_only)
    return WARN if partial else MARKS[NO_CHANGE]


def fmt(value: Any, metric: str = "") -> str:
    """A value in its metric's unit with 4 significant digits; '-' when missing."""
    if value is None or isinstance(value, str):
        return value or "-"
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    if math.isinf(value):  # measured: an overflowing perplexity
        return "inf" if value > 0 else "-inf"
    unit = METRICS[metric].unit if metric in METRICS else ""
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def _change(row: pd.Series) -> str:
    ch = row["change"]
    if ch in ("inf", "-inf"):  # a stored JSON document (strict JSON has no infinity)
        return "+inf" if ch == "inf" else "-inf"
    if not isinstance(ch, float) or math.isnan(ch):
        return "-"
    if math.isinf(ch):
        return "+inf" if ch > 0 else "-inf"
    return f"{ch:+.4f}" if row["mode"] == "absolute" else f"{ch:+.1%}"


def _p(p: Any) -> str:
    return f"{p:.2g}" if isinstance(p, float) and math.isfinite(p) else "-"


def verdict_table(rows: pd.DataFrame) -> list[list[str]]:
    """Cells of the verdict rows: verdict, point, metric, base, cand, change, p, reason."""
    return [
        [r["verdict"], r["label"], r["metric"], fmt(r["base"], r["metric"]), fmt(r["cand"], r["metric"]),
         _change(r), _p(r["p_value"]), r["reason"]]
        for _, r in rows.iterrows()
    ]  # fmt: skip


HEADERS = ["verdict", "point", "metric", "base", "cand", "change", "p", "reason"]


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    widths[-1] = 0  # the last column (reason) is not padded
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths[:-1]] + ["-" * 6]), *map(line, rows)])


def _unmatched_lines(result: GateResult) -> list[str]:
    out = []
    for side, df in (
        ("only in BASE (not in CAND)", result.base_only),
        ("only in CAND (not in BASE)", result.cand_only),
    ):
        for _, r in df.iterrows():
            status = "" if r.get("status") == "ok" else f" [{r.get('status')}]"
            out.append(f"{side}: {r['label']}{status}")
    return out


def render_terminal(result: GateResult, sources: Sources) -> str:
    """Every verdict row (most severe first), unmatched points, notes, and the headline last."""
    parts = [f"BASE {sources.base} ({sources.n_base} points) vs CAND {sources.cand} ({sources.n_cand} points)", ""]
    parts.append(_text_table(HEADERS, verdict_table(result.rows)) if len(result.rows) else "(no metric compared)")
    extra = _unmatched_lines(result) + [f"note: {n}" for n in result.notes]
    extra += [f"unreadable: {e}" for e in sources.errors]
    if extra:
        parts += ["", *extra]
    parts += ["", headline(result, sources)]
    if not result.decisive and not result.regressions:
        status = "exit status 0: --allow-ungated" if result.settings.allow_ungated else "exit status 3"
        parts.append(f"nothing gated: no gated metric of any matched point got a verdict ({status})")
    if sources.errors:
        parts.append(
            f"incomplete: {len(sources.errors)} record(s) could not be read (exit status 2 unless a regression)"
        )
    return "\n".join(parts) + "\n"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def _thresholds(result: GateResult) -> str:
    """Each gated metric's threshold as it applies (flags, file, built-in defaults), and the per-point rules."""
    th = result.settings.thresholds
    parts = []
    for name in result.settings.metrics:
        m = METRICS[name]
        t = th.get(m, {})
        parts.append(f"{name} {t:g} absolute" if m.kind == "absolute" else f"{name} {t:.1%}")
    return ", ".join(parts) + (f", {len(th.rules)} per-point rule(s)" if th.rules else "")


def settings_line(result: GateResult) -> str:
    """What a verdict needed, naming the tests the rows really used (U test, signed-rank when timed in turns, CIs
    only without raw samples), Holm when on, the history's noise floor, and every gated metric's threshold."""
    s = result.settings
    modes = set(result.rows["mode"]) if len(result.rows) else set()
    holm = " (Holm-corrected over all rank tests)" if s.correction == "holm" else ""
    tests = []
    if "samples" in modes:
        tests.append(f"the U test on the raw samples (p < {s.alpha:g}{holm}) and non-overlapping {s.confidence:.0%} "
                     "CIs of the medians")  # fmt: skip
    if "paired" in modes:
        tests.append(f"for points timed in turns, the signed-rank test on the per-round ratios (p < {s.alpha:g}{holm}) "
                     f"and a {s.confidence:.0%} CI of the median ratio that excludes 1")  # fmt: skip
    if "table" in modes:
        tests.append(f"without raw samples, non-overlapping {s.confidence:.0%} CIs of the medians (no rank test)")
    noise = f", raised to {s.noise_k:g}x each point's run-to-run spread in {s.history}" if s.history else ""
    need = "; ".join(tests) or "single values against their thresholds"
    return (
        f"Gated: {', '.join(s.metrics)}. A timed regression needs {need}, a change beyond the threshold "
        f"({_thresholds(result)}{noise}) and at least {s.min_samples} samples a side; a change beyond the "
        "threshold that the tests do not confirm is unknown (inconclusive: needs more samples)."
    )


def render_markdown(result: GateResult, sources: Sources) -> str:
    """The CI summary: headline, the regressions, improvements and unknowns, the rest folded away."""
    lines = [
        f"## {mark(result, sources)} LLM inference gate: {headline(result, sources)}",
        "",
        f"BASE `{sources.base}` ({sources.n_base} points, {sources.kinds[0]}) vs CAND `{sources.cand}` "
        f"({sources.n_cand} points, {sources.kinds[1]}). {settings_line(result)}",
        "",
    ]
    if result.unpaired:
        lines += [f"{WARN} **Unpaired:** BASE and CAND were timed in separate runs ({result.unpaired} timed "
                  "verdict(s)): drift between runs is not in the tests (see the notes).", ""]  # fmt: skip
    rows = result.rows
    shown = rows[rows["verdict"] != NO_CHANGE] if len(rows) else rows
    if len(shown):
        cells = [[f"{MARKS[r[0]]} {r[0]}", *r[1:]] for r in verdict_table(shown)]
        lines += _md_table(HEADERS, cells) + [""]
    quiet = rows[rows["verdict"] == NO_CHANGE] if len(rows) else rows
    if len(quiet):
        lines += [f"<details><summary>{len(quiet)} metric(s) with no change</summary>", ""]
        lines += _md_table(HEADERS, verdict_table(quiet)) + ["", "</details>", ""]
    unmatched = _unmatched_lines(result)
    if unmatched:
        lines += ["### Unmatched points", "", *[f"- {_md_cell(u)}" for u in unmatched], ""]
    notes = result.notes + [f"unreadable record: {e}" for e in sources.errors]
    if notes:
        lines += ["### Notes", "", *[f"- {_md_cell(n)}" for n in notes], ""]
    return "\n".join(lines)


def to_json(result: GateResult, sources: Sources) -> dict[str, Any]:
    """Everything, machine-readable: the verdict of each point and metric with its numbers. ``verdict`` follows
    the exit status (regression, incomplete, ungated, pass)."""
    code = exit_code(result, sources)
    return {
        "verdict": JSON_VERDICTS[code],
        "exit_code": code,
        "headline": headline(result, sources),
        "gated": result.decisive > 0,
        "unpaired": result.unpaired,
        "counts": result.counts(),
        "base": {"path": sources.base, "points": sources.n_base, "kind": sources.kinds[0]},
        "cand": {"path": sources.cand, "points": sources.n_cand, "kind": sources.kinds[1]},
        "unreadable": sources.errors,
        "settings": result.settings.to_dict(),
        "points": table_rows(result.points),
        "rows": table_rows(result.rows),
        "base_only": table_rows(result.base_only),
        "cand_only": table_rows(result.cand_only),
        "notes": result.notes,
    }
