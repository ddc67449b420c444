"""Speed vs quality: the TPOT speedup of each variant against what it costs in quality, one facet per scenario,
each on the quality measure that scenario carries (held-out perplexity where the weights are trained, else top-1
agreement or KL against eager: random weights have no meaningful perplexity), with the Pareto front over the
representative timings. What cannot be drawn is named, with why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from harness.report.data import pareto_front
from harness.report.figures import FACET_COLS, NOT_REPR, apply_layout, esc, facet_grid, variant_colors
from harness.report.labels import int_text
from harness.report.tables import OTHER_INPUTS

# (column, axis title, name in the hover, higher is better), in order of preference
QUALITY_METRICS = (
    ("ppl", "perplexity on held-out text (lower is better)", "perplexity", False),
    ("fidelity_top1", "top-1 agreement with eager (higher is better)", "top-1 agreement", True),
    ("fidelity_kl", "KL(eager ‖ engine), nats/token (lower is better)", "KL nats/token", False),
)
NO_MEASURE = "no quality measure: no top-1 agreement, KL or perplexity"
NO_SPEEDUP = "no speedup: no ok, representative eager point on its workload"
ABSENT = "Not measured in this sweep: no record carries a quality section (fidelity against eager, perplexity)."
NO_BASELINE = (
    "No speedup to place quality against: no ok, representative eager point shares a workload with the points "
    "whose quality was measured (their top-1 agreement, KL and perplexity are in the points table)."
)
ROW_PX = 410


def _finite(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.Series(np.isfinite(df[column].to_numpy(dtype=float)), index=df.index)


def quality_metric(df: pd.DataFrame) -> tuple[str, str, str, bool] | None:
    """The quality measure of a set of ok points: the first (perplexity, top-1 agreement, KL) that every one of
    them carries as a finite number, else the one most of them carry; None when none carries any."""
    counts = [int(_finite(df, m[0]).sum()) for m in QUALITY_METRICS]
    if not df.empty and max(counts) == len(df):
        return QUALITY_METRICS[counts.index(len(df))]
    return QUALITY_METRICS[counts.index(max(counts))] if max(counts) else None


def _facets(df: pd.DataFrame) -> tuple[list[tuple[str, tuple, pd.DataFrame]], list[str]]:
    """(scenario, metric, its drawable rows) per scenario that can be drawn, and what is left out and why."""
    ok = df[df["status"].eq("ok")]
    facets, left = [], []
    for scenario, part in ok.groupby("scenario", sort=True):
        if "quality_other_inputs" in part:  # scored on other text or settings: not on eager's axis
            other = part["quality_other_inputs"].eq(True)
            for variant in sorted(set(part.loc[other, "variant"])):
                left.append(f"{variant} on {scenario} ({OTHER_INPUTS}: quality_inputs differ)")
            part = part[~other]
        if quality_metric(part) is None:
            left.append(f"{scenario} ({NO_MEASURE})")
            continue
        sped = part[_finite(part, "speedup_tpot")]
        metric = quality_metric(sped)
        if metric is None:
            left.append(f"{scenario} ({NO_SPEEDUP})")
            continue
        drawn = sped[_finite(sped, metric[0])]
        for variant in sorted(set(sped["variant"]) - set(drawn["variant"])):
            left.append(f"{variant} on {scenario} (no finite {metric[2]}, which the others carry)")
        facets.append((scenario, metric, drawn))
    return facets, left


def _range(values: np.ndarray, log: bool = False, pad: float = 0.2) -> list[float]:
    """An axis range with room for the text labels beside the outermost points."""
    v = np.log10(values) if log else values
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo or max(abs(hi) * 0.05, 0.05)
    return [lo - pad * span, hi + (1.5 if log else 1) * pad * span]


def _points(g: pd.DataFrame, rep: bool, scenario: str, hover_name: str, colors: dict[str, str]) -> go.Scatter:
    return go.Scatter(
        x=g["quality"].tolist(),
        y=g["speedup"].tolist(),
        mode="markers+text",
        text=[esc(v) for v in g["variant"]],
        textposition="top center",
        cliponaxis=False,
        name=esc(scenario) + ("" if rep else f" ({NOT_REPR})"),
        marker={
            "size": 11,
            "color": [colors[str(v)] for v in g["variant"]] if rep else "#999",
            "symbol": "circle" if rep else "circle-open",
        },
        customdata=g["caveat"].fillna("").map(esc).to_numpy() if not rep else None,
        hovertemplate=f"%{{text}}<br>{esc(hover_name)} %{{x:.4g}}<br>speedup %{{y:.3g}}×"
        + ("<br>%{customdata}" if not rep else "")
        + "<extra>%{fullData.name}</extra>",
    )


def _partial_means(scenario: str, data: pd.DataFrame) -> list[str]:
    """The variants of a facet whose speedup is a mean over fewer batch sizes than the facet holds (a point
    that failed, or ran out of memory, at the others): their place on the speed axis is not like for like."""
    every = sorted(set(data["batch_size"]))
    out = []
    for variant, batches in data.groupby("variant", sort=True)["batch_size"]:
        own = sorted(set(batches))
        if own != every:
            out.append(f"{variant} on {scenario} over batch {', '.join(map(int_text, own))} only "
                       f"(the others also over {', '.join(int_text(b) for b in every if b not in own)})")  # fmt: skip
    return out


def quality_scatter(df: pd.DataFrame) -> tuple[go.Figure | None, str]:
    """Speedup (geometric mean over batch sizes) against quality, one point per scenario and variant, one facet
    per scenario on its own quality measure (the axis names it), the Pareto front over representative points.
    Returns the figure (None when nothing can be drawn) and a note: what is left out and why, or why there is no
    figure."""
    facets, left = _facets(df)
    if not facets:
        ok = df[df["status"].eq("ok")]
        measured = any(_finite(ok, m[0]).any() for m in QUALITY_METRICS)
        return None, NO_BASELINE if measured else ABSENT
    colors = variant_colors(df["variant"])
    fig, cells = facet_grid([s for s, _, _ in facets])
    partial: list[str] = []
    for (scenario, (column, q_title, hover_name, higher), data), (row, col) in zip(facets, cells, strict=True):
        partial += _partial_means(scenario, data)
        agg = (
            data.assign(log_speedup=np.log(data["speedup_tpot"]))
            .groupby(["variant", "representative"], as_index=False)
            .agg(log_speedup=("log_speedup", "mean"), quality=(column, "mean"), caveat=("timing_caveat", "first"))
        )
        agg["speedup"] = np.exp(agg["log_speedup"])
        for rep, g in agg.groupby("representative"):
            fig.add_trace(_points(g, bool(rep), scenario, hover_name, colors), row=row, col=col)
        rep = agg[agg["representative"]]
        if len(rep):
            front = rep[pareto_front(rep["quality"].to_numpy(), rep["speedup"].to_numpy(), higher)]
            front = front.sort_values("quality")
            fig.add_trace(
                go.Scatter(
                    x=front["quality"].tolist(),
                    y=front["speedup"].tolist(),
                    mode="lines+markers",
                    line={"dash": "dash", "color": "#333", "shape": "hv" if higher else "vh"},
                    marker={"size": 16, "symbol": "circle-open", "color": "#333", "line": {"width": 2}},
                    name=f"Pareto front · {esc(scenario)}",
                    hoverinfo="skip",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text=esc(q_title), range=_range(agg["quality"].to_numpy(float)), row=row, col=col)
        fig.update_yaxes(type="log", range=_range(agg["speedup"].to_numpy(float), log=True), row=row, col=col)
    fig.update_yaxes(title_text="TPOT speedup vs eager (geometric mean over batch sizes)")
    note = " ".join(
        ([f"Not drawn: {'; '.join(left)}."] if left else [])
        + ([f"Speedups averaged over fewer batch sizes than the others of their facet: {'; '.join(partial)}."]
           if partial else [])
    )  # fmt: skip
    rows = math.ceil(len(facets) / min(FACET_COLS, len(facets)))
    return apply_layout(fig, "Speed vs quality (Pareto front over representative timings)", 110 + ROW_PX * rows), note
