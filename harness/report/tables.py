"""The report's tables and header as HTML fragments. Every value is HTML-escaped here: config values, variant
names and error messages are user text."""

from __future__ import annotations

import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd

from harness.report.data import BASELINE, NO_GAIN_BAND, ranked

NOT_RANKED = "timing not representative"
MAX_CONFIG_VALUES = 12


class Markup(str):
    """An HTML fragment built from escaped parts."""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, suffix: str = "") -> str:
    """Numbers with 4 significant digits (thousands separated), '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating) and math.isinf(value):  # measured, e.g. an overflowing perplexity
        return "inf" if value > 0 else "-inf"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | float | np.number):
        v = float(value)
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return text + suffix
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], classes: Iterable[str] | None = None) -> str:
    """An HTML table; cells are escaped unless given as ``Markup`` (already-escaped fragments)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row, cls in zip(rows, classes or repeat(""), strict=False):
        cells = "".join(f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in row)
        body.append(f'<tr class="{esc(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def speedup(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _ci(row: pd.Series, metric: str) -> str:
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(row.get(f"{metric}_p50"))
    return f"{fmt(row.get(f'{metric}_p50'))} [{fmt(lo)}, {fmt(hi)}]"


def verdict(row: pd.Series) -> str:
    """'no gain [0.944, 1.17]': what the TPOT ratio over eager says, with its 95% CI where known."""
    v = row.get("verdict")
    if not isinstance(v, str):
        return "-"
    lo, hi = row.get("speedup_tpot_ci_low"), row.get("speedup_tpot_ci_high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return v
    return f"{v} [{lo:.3g}, {hi:.3g}]"


def verdict_note(df: pd.DataFrame) -> str:
    """One line per verdict other than faster, naming the variants it applies to (the optimizations that did
    not pay on this workload), and how the verdicts are decided."""
    ok = df[df["status"].eq("ok") & df["verdict"].notna()] if "verdict" in df else df.iloc[:0]
    lines = []
    for v, why in (("no gain", f"TPOT within ±{NO_GAIN_BAND:.0%} of eager"), ("slower", "TPOT ratio below 1"),
                   ("uncertain", "the ratio's 95% CI contains 1")):  # fmt: skip
        rows = ok[ok["verdict"].eq(v)].sort_values(["scenario", "batch_size", "variant"])
        if len(rows):
            items = "; ".join(f"{esc(r['variant'])} on {esc(r['scenario'])} b{fmt(r['batch_size'])} "
                              f"{speedup(r['speedup_tpot'])}" for _, r in rows.iterrows())  # fmt: skip
            lines.append(f"<li><b>{esc(v)}</b> ({esc(why)}): {items}</li>")
    if not lines:
        return ""
    return f"<ul class='verdicts'>{''.join(lines)}</ul>"


def _caveat(row: pd.Series) -> str:
    caveat = row.get("timing_caveat")
    return f"{NOT_RANKED}: {caveat}" if isinstance(caveat, str) and caveat else NOT_RANKED


def summary_table(df: pd.DataFrame) -> str:
    """Best variant (lowest TPOT p50 among representative timings) per scenario and batch, with its speedups
    vs eager; variants whose timings cannot be ranked are listed beside it, never chosen."""
    ok = df[df["status"].eq("ok")]
    if ok.empty:
        return "<p class='note'>No point was measured successfully.</p>"
    candidates = ranked(df)
    rows = []
    for (scenario, batch), group in ok.groupby(["scenario", "batch_size"], sort=True):
        pool = candidates[candidates["scenario"].eq(scenario) & candidates["batch_size"].eq(batch)]
        unranked = group[~group["representative"]]
        note = "; ".join(f"{r['variant']} {speedup(r['speedup_tpot'])} ({_caveat(r)})" for _, r in unranked.iterrows())
        if pool.empty:
            rows.append([scenario, fmt(batch), "-", "-", "-", "-", "-", "-", "-", "-", note or "-"])
            continue
        best = pool.loc[pool["tpot_ms_p50"].idxmin()]
        rows.append(
            [
                scenario,
                fmt(batch),
                best["variant"],
                _ci(best, "tpot_ms"),
                fmt(best["eager_tpot_ms_p50"]),
                speedup(best["speedup_tpot"]) + (f" ({best['verdict']})" if isinstance(best["verdict"], str) else ""),
                speedup(best["speedup_ttft"]),
                fmt(best["decode_tokens_per_s"]),
                fmt(best.get("fidelity_top1")),
                _ppl_cost(best, ok),
                note or "-",
            ]
        )
    headers = [
        "scenario",
        "batch",
        "best variant",
        "TPOT p50 ms [95% CI]",
        "eager TPOT p50 ms",
        "TPOT speedup",
        "TTFT speedup",
        "decode tok/s",
        "top-1 agreement with eager",
        "perplexity (eager)",
        f"not ranked ({NOT_RANKED})",
    ]
    return table(headers, rows)


def _ppl_cost(best: pd.Series, ok: pd.DataFrame) -> str:
    """The best variant's held-out perplexity next to eager's in the same scenario (the same weights, seed and
    shape: what the speed costs)."""
    ppl = best.get("ppl")
    if ppl is None or not np.isfinite(ppl):
        return "-"
    base = ok[ok["variant"].eq("eager") & ok["scenario"].eq(best["scenario"])]["ppl"].dropna()
    return f"{fmt(ppl)} ({fmt(base.iloc[0])})" if len(base) else fmt(ppl)


def points_table(df: pd.DataFrame) -> str:
    """Every measured point with its main numbers; non-representative timings are greyed and say why."""
    ok = df[df["status"].eq("ok")].sort_values(["scenario", "variant", "batch_size"])
    rows, classes = [], []
    for _, r in ok.iterrows():
        notes = [] if r["representative"] else [_caveat(r)]
        if r.get("noisy") is True:
            notes.append("noisy (IQR/median > 10%)")
        if r.get("drifting") is True:
            notes.append("drifting (the timings trend through the window: its median stands for neither end)")
        nonfinite = r.get("fidelity_nonfinite")
        if isinstance(nonfinite, float) and nonfinite > 0:
            notes.append(f"NaN/inf logits at {nonfinite:.2%} of the quality positions (KL, perplexity not numbers)")
        rows.append(
            [
                r["scenario"],
                r["variant"],
                fmt(r["batch_size"]),
                _ci(r, "ttft_ms"),
                _ci(r, "tpot_ms"),
                fmt(r["decode_tokens_per_s"]),
                speedup(r["speedup_tpot"]),
                verdict(r),
                "-" if r["variant"] == BASELINE else speedup(r.get("bytes_speedup")),
                fmt(r["peak_memory_mb"]),
                _top1(r),
                fmt(r.get("fidelity_kl")),
                fmt(r.get("ppl")),
                fmt(r["n_reps"]),
                r.get("stop_reason") or "-",
                "; ".join(notes) or "-",
            ]
        )
        classes.append("" if r["representative"] else "nr")
    headers = [
        "scenario",
        "variant",
        "batch",
        "TTFT p50 ms [95% CI]",
        "TPOT p50 ms [95% CI]",
        "decode tok/s",
        "TPOT speedup",
        "vs eager [95% CI]",
        "memory-traffic bound (eager's decode bytes / the variant's)",
        "peak memory MB",
        "top-1 agreement with eager (on decode steps)",
        "KL(eager ‖ variant) nats/token",
        "perplexity",
        "n",
        "stopped by",
        "notes",
    ]
    return table(headers, rows, classes)


def _top1(row: pd.Series) -> str:
    """Top-1 agreement over every scored position, and over those fed one token at a time through the KV cache."""
    overall, decode = fmt(row.get("fidelity_top1")), row.get("fidelity_top1_decode")
    return f"{overall} ({fmt(decode)})" if isinstance(decode, float) and math.isfinite(decode) else overall


def failed_table(df: pd.DataFrame, unreadable: Sequence[str] = (), missing: Sequence[dict[str, Any]] = ()) -> str:
    """Every point that did not measure (failed, skipped, oom, timeout), every unreadable record, and every point
    a sweep planned that left no record at all (its process died, or the sweep was stopped), with why."""
    bad = df[~df["status"].eq("ok")].sort_values(["status", "scenario", "variant", "batch_size"])
    rows = [
        [r["status"], r["variant"], r["scenario"], fmt(r["batch_size"]), r["error"] or "-", r["record_path"]]
        for _, r in bad.iterrows()
    ]
    rows += [["unreadable", "-", "-", "-", msg, msg.split(":", 1)[0]] for msg in unreadable]
    why = "no record: the process running it ended before writing one, or the sweep was stopped"
    rows += [["missing", " ".join(m["overrides"]), "-", "-", why, f"job {m['job']}"] for m in missing]
    if not rows:
        return "<p class='note'>Every point was measured: none failed or was skipped.</p>"
    return table(["status", "variant", "scenario", "batch", "reason", "record"], rows, ["bad"] * len(rows))


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict) and node:
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node if isinstance(node, str) else json.dumps(node)}


def config_table(records: Sequence[dict[str, Any]]) -> str:
    """Resolved config keys: the values shared by every point, then the keys that vary across points."""
    values: dict[str, dict[str, None]] = {}
    for record in records:
        for key, value in _flatten(record.get("config") or {}).items():
            values.setdefault(key, {})[value] = None
    if not values:
        return "<p class='note'>The records carry no config.</p>"
    rows = []
    for key in sorted(values):
        seen = list(values[key])
        shown = ", ".join(seen[:MAX_CONFIG_VALUES]) + (
            f", … ({len(seen)} values)" if len(seen) > MAX_CONFIG_VALUES else ""
        )
        rows.append([key, shown, "varies" if len(seen) > 1 else "same for all points"])
    return table(["config key", "value(s)", ""], rows)


def _distinct(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))))


def header(df: pd.DataFrame, records: Sequence[dict[str, Any]], metas: Sequence[dict[str, Any]]) -> str:
    """Device, versions, date, git SHA and the command of each sweep: what a reader needs to trust the numbers."""
    envs = [r.get("env") or {} for r in records]
    devices = _distinct(f"{e.get('device_type', '?')}: {e.get('device_name', '?')}" for e in envs)
    cpus = _distinct(e.get("cpu_model") for e in envs)
    versions: dict[str, list[str]] = {}
    for e in envs:
        for package, version in {"python": e.get("python"), **(e.get("versions") or {})}.items():
            if version:
                versions.setdefault(package, [])
                if str(version) not in versions[package]:
                    versions[package].append(str(version))
    gits = _distinct(
        f"{(e.get('git') or {}).get('sha')}{' (dirty)' if (e.get('git') or {}).get('dirty') else ''}"
        for e in envs
        if (e.get("git") or {}).get("sha")
    )
    commands = [shlex.join(m["command"]) for m in metas if m.get("command")]
    if not commands:
        commands = _distinct(
            shlex.join(["harness", "run", *((r.get("sweep") or {}).get("overrides") or [])]) for r in records
        )
    dates = [m["started_at"] for m in metas if m.get("started_at")] or sorted(_distinct(df["started_at"]))[:1]
    counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    items = [
        ("device", "; ".join(devices) or "-"),
        ("CPU", "; ".join(cpus) or "-"),
        ("started", "; ".join(dates) or "-"),
        ("git SHA", "; ".join(gits) or "not a git checkout"),
        ("command", Markup("<br>".join(f"<code>{esc(c)}</code>" for c in commands) or "-")),
        ("points", f"{len(df)} ({counts})"),
        ("versions", ", ".join(f"{k} {' / '.join(v)}" for k, v in versions.items()) or "-"),
    ]
    body = "".join(f"<dt>{esc(k)}</dt><dd>{v if isinstance(v, Markup) else esc(v)}</dd>" for k, v in items)
    return f"<dl class='meta'>{body}</dl>"
