"""The report's figures: pure functions of the prepared table (``data.prepare``) returning plotly Figures, or
None when the sweep holds nothing to draw.

Text that comes from configs (variant, model, labels) is HTML-escaped before it reaches plotly, which renders a
subset of HTML tags in text. Points whose timings are not representative are drawn (dotted, hollow, uncoloured
in heatmaps) but never marked best and never on the Pareto front (speed vs quality is drawn by ``quality``).
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

from harness.report.data import BASELINE, PROFILE_CATEGORIES, below_nominal, best_per_batch

PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
NOT_REPR = "timing not representative"
FACET_COLS = 2
FACET_ROW_PX = 330


def esc(value: object) -> str:
    return html.escape(str(value), quote=False)


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """One colour per variant, the same in every figure of the report."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(map(str, variants))))}


def apply_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title={"text": esc(title), "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"font": {"size": 11}},
        hoverlabel={"align": "left"},
    )
    return fig


def facet_grid(titles: list[str], heights: list[int] | None = None) -> tuple[go.Figure, list[tuple[int, int]]]:
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


def _hover(df: pd.DataFrame, value: str, coverage: str | None = None) -> tuple[np.ndarray, str]:
    """Hover of one point: value, n, and where its interval covers less than 95% (``coverage`` column) that
    coverage; the caveat of a timing that is not representative."""
    caveat = df["timing_caveat"].where(~df["representative"], "").fillna("").map(esc)
    cov = df[coverage] if coverage in df else pd.Series(np.nan, index=df.index)
    low = [f"<br>error bar: the sample range, {100 * c:.3g}% CI" if below_nominal(c) else "" for c in cov]
    custom = np.stack([df["n_reps"].fillna(0).astype(int).to_numpy(), caveat.to_numpy(), low], axis=1)
    template = (
        f"%{{fullData.name}}<br>batch %{{x}}<br>{value}<br>n=%{{customdata[0]}}%{{customdata[2]}}<br>"
        "%{customdata[1]}<extra></extra>"
    )
    return custom, template


def ci_title(df: pd.DataFrame, title: str, coverage: str) -> str:
    """``title`` with '(95% CI of the median)', and how many points have an interval below it (fewer than 6
    samples: the sample range, its coverage in the hover)."""
    ok = df[df["status"].eq("ok")]
    low = int(ok[coverage].map(below_nominal).sum()) if coverage in ok else 0
    extra = f"; {low} point(s) of fewer than 6 samples: the sample range, coverage in the hover" if low else ""
    return f"{title} (95% CI of the median{extra})"


def by_batch(
    df: pd.DataFrame,
    y: str,
    title: str,
    y_title: str,
    ci: tuple[str, str] | None = None,
    kind: str = "line",
    coverage: str | None = None,
) -> go.Figure | None:
    """``y`` against batch size, one facet per scenario, one trace per variant (lines, or grouped bars with
    ``kind="bar"``), with asymmetric error bars from the ``ci`` columns (``coverage``: the column of their
    coverage, named in the hover where below 95%). Serves TTFT, TPOT, throughput, memory."""
    data = df[df["status"].eq("ok") & np.isfinite(df[y])]
    if data.empty:
        return None
    colors = variant_colors(df["variant"])
    scenarios = sorted(data["scenario"].unique())
    fig, cells = facet_grid(scenarios)
    shown: set[tuple[str, bool]] = set()
    for scenario, (row, col) in zip(scenarios, cells, strict=True):
        part = data[data["scenario"].eq(scenario)]
        groups = part.groupby(["variant", "representative"], sort=True)
        for (variant, rep), g in sorted(groups, key=lambda kv: (kv[0][0] != BASELINE, kv[0])):  # eager first
            g = g.sort_values("batch_size")
            name = esc(variant) + ("" if rep else f" ({NOT_REPR})")
            error = None
            if ci is not None:
                lo, hi = g[ci[0]].to_numpy(float), g[ci[1]].to_numpy(float)
                yv = g[y].to_numpy(float)
                error = {"type": "data", "symmetric": False, "array": hi - yv, "arrayminus": yv - lo}
            custom, template = _hover(g, f"{esc(y_title)} %{{y:.4g}}", coverage)
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
    return apply_layout(fig, title, 90 + FACET_ROW_PX * math.ceil(len(scenarios) / FACET_COLS))


def weights_bar(df: pd.DataFrame) -> go.Figure | None:
    """The weights each variant stores (``weight_bytes``, in MiB: what quantization, pruning and distillation
    save, whatever else the process holds), one facet per scenario; the same at every batch size."""
    if "weight_bytes" not in df:
        return None
    data = df[df["status"].eq("ok") & np.isfinite(df["weight_bytes"].to_numpy(dtype=float))]
    if data.empty:
        return None
    sizes = data.groupby(["scenario", "variant"], as_index=False)["weight_bytes"].max()
    colors = variant_colors(df["variant"])
    scenarios = sorted(sizes["scenario"].unique())
    fig, cells = facet_grid(scenarios)
    shown: set[str] = set()
    for scenario, (row, col) in zip(scenarios, cells, strict=True):
        for _, r in sizes[sizes["scenario"].eq(scenario)].sort_values("variant").iterrows():
            name = esc(r["variant"])
            fig.add_trace(
                go.Bar(
                    x=[name],
                    y=[float(r["weight_bytes"]) / 2**20],
                    name=name,
                    legendgroup=name,
                    showlegend=name not in shown,
                    marker={"color": colors[str(r["variant"])]},
                    hovertemplate="%{x}<br>weights %{y:.4g} MiB<extra></extra>",
                ),
                row=row,
                col=col,
            )
            shown.add(name)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(title_text="weights (MiB)", rangemode="tozero")
    rows = math.ceil(len(scenarios) / FACET_COLS)
    return apply_layout(fig, "Weights per variant, as stored (MiB)", 90 + FACET_ROW_PX * rows)


def speedup_heatmap(df: pd.DataFrame) -> go.Figure | None:
    """TPOT speedup vs eager, variant x batch, one heatmap per scenario on one shared colour scale (1 = eager).
    ★ marks the fastest representative variant of a batch; † a timing that is shown but not ranked (uncoloured);
    a point of the grid that did not measure (failed, oom, timeout, skipped) shows its status, its error in the
    hover, rather than an empty cell that reads as never run."""
    data = df[np.isfinite(df["speedup_tpot"])]
    if data.empty:
        return None
    scenarios = sorted(data["scenario"].unique())
    best = set(best_per_batch(df)["record_path"])
    unmeasured = df[~df["status"].eq("ok") & df["scenario"].isin(scenarios) & np.isfinite(df["batch_size"])]
    cells_of = pd.concat([data, unmeasured])
    sizes = [cells_of[cells_of["scenario"].eq(s)]["variant"].nunique() for s in scenarios]
    fig, cells = facet_grid(scenarios)
    for scenario, (row, col) in zip(scenarios, cells, strict=True):
        part = data[data["scenario"].eq(scenario)]
        bad = unmeasured[unmeasured["scenario"].eq(scenario)]
        grid = pd.concat([part, bad])
        variants = sorted(grid["variant"].astype(str).unique(), key=lambda v: (v != BASELINE, v))  # eager on top
        batches = sorted(grid["batch_size"].unique())
        z = np.full((len(variants), len(batches)), np.nan)
        text = [["" for _ in batches] for _ in variants]
        hover = [["" for _ in batches] for _ in variants]
        for _, r in bad.iterrows():
            i, j = variants.index(str(r["variant"])), batches.index(r["batch_size"])
            text[i][j] = esc(r["status"])
            error = str(r["error"]) if isinstance(r.get("error"), str) and r["error"] else "no error recorded"
            hover[i][j] = f"{esc(r['status'])}: {esc(error[:200])}"
        for _, r in part.iterrows():
            i, j = variants.index(str(r["variant"])), batches.index(r["batch_size"])
            mark = " ★" if r["record_path"] in best else ("" if r["representative"] else " †")
            text[i][j] = f"{r['speedup_tpot']:.2f}×{mark}"
            hover[i][j] = f"TPOT speedup vs eager {text[i][j]}"
            if r["representative"]:
                z[i, j] = r["speedup_tpot"]
        fig.add_trace(
            go.Heatmap(
                x=[str(int(b)) for b in batches],
                y=[esc(v) for v in variants],
                z=z,
                text=text,
                customdata=hover,
                texttemplate="%{text}",
                coloraxis="coloraxis",
                xgap=2,
                ygap=2,
                hovertemplate="%{y}<br>batch %{x}<br>%{customdata}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_layout(
        coloraxis={"colorscale": "RdBu", "cmid": 1.0, "colorbar": {"title": {"text": "speedup"}}},
    )
    fig.update_xaxes(title_text="batch size", type="category")
    fig.update_yaxes(autorange="reversed", title_text="variant")
    rows = math.ceil(len(scenarios) / FACET_COLS)
    tallest = max(sizes)
    return apply_layout(
        fig,
        "TPOT speedup vs eager (★ fastest, † timing not representative: not ranked; a status: not measured)",
        90 + rows * (110 + 32 * tallest),
    )


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
    return apply_layout(fig, "Utilization during the timed window", 120 + 220 * len(series))


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
    return apply_layout(fig, "Roofline: decode (circles) and prefill (diamonds) against the measured ceilings", 520)


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
    return apply_layout(fig, "Time by op category (profiled points)", 140 + 26 * len(data))
