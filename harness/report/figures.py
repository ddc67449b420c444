"""The report's figures: pure functions of the prepared table (``data.prepare``) returning plotly Figures, or
None when the sweep holds nothing to draw.

Text that comes from configs (variant, model, labels) is HTML-escaped before it reaches plotly, which renders a
subset of HTML tags in text. Points whose timings are not representative are drawn (dotted, hollow, uncoloured
in heatmaps) but never marked best and never on the Pareto front.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from harness.report.data import PROFILE_CATEGORIES, best_per_batch, pareto_front

PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
NOT_REPR = "timing not representative"
QUALITY_METRICS = (  # (column, axis title, higher is better), in order of preference
    ("ppl", "perplexity on held-out text (lower is better)", False),
    ("fidelity_top1", "top-1 agreement with eager (higher is better)", True),
    ("fidelity_kl", "KL(eager ‖ engine), nats/token (lower is better)", False),
)
FACET_COLS = 2
FACET_ROW_PX = 330


def esc(value: object) -> str:
    return html.escape(str(value), quote=False)


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """One colour per variant, the same in every figure of the report."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(map(str, variants))))}


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title={"text": esc(title), "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"font": {"size": 11}},
        hoverlabel={"align": "left"},
    )
    return fig


def _grid(titles: list[str], heights: list[int] | None = None) -> tuple[go.Figure, list[tuple[int, int]]]:
    """Subplots, one per facet, FACET_COLS wide; returns the figure and each facet's (row, col)."""
    cols = min(FACET_COLS, len(titles))
    rows = math.ceil(len(titles) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[esc(t) for t in titles],
        vertical_spacing=min(0.12, 0.6 / rows),
        horizontal_spacing=0.14 if cols > 1 else 0.02,
        row_heights=heights,
    )
    return fig, [(i // cols + 1, i % cols + 1) for i in range(len(titles))]


def _hover(df: pd.DataFrame, value: str) -> tuple[np.ndarray, str]:
    caveat = df["timing_caveat"].where(~df["representative"], "").fillna("").map(esc)
    custom = np.stack([df["n_reps"].fillna(0).astype(int).to_numpy(), caveat.to_numpy()], axis=1)
    template = (
        f"%{{fullData.name}}<br>batch %{{x}}<br>{value}<br>n=%{{customdata[0]}}<br>%{{customdata[1]}}<extra></extra>"
    )
    return custom, template


def by_batch(
    df: pd.DataFrame,
    y: str,
    title: str,
    y_title: str,
    ci: tuple[str, str] | None = None,
    kind: str = "line",
) -> go.Figure | None:
    """``y`` against batch size, one facet per scenario, one trace per variant (lines, or grouped bars with
    ``kind="bar"``), with asymmetric error bars from the ``ci`` columns. Serves TTFT, TPOT, throughput, memory."""
    data = df[df["status"].eq("ok") & np.isfinite(df[y])]
    if data.empty:
        return None
    colors = variant_colors(df["variant"])
    scenarios = sorted(data["scenario"].unique())
    fig, cells = _grid(scenarios)
    shown: set[tuple[str, bool]] = set()
    for scenario, (row, col) in zip(scenarios, cells, strict=True):
        part = data[data["scenario"].eq(scenario)]
        for (variant, rep), g in part.groupby(["variant", "representative"], sort=True):
            g = g.sort_values("batch_size")
            name = esc(variant) + ("" if rep else f" ({NOT_REPR})")
            error = None
            if ci is not None:
                lo, hi = g[ci[0]].to_numpy(float), g[ci[1]].to_numpy(float)
                yv = g[y].to_numpy(float)
                error = {"type": "data", "symmetric": False, "array": hi - yv, "arrayminus": yv - lo}
            custom, template = _hover(g, f"{esc(y_title)} %{{y:.4g}}")
            common = {
                "x": g["batch_size"].to_numpy() if kind == "line" else g["batch_size"].map(str).to_numpy(),
                "y": g[y].to_numpy(float),
                "name": name,
                "legendgroup": name,
                "showlegend": (variant, rep) not in shown,
                "error_y": error,
                "customdata": custom,
                "hovertemplate": template,
            }
            shown.add((variant, rep))
            color = colors[str(variant)]
            if kind == "bar":
                trace = go.Bar(**common, marker={"color": color, "opacity": 1.0 if rep else 0.35})
            else:
                trace = go.Scatter(
                    **common,
                    mode="lines+markers",
                    line={"color": color, "dash": "solid" if rep else "dot"},
                    marker={"symbol": "circle" if rep else "circle-open", "size": 8},
                )
            fig.add_trace(trace, row=row, col=col)
    if kind == "line":
        batches = sorted(data["batch_size"].unique())
        fig.update_xaxes(type="log", tickvals=batches, ticktext=[str(int(b)) for b in batches])
    else:
        fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="batch size")
    fig.update_yaxes(title_text=esc(y_title), rangemode="tozero")
    return _layout(fig, title, 90 + FACET_ROW_PX * math.ceil(len(scenarios) / FACET_COLS))


def speedup_heatmap(df: pd.DataFrame) -> go.Figure | None:
    """TPOT speedup vs eager, variant x batch, one heatmap per scenario on one shared colour scale (1 = eager).
    ★ marks the fastest representative variant of a batch; † a timing that is shown but not ranked (uncoloured)."""
    data = df[np.isfinite(df["speedup_tpot"])]
    if data.empty:
        return None
    scenarios = sorted(data["scenario"].unique())
    best = set(best_per_batch(df)["record_path"])
    sizes = [data[data["scenario"].eq(s)]["variant"].nunique() for s in scenarios]
    fig, cells = _grid(scenarios)
    for scenario, (row, col) in zip(scenarios, cells, strict=True):
        part = data[data["scenario"].eq(scenario)]
        variants = sorted(part["variant"].unique())
        batches = sorted(part["batch_size"].unique())
        z = np.full((len(variants), len(batches)), np.nan)
        text = [["" for _ in batches] for _ in variants]
        for _, r in part.iterrows():
            i, j = variants.index(r["variant"]), batches.index(r["batch_size"])
            mark = " ★" if r["record_path"] in best else ("" if r["representative"] else " †")
            text[i][j] = f"{r['speedup_tpot']:.2f}×{mark}"
            if r["representative"]:
                z[i, j] = r["speedup_tpot"]
        fig.add_trace(
            go.Heatmap(
                x=[str(int(b)) for b in batches],
                y=[esc(v) for v in variants],
                z=z,
                text=text,
                texttemplate="%{text}",
                coloraxis="coloraxis",
                xgap=2,
                ygap=2,
                hovertemplate="%{y}<br>batch %{x}<br>TPOT speedup vs eager %{text}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_layout(
        coloraxis={"colorscale": "RdBu", "cmid": 1.0, "colorbar": {"title": {"text": "speedup"}}},
    )
    fig.update_xaxes(title_text="batch size", type="category")
    rows = math.ceil(len(scenarios) / FACET_COLS)
    tallest = max(sizes)
    return _layout(
        fig,
        "TPOT speedup vs eager (★ fastest, † timing not representative: not ranked)",
        90 + rows * (110 + 32 * tallest),
    )


def quality_metric(df: pd.DataFrame) -> tuple[str, str, bool] | None:
    """The first quality measure any ok point carries: perplexity, else top-1 agreement, else KL."""
    ok = df[df["status"].eq("ok")]
    for column, label, higher in QUALITY_METRICS:
        if np.isfinite(ok[column]).any():
            return column, label, higher
    return None


def quality_scatter(df: pd.DataFrame) -> go.Figure | None:
    """Speedup (geometric mean over batch sizes) against quality, one point per scenario and variant; the
    Pareto front over representative points is drawn per scenario."""
    chosen = quality_metric(df)
    if chosen is None:
        return None
    column, q_title, higher = chosen
    data = df[df["status"].eq("ok") & np.isfinite(df[column]) & np.isfinite(df["speedup_tpot"])]
    if data.empty:
        return None
    agg = (
        data.assign(log_speedup=np.log(data["speedup_tpot"]))
        .groupby(["scenario", "variant", "representative"], as_index=False)
        .agg(log_speedup=("log_speedup", "mean"), quality=(column, "mean"), caveat=("timing_caveat", "first"))
    )
    agg["speedup"] = np.exp(agg["log_speedup"])
    colors = variant_colors(df["variant"])
    fig = go.Figure()
    for scenario, part in agg.groupby("scenario", sort=True):
        for rep, g in part.groupby("representative"):
            fig.add_trace(
                go.Scatter(
                    x=g["quality"],
                    y=g["speedup"],
                    mode="markers+text",
                    text=[esc(v) for v in g["variant"]],
                    textposition="top center",
                    name=esc(scenario) + ("" if rep else f" ({NOT_REPR})"),
                    marker={
                        "size": 11,
                        "color": [colors[str(v)] for v in g["variant"]] if rep else "#999",
                        "symbol": "circle" if rep else "circle-open",
                    },
                    customdata=g["caveat"].fillna("").map(esc).to_numpy() if not rep else None,
                    hovertemplate="%{text}<br>quality %{x:.4g}<br>speedup %{y:.3g}×"
                    + ("<br>%{customdata}" if not rep else "")
                    + "<extra>%{fullData.name}</extra>",
                )
            )
        rep = part[part["representative"]]
        if len(rep):
            mask = pareto_front(rep["quality"].to_numpy(), rep["speedup"].to_numpy(), higher)
            front = rep[mask].sort_values("quality")
            fig.add_trace(
                go.Scatter(
                    x=front["quality"],
                    y=front["speedup"],
                    mode="lines+markers",
                    line={"dash": "dash", "color": "#333", "shape": "hv" if higher else "vh"},
                    marker={"size": 16, "symbol": "circle-open", "color": "#333", "line": {"width": 2}},
                    name=f"Pareto front · {esc(scenario)}",
                    hoverinfo="skip",
                )
            )
    fig.update_xaxes(title_text=esc(q_title))
    fig.update_yaxes(title_text="TPOT speedup vs eager (geometric mean over batch sizes)", type="log")
    return _layout(fig, "Speed vs quality (Pareto front over representative timings)", 520)


def timelines(tl: pd.DataFrame) -> go.Figure | None:
    """Monitor series over the timed window, one row per series, one line per point (``data.timeline_frame``)."""
    if tl.empty:
        return None
    series = list(dict.fromkeys(tl["series"]))
    titles = [esc(tl.loc[tl["series"].eq(s), "series_label"].iloc[0]) for s in series]
    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.08)
    colors = variant_colors(tl["variant"])
    shown = set()
    for i, s in enumerate(series, start=1):
        for label, g in tl[tl["series"].eq(s)].groupby("label", sort=False):
            fig.add_trace(
                go.Scatter(
                    x=g["t_s"].to_numpy(float),
                    y=g["value"].to_numpy(float),
                    mode="lines",
                    name=esc(label),
                    legendgroup=esc(label),
                    showlegend=label not in shown,
                    line={"color": colors[str(g["variant"].iloc[0])], "width": 1.5},
                    hovertemplate="%{fullData.name}<br>t=%{x:.2f}s<br>%{y:.4g}<extra></extra>",
                ),
                row=i,
                col=1,
            )
            shown.add(label)
    fig.update_xaxes(title_text="time in the timed window (s)", row=len(series), col=1)
    return _layout(fig, "Utilization during the timed window", 120 + 220 * len(series))


def roofline(df: pd.DataFrame) -> go.Figure | None:
    """Achieved GFLOP/s against arithmetic intensity (FLOP/byte) for decode and prefill, under the roof
    min(peak FLOP/s, bandwidth x intensity) of each measured device."""
    has = df["status"].eq("ok") & (np.isfinite(df["decode_intensity"]) | np.isfinite(df["prefill_intensity"]))
    data = df[has]
    if data.empty:
        return None
    fig = go.Figure()
    xs = pd.concat([data["decode_intensity"], data["prefill_intensity"]]).dropna()
    lo, hi = xs[xs > 0].min() / 4, xs.max() * 4
    peaks = data.dropna(subset=["peak_bandwidth_gbs", "peak_gflops"])
    for (device, bw, peak), _ in peaks.groupby(["peak_device", "peak_bandwidth_gbs", "peak_gflops"], dropna=False):
        ridge = peak / bw
        x = np.array([min(lo, ridge / 4), ridge, max(hi, ridge * 4)])
        fig.add_trace(
            go.Scatter(
                x=x,
                y=np.minimum(peak, bw * x),
                mode="lines",
                line={"color": "#222", "width": 2},
                name=f"roof: {esc(device)} ({bw:.4g} GB/s, {peak:.4g} GFLOP/s)",
            )
        )
    colors = variant_colors(df["variant"])
    for phase, symbol in (("decode", "circle"), ("prefill", "diamond")):
        part = data[np.isfinite(data[f"{phase}_intensity"]) & np.isfinite(data[f"{phase}_achieved_gflops"])]
        for (variant, rep), g in part.groupby(["variant", "representative"]):
            fig.add_trace(
                go.Scatter(
                    x=g[f"{phase}_intensity"],
                    y=g[f"{phase}_achieved_gflops"],
                    mode="markers",
                    name=f"{esc(variant)} · {phase}" + ("" if rep else f" ({NOT_REPR})"),
                    text=[esc(v) for v in g["label"]],
                    marker={
                        "symbol": symbol if rep else f"{symbol}-open",
                        "size": 10,
                        "color": colors[str(variant)],
                    },
                    hovertemplate="%{text}<br>intensity %{x:.3g} FLOP/byte<br>%{y:.4g} GFLOP/s<extra></extra>",
                )
            )
    fig.update_xaxes(type="log", title_text="arithmetic intensity (FLOP/byte)")
    fig.update_yaxes(type="log", title_text="achieved GFLOP/s")
    return _layout(fig, "Roofline: decode (circles) and prefill (diamonds) against the measured ceilings", 520)


def op_breakdown(df: pd.DataFrame, limit: int = 60) -> go.Figure | None:
    """Profiled time per op category for each profiled point (the first ``limit``), stacked."""
    cols = [f"profile_{c}_ms" for c in PROFILE_CATEGORIES]
    data = df[df[cols].notna().any(axis=1)].sort_values(["scenario", "variant", "batch_size"]).head(limit)
    if data.empty:
        return None
    labels = [esc(v) for v in data["label"]]
    fig = go.Figure()
    for cat, col in zip(PROFILE_CATEGORIES, cols, strict=True):
        fig.add_trace(
            go.Bar(
                y=labels,
                x=data[col].fillna(0.0).to_numpy(float),
                name=cat,
                orientation="h",
                hovertemplate=f"%{{y}}<br>{cat}: %{{x:.4g}} ms<extra></extra>",
            )
        )
    fig.update_layout(barmode="stack", yaxis={"autorange": "reversed"})
    fig.update_xaxes(title_text="profiled time (ms)")
    return _layout(fig, "Time by op category (profiled points)", 140 + 26 * len(data))
