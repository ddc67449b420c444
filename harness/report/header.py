"""The report's header: device, CPU, versions, date, git SHA, the command of each sweep, how many points were
planned, measured, unreadable or never written, and the resolved config. Every value is HTML-escaped."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from harness.records import STATUSES
from harness.report.tables import Markup, esc, table

MAX_CONFIG_VALUES = 12


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict) and node:
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node if isinstance(node, str) else json.dumps(node)}


def config_table(records: Sequence[dict[str, Any]]) -> str:
    """Resolved config keys: the values shared by every point, the keys that vary across points, and the keys
    only some points have (an engine's parameters), with how many."""
    values: dict[str, dict[str, None]] = {}
    holders: dict[str, int] = {}
    for record in records:
        for key, value in _flatten(record.get("config") or {}).items():
            values.setdefault(key, {})[value] = None
            holders[key] = holders.get(key, 0) + 1
    if not values:
        return "<p class='note'>The records carry no config.</p>"
    rows = []
    for key in sorted(values):
        seen = list(values[key])
        shown = ", ".join(seen[:MAX_CONFIG_VALUES]) + (
            f", … ({len(seen)} values)" if len(seen) > MAX_CONFIG_VALUES else ""
        )
        held = "" if holders[key] == len(records) else f"in {holders[key]} of {len(records)} points"
        if held:
            rows.append([key, shown, held + ("; varies" if len(seen) > 1 else "")])
        else:
            rows.append([key, shown, "varies" if len(seen) > 1 else "same for all points"])
    return table(["config key", "value(s)", ""], rows)


def _distinct(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))))


def point_counts(df: pd.DataFrame, metas: Sequence[dict[str, Any]], unreadable: Sequence[str] = ()) -> str:
    """'8 planned: 6 ok, 1 unreadable, 1 missing': every status, the unreadable records and the planned points
    that left none (``missing`` of each sweep's metadata). Without a plan, the total of what was found."""
    counts = df["status"].value_counts()
    order = [s for s in STATUSES if s in counts] + sorted(s for s in counts.index if s not in STATUSES)
    parts = [f"{counts[s]} {s}" for s in order]
    missing = sum(len(m.get("missing") or []) for m in metas)
    parts += [f"{n} {what}" for n, what in ((len(unreadable), "unreadable"), (missing, "missing")) if n]
    total = len(df) + len(unreadable) + missing
    planned = sum(m.get("total") or len(m.get("points") or []) for m in metas)
    if planned == total:
        return f"{planned} planned: {', '.join(parts)}"
    return f"{total} ({', '.join(parts)})" + (f", {planned} planned by the sweep(s)" if planned else "")


def header(
    df: pd.DataFrame, records: Sequence[dict[str, Any]], metas: Sequence[dict[str, Any]], unreadable: Sequence[str] = ()
) -> str:
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
    items = [
        ("device", "; ".join(devices) or "-"),
        ("CPU", "; ".join(cpus) or "-"),
        ("started", "; ".join(dates) or "-"),
        ("git SHA", "; ".join(gits) or "not a git checkout"),
        ("command", Markup("<br>".join(f"<code>{esc(c)}</code>" for c in commands) or "-")),
        ("points", point_counts(df, metas, unreadable)),
        ("versions", ", ".join(f"{k} {' / '.join(v)}" for k, v in versions.items()) or "-"),
    ]
    warnings = _distinct(m.get("parallel_warning") for m in metas)  # a launcher ran points at the same time
    if warnings:
        items.append(("warning", "; ".join(warnings)))
    body = "".join(f"<dt>{esc(k)}</dt><dd>{v if isinstance(v, Markup) else esc(v)}</dd>" for k, v in items)
    return f"<dl class='meta'>{body}</dl>"
