"""The dashboard's HTML parts besides the charts: the filter bar (and the script that applies it to charts and
tables), the steps table, the latest gate verdicts and the list of stored sweeps. Every value is escaped."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from harness.dashboard.data import FILTER_COLUMNS, FILTER_KEYS, short_sha
from harness.dashboard.figures import change_text
from harness.gate_report import HEADERS as GATE_HEADERS
from harness.gate_report import verdict_table
from harness.report.tables import Markup, esc, fmt, table

FILTER_LABELS = {"device": "device", "model": "model", "variant": "variant", "batch": "batch"}

STYLE = """
#filters { position: sticky; top: 0; z-index: 20; box-shadow: 0 2px 6px rgba(0,0,0,.06); }
.filterbar { display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center; font-size: 0.9em; }
.filterbar select { margin-left: 4px; max-width: 360px; }
#steps tr.regression td:nth-child(2), #gate tr.regression td:nth-child(1) { color: #c62828; font-weight: 600; }
#steps tr.improvement td:nth-child(2), #gate tr.improvement td:nth-child(1) { color: #2e7d32; font-weight: 600; }
"""

# Filters hide the traces (and table rows) whose meta does not match; a click on a point opens its report.
SCRIPT = """
(function () {
  var KEYS = %s, TOTAL = %d;
  function selection() {
    var s = {};
    KEYS.forEach(function (k) { s[k] = document.getElementById("filter-" + k).value; });
    return s;
  }
  function matches(m, s) {
    return KEYS.every(function (k) { return s[k] === "" || String(m[k]) === s[k]; });
  }
  function trends() {
    return [].slice.call(document.querySelectorAll(".plot")).filter(function (gd) {
      return gd.layout && gd.layout.meta && gd.layout.meta.kind === "trend";
    });
  }
  function apply(redraw) {
    var s = selection(), shown = {};
    trends().forEach(function (gd) {
      var vis = gd.data.map(function (t) {
        var ok = !t.meta || matches(t.meta, s);
        if (ok && t.meta) shown[t.meta.series] = 1;
        return ok;
      });
      if (redraw) Plotly.restyle(gd, {visible: vis});
    });
    document.querySelectorAll("tr[data-series]").forEach(function (tr) { tr.hidden = !matches(tr.dataset, s); });
    document.getElementById("filter-count").textContent =
      Object.keys(shown).length + " of " + TOTAL + " series shown";
  }
  document.addEventListener("DOMContentLoaded", function () {
    KEYS.forEach(function (k) {
      document.getElementById("filter-" + k).addEventListener("change", function () { apply(true); });
    });
    trends().forEach(function (gd) {
      gd.on("plotly_click", function (ev) {
        var p = ev.points && ev.points[0], url = p && p.customdata && p.customdata[3];
        if (url) window.open(url, "_blank");
      });
    });
    apply(false);
  });
})();
"""


def filter_bar(data: pd.DataFrame) -> str:
    """One select per filter key (all values of the stored series), the count of series shown, and the script."""
    parts = []
    for key in FILTER_KEYS:
        values = sorted(data[FILTER_COLUMNS[key]].astype(str).unique())
        if key == "batch":
            values.sort(key=lambda v: (len(v), v))
        options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
        parts.append(
            f'<label>{esc(FILTER_LABELS[key])}<select id="filter-{key}" class="filter" data-key="{key}">'
            f'<option value="">all ({len(values)})</option>{options}</select></label>'
        )
    n = int(data["series"].nunique())
    parts.append(f'<span id="filter-count">{n} of {n} series shown</span>')
    script = SCRIPT % (json.dumps(list(FILTER_KEYS)), n)
    return f"<style>{STYLE}</style><div class='filterbar'>{''.join(parts)}</div><script>{script}</script>"


def _data_attrs(row: Any) -> str:
    return f' data-series="{esc(row["series"])}"' + "".join(f' data-{k}="{esc(row[k])}"' for k in FILTER_KEYS)


def _when(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if isinstance(t, pd.Timestamp) else "-"


def _link(text: str, url: str | None) -> Markup:
    return Markup(f'<a href="{esc(url)}">{esc(text)}</a>' if url else esc(text))


def steps_table(steps: pd.DataFrame, urls: dict[str, str]) -> str:
    """Every confirmed step, newest first: the last good and first bad commits (linked to their sweeps'
    reports), the levels before and after, the change, and the confidence."""
    headers = ["metric", "step", "series", "last good", "first bad", "before", "after", "change", "confidence",
               "size vs noise", "sweeps before / after"]  # fmt: skip
    body = []
    for _, r in steps.iterrows():
        cells = [
            r["metric"], r["kind"], r["series_label"],
            _link(f"{short_sha(r['last_good_sha'])} ({_when(r['last_good_t'])})", urls.get(r["last_good_sweep"])),
            _link(f"{short_sha(r['first_bad_sha'])} ({_when(r['first_bad_t'])})", urls.get(r["first_bad_sweep"])),
            fmt(r["before"]), fmt(r["after"]), change_text(r["change"], r["absolute"]),
            f"{1 - r['p_value']:.4f} (p={r['p_value']:.2g})", f"{r['z']:.1f}×", f"{r['n_before']} / {r['n_after']}",
        ]  # fmt: skip
        tds = "".join(f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in cells)
        body.append(f'<tr class="{esc(r["kind"])}"{_data_attrs(r)}>{tds}</tr>')
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def gate_section(doc: dict[str, Any]) -> str:
    """The latest `harness compare --json` verdicts: headline, then every verdict but "no change"."""
    rows = pd.DataFrame(doc.get("rows") or [])
    base, cand = (doc.get(side) if isinstance(doc.get(side), dict) else {} for side in ("base", "cand"))
    where = f"BASE {base.get('path', '?')} vs CAND {cand.get('path', '?')}"  # a hand-made file may lack them
    source = doc.get("_source")
    head = f"<p><b>{esc(doc.get('headline', ''))}</b></p><p class='note'>{esc(where)}"
    added = doc.get("_added_at")
    origin = f"stored {esc(added)}" if added else "given with --gate"  # a file on the command line was never stored
    head += f" (from {esc(source)}, {origin})</p>" if source else "</p>"
    if rows.empty or "verdict" not in rows.columns:
        return head + "<p class='note'>No metric was compared.</p>"
    shown = rows[rows["verdict"] != "no change"]
    quiet = len(rows) - len(shown)
    body = table(GATE_HEADERS, verdict_table(shown), [v.replace(" ", "-") for v in shown["verdict"]])
    return (
        head
        + (f"<div class='scroll'>{body}</div>" if len(shown) else "")
        + (f"<p class='note'>{quiet} metric(s) with no change not listed.</p>" if quiet else "")
    )


def never_measured_table(rows: pd.DataFrame, urls: dict[str, str]) -> str:
    """The points that no stored sweep measured in their environment, newest try first: how many sweeps tried,
    the latest status and error, and that sweep (linked to its report) and commit."""
    body = []
    for _, r in rows.iterrows():
        error = " ".join(str(r["error"]).split())[:200] if isinstance(r["error"], str) and r["error"] else "-"
        cells = [r["label"], r["status"], error, str(int(r["tries"])), _when(r["t"]), r["commit"],
                 _link(r["sweep_id"], urls.get(r["sweep_id"]))]  # fmt: skip
        tds = "".join(f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in cells)
        body.append(f"<tr{_data_attrs(r)}>{tds}</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in ("point", "latest status", "latest error", "sweeps tried",
                                                   "latest try (UTC)", "commit", "sweep (report)"))  # fmt: skip
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def sweeps_table(sweeps: pd.DataFrame, urls: dict[str, str]) -> str:
    """Every stored sweep, newest first, linked to its report when it exists."""
    rows = []
    for _, s in sweeps.iloc[::-1].iterrows():
        commit = short_sha(s["git_sha"]) + (" (dirty)" if s["git_dirty"] == 1 else "")
        rows.append([
            str(s["started_at"])[:19].replace("T", " "), commit,
            _link(s["id"], urls.get(s["id"])), s["fingerprint"] or "-", s["hostname"] or "-", s["device_name"] or "-",
            f"{s['n_ok']} / {s['n_points']}", s["source"],
        ])  # fmt: skip
    headers = ["started (UTC)", "commit", "sweep (report)", "fingerprint", "host", "device", "ok / points", "source"]
    return f"<details><summary>{len(rows)} sweeps</summary><div class='scroll'>{table(headers, rows)}</div></details>"


def header(db: str, sweeps: pd.DataFrame, data: pd.DataFrame, notes: Sequence[str]) -> str:
    first, last = (str(sweeps["started_at"].iloc[i])[:16].replace("T", " ") for i in (0, -1))
    items = [
        ("history", db),
        ("sweeps", f"{len(sweeps)} ({first} to {last} UTC), {sweeps['git_sha'].nunique()} commits"),
        ("series", f"{data['series'].nunique()} (point × environment fingerprint), {len(data)} measured points"),
        ("environments", ", ".join(sorted(data["fingerprint"].unique())) if len(data) else "-"),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return f"<dl class='meta'>{dl}</dl>" + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
