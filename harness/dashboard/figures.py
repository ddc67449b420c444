"""Trend charts: one figure per metric, one line per series over the sweeps' start times, the 95% CI of the
median as a band, and the confirmed steps as markers (red up/down triangles: regressions, green: improvements).

Points a series did not measure (failed, oom, timeout, skipped) are ✕ markers on its line; a dashed vertical line
marks where each further environment fingerprint is first measured, and grey ticks along the bottom where the
measured commit changes (its SHA in the hover), so a step reads against the commits around it; quality figures
scored on other inputs (``quality_inputs``) are separate lines. A timing an engine marked unrepresentative is an
open marker on a dotted line of its own sweeps beside its series' solid one (the whole series dotted only when none
is representative).

Every trace carries ``meta`` (series, device, model, variant, batch) for the page's filters; every point carries
its commit, sweep and report link in ``customdata`` (a click opens the report). Text from configs and records
(labels, commits, errors) is HTML-escaped with the report's ``esc``, and its colours and layout are the report's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from harness.dashboard.data import FILTER_COLUMNS, Trend, short_sha
from harness.gate_settings import METRICS
from harness.report.figures import NOT_REPR, PALETTE, esc
from harness.report.tables import interval_note

STEP_COLORS = {"regression": "#c62828", "improvement": "#2e7d32"}
HEIGHT = 520


def series_colors(series: list[str]) -> dict[str, str]:
    """One colour per series, the same on every chart."""
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(series))}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _meta(row: pd.Series) -> dict[str, str]:
    return {"series": str(row["series"]), **{k: str(row[c]) for k, c in FILTER_COLUMNS.items()}}


def _iso(t: pd.Series) -> list[str]:
    return [_iso_one(x) for x in t]


def _iso_one(t: pd.Timestamp) -> str:
    """A time for the x axis, to the microsecond where it has one: sweeps started within one second (run
    folders are named to the microsecond) keep their own positions and order."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f" if t.microsecond else "%Y-%m-%dT%H:%M:%S")


def trend(
    data: pd.DataFrame, spec: Trend, steps: pd.DataFrame, colors: dict[str, str], urls: dict[str, str],
    failed: pd.DataFrame | None = None,
) -> go.Figure | None:  # fmt: skip
    """The chart of ``spec.column`` for every series of ``data`` (``data.history_frame``), or None when no
    stored point measured it. ``urls``: sweep id -> link to its report; ``failed``: the series' points that were
    not measured (``data.failed_points``), marked ✕ on their line."""
    d = data[np.isfinite(data[spec.column].to_numpy(dtype=float))]
    if d.empty:
        return None
    marks = steps[steps["metric"].eq(spec.steps_of)] if len(steps) else steps
    fig = go.Figure()
    for sid, g in d.groupby("series", sort=False):
        first = g.iloc[0]
        meta, color = _meta(first), colors[sid]
        # memory and quality are not timings; a timing is judged per sweep: only the sweeps an engine marked
        # unrepresentative are dotted (the series is named so only when all of them are)
        unrep = ~g["representative"].to_numpy(dtype=bool) if spec.timed else np.zeros(len(g), dtype=bool)
        everywhere = bool(unrep.all())
        name = esc(first["series_label"]) + (f" ({NOT_REPR})" if everywhere else "")
        solid = np.ones(len(g), dtype=bool) if everywhere else ~unrep  # the points of the series' own line
        x, y = _iso(g["t"]), g[spec.column].to_numpy(dtype=float)
        error_y = None
        if spec.ci is not None:
            lo, hi = (g[c].to_numpy(dtype=float) for c in spec.ci)
            ok = np.isfinite(lo) & np.isfinite(hi)
            band = ok & solid if (ok & solid).sum() > 1 else np.zeros(len(g), dtype=bool)
            if band.any():
                xs = [v for v, k in zip(x, band, strict=True) if k]
                fig.add_trace(go.Scatter(
                    x=xs + xs[::-1], y=np.r_[hi[band], lo[band][::-1]], mode="lines", fill="toself",
                    fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip", showlegend=False,
                    legendgroup=sid, meta=meta, name=f"{name} (CI)",
                ))  # fmt: skip
            bar = ok & ~band  # a point with a CI outside the band (a lone one, an unrepresentative one): an error bar
            if bar.any():
                error_y = {"type": "data", "array": np.where(bar, hi - y, np.nan),
                           "arrayminus": np.where(bar, y - lo, np.nan), "color": color, "thickness": 1.2}  # fmt: skip
        else:
            lo = hi = np.full(len(g), np.nan)
        ci_text = _ci_text(g, spec, lo, hi)
        link = [urls.get(s, "") for s in g["sweep_id"]]
        custom = np.stack([g["commit"].map(esc).to_numpy(), g["sweep_id"].map(esc).to_numpy(), ci_text, link], axis=1)
        caveats = _caveat_text(g)
        text = np.array([(c if u else "") + ("<br>click: open the sweep's report" if h else "")
                         for c, u, h in zip(caveats, unrep, link, strict=True)], dtype=object)  # fmt: skip
        pts = {"x": np.array(x, dtype=object), "y": y, "customdata": custom, "text": text, "error_y": error_y}
        trace = {"legendgroup": sid, "meta": meta, "color": color, "y_title": spec.y_title}
        # quality figures scored on other inputs (quality_inputs) are never joined: one line per segment
        segments = g["quality_segment"].to_numpy() if METRICS[spec.steps_of].quality else np.zeros(len(g), int)
        for n, seg in enumerate(dict.fromkeys(segments[solid])):
            _line(fig, pts, solid & (segments == seg), name, n == 0, everywhere, _INPUTS_CHANGED if n else "", **trace)
        if not everywhere:  # each run of unrepresentative sweeps: a dotted line of open markers beside the line
            runs = np.cumsum(np.r_[True, unrep[1:] != unrep[:-1]])
            for run in dict.fromkeys(runs[unrep]):
                _line(fig, pts, unrep & (runs == run), f"{name}: {NOT_REPR}", False, True, **trace)
        if failed is not None and len(failed):
            _failed_trace(fig, failed[failed["series"].eq(sid)], g[solid], y[solid], name, sid, meta, urls)
        mine = marks[marks["series"].eq(sid)] if len(marks) else marks
        if len(mine):
            by_sweep = dict(zip(g["sweep_id"], y, strict=True))
            at = mine[mine["first_bad_sweep"].isin(list(by_sweep))]
            if len(at):
                pairs = zip(at["first_bad_sweep"], at["last_good_sweep"], strict=True)
                up = [by_sweep[s] >= by_sweep.get(p, by_sweep[s]) for s, p in pairs]
                fig.add_trace(go.Scatter(
                    x=_iso(at["first_bad_t"]), y=[by_sweep[s] for s in at["first_bad_sweep"]], mode="markers",
                    name=f"{name}: steps", legendgroup=sid, showlegend=False, meta=meta,
                    marker={"size": 15, "symbol": ["triangle-up" if u else "triangle-down" for u in up],
                            "color": [STEP_COLORS[k] for k in at["kind"]], "line": {"width": 1, "color": "#fff"}},
                    text=[step_text(r) for _, r in at.iterrows()],
                    hovertemplate="%{text}<extra></extra>",
                ))  # fmt: skip
    _environment_marks(fig, d)
    fig.update_xaxes(type="date", title_text="sweep start (UTC)")
    fig.update_yaxes(title_text=esc(spec.y_title), type="log" if spec.log_y else "linear")
    _commit_marks(fig, d)  # after the y axis settings, which would apply to its axis too
    band = "95% CI of the median; " if spec.ci is not None else ""
    fig.update_layout(
        title={"text": esc(f"{spec.title} over time ({band}▲▼ confirmed steps)"), "x": 0.01},
        template="plotly_white", height=HEIGHT, hovermode="closest", meta={"kind": "trend", "metric": spec.id},
        margin={"l": 70, "r": 20, "t": 60, "b": 50}, legend={"font": {"size": 11}}, hoverlabel={"align": "left"},
    )  # fmt: skip
    return fig


def _line(
    fig: go.Figure, pts: dict, at: np.ndarray, name: str, showlegend: bool, dotted: bool, first_text: str = "", *,
    legendgroup: str, meta: dict[str, str], color: str, y_title: str,
) -> None:  # fmt: skip
    """One line over the points ``at`` of a series (``pts``: its per-point x, y, customdata, text and error_y),
    solid with filled markers, or dotted with open ones."""
    text = list(pts["text"][at])
    text[0] = first_text + text[0]
    error_y = pts["error_y"]
    fig.add_trace(go.Scatter(
        x=list(pts["x"][at]), y=pts["y"][at], mode="lines+markers", name=name, legendgroup=legendgroup,
        showlegend=showlegend, meta=meta, customdata=pts["customdata"][at], text=text,
        error_y=None if error_y is None else {**error_y, "array": error_y["array"][at],
                                              "arrayminus": error_y["arrayminus"][at]},
        line={"color": color, "width": 1.6, "dash": "dot" if dotted else "solid"},
        marker={"size": 7 if dotted else 5, "symbol": "circle-open" if dotted else "circle"},
        hovertemplate=f"%{{fullData.name}}<br>%{{x|%Y-%m-%d %H:%M}} · commit %{{customdata[0]}}<br>"
        f"{esc(y_title)} %{{y:.4g}}<br>CI %{{customdata[2]}}<br>sweep %{{customdata[1]}}%{{text}}<extra></extra>",
    ))  # fmt: skip


_INPUTS_CHANGED = "<br><b>quality scored on other inputs from here</b> (quality.* settings, seed or corpus)"
FAILED_COLOR = "#6d4c41"


def _failed_trace(fig: go.Figure, bad: pd.DataFrame, g: pd.DataFrame, y: np.ndarray, name: str, sid: str,
                  meta: dict[str, str], urls: dict[str, str]) -> None:  # fmt: skip
    """✕ markers where the series was not measured (failed, oom, timeout, skipped), at the level of its latest
    point before (or its first after): a point that stopped working is not a gap nobody sees."""
    if bad.empty:
        return
    utc = [t.dt.tz_convert(None).to_numpy() for t in (g["t"], bad["t"])]
    before = np.searchsorted(utc[0], utc[1], side="right") - 1
    level = y[np.clip(before, 0, len(y) - 1)]
    link = [urls.get(s, "") for s in bad["sweep_id"]]
    errors = [esc(" ".join(str(e).split())[:160]) if isinstance(e, str) and e else "-" for e in bad["error"]]
    custom = np.stack([bad["commit"].map(esc).to_numpy(), bad["sweep_id"].map(esc).to_numpy(),
                       bad["status"].map(esc).to_numpy(), link, errors], axis=1)  # fmt: skip
    fig.add_trace(go.Scatter(
        x=_iso(bad["t"]), y=level, mode="markers", name=f"{name}: not measured", legendgroup=sid, showlegend=False,
        meta=meta, customdata=custom, text=["<br>click: open the sweep's report" if u else "" for u in link],
        marker={"size": 10, "symbol": "x", "color": FAILED_COLOR, "line": {"width": 1, "color": "#fff"}},
        hovertemplate="%{fullData.name}<br><b>%{customdata[2]}</b>: %{customdata[4]}<br>%{x|%Y-%m-%d %H:%M} · "
        "commit %{customdata[0]}<br>sweep %{customdata[1]}%{text}<extra></extra>",
    ))  # fmt: skip


def _environment_marks(fig: go.Figure, data: pd.DataFrame) -> None:
    """A dashed vertical line where each environment fingerprint after the first is first measured: the lines of
    another machine or software stack start there (they are never joined to the earlier ones)."""
    firsts = data.groupby("fingerprint")["t"].min().sort_values()
    for fp, t in list(firsts.items())[1:]:
        x = _iso_one(t)
        fig.add_shape(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                      line={"color": "#888", "width": 1, "dash": "dash"})  # fmt: skip
        fig.add_annotation(x=x, xref="x", y=1, yref="paper", yanchor="bottom", showarrow=False,
                           text=esc(f"env {str(fp)[:8]}"), font={"size": 10, "color": "#666"})  # fmt: skip


COMMIT_COLOR = "#757575"


def _commit_marks(fig: go.Figure, data: pd.DataFrame) -> None:
    """A tick along the bottom of the chart at each sweep whose measured commit differs from the sweep before
    (the first sweep too), on a hidden axis of its own: with the time axis, where each commit starts. Nothing
    where every sweep measured one commit. The trace has no ``meta``, so the filters never hide it."""
    sweeps = data.drop_duplicates("sweep_id").sort_values(["t", "sweep_id"])
    if sweeps["commit"].nunique() < 2:
        return
    changed = sweeps[sweeps["commit"].ne(sweeps["commit"].shift())]
    runs = np.cumsum(sweeps["commit"].ne(sweeps["commit"].shift()).to_numpy())
    n_sweeps = np.bincount(runs)[1:]
    text = [f"commit {esc(c)} from here<br>first sweep {esc(sid)} · {k} sweep{'s' if k > 1 else ''} of it in a row"
            for c, sid, k in zip(changed["commit"], changed["sweep_id"], n_sweeps, strict=True)]  # fmt: skip
    fig.add_trace(go.Scatter(
        x=_iso(changed["t"]), y=np.full(len(changed), 0.02), yaxis="y2", mode="markers", name="commits",
        showlegend=False, cliponaxis=False, text=text, hovertemplate="%{text}<br>%{x|%Y-%m-%d %H:%M}<extra></extra>",
        marker={"symbol": "line-ns-open", "size": 12, "color": COMMIT_COLOR, "line": {"width": 1.5}},
    ))  # fmt: skip
    fig.update_layout(yaxis2={"overlaying": "y", "type": "linear", "range": [0, 1], "visible": False,
                              "fixedrange": True})  # fmt: skip


def _caveat_text(g: pd.DataFrame) -> list[str]:
    """Each point's hover line saying why its timing is not representative (the record's caveat, escaped)."""
    caveats = g["timing_caveat"] if "timing_caveat" in g else pd.Series(None, index=g.index)
    return [f"<br>{NOT_REPR}: {esc(c)}" if isinstance(c, str) and c else f"<br>{NOT_REPR}" for c in caveats]


def _ci_text(g: pd.DataFrame, spec: Trend, lo: np.ndarray, hi: np.ndarray) -> list[str]:
    """Each point's CI for the hover: '1.2 to 1.4 (95%)', or where fewer than 6 samples make it the sample
    range, its real coverage: '1.2 to 1.4 (75% CI: the range of n=3)'; '-' without one."""
    cov, n = (g.get(f"{spec.steps_of}_{k}", pd.Series(np.nan, index=g.index)) for k in ("ci_coverage", "n"))
    out = []
    for a, b, c, k in zip(lo, hi, cov, n, strict=True):
        note = interval_note(c, k) or "(95%)"
        out.append(f"{a:.4g} to {b:.4g} {note}" if np.isfinite(a + b) else "-")
    return out


def change_text(change: float, absolute: bool) -> str:
    return f"{change:+.4f}" if absolute else f"{change:+.1%}"


def step_text(r: pd.Series) -> str:
    """Hover text of a step marker (escaped)."""
    return (
        f"<b>{r['kind']}</b> {esc(r['metric'])} {change_text(r['change'], r['absolute'])} "
        f"({r['before']:.4g} → {r['after']:.4g})<br>{esc(r['series_label'])}<br>"
        f"last good {esc(short_sha(r['last_good_sha']))}, first bad {esc(short_sha(r['first_bad_sha']))}<br>"
        f"confidence {1 - r['p_value']:.4f} (p={r['p_value']:.2g}), {r['z']:.1f}× the noise"
    )
