"""The terminal summary printed at the end of a run or sweep."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.data import BASELINE, NO_GAIN_BAND, prepare

COLUMNS = {
    "variant": "variant",
    "scenario": "model",  # the model, plus its weights, seed or shape, any workload field or thread count that varies
    "batch_size": "batch",
    "ttft_ms_p50": "TTFT p50 ms",
    "tpot_ms_p50": "TPOT p50 ms",
    "decode_tokens_per_s": "decode tok/s",
    "speedup_tpot": "TPOT x eager",
    "speedup_ttft": "TTFT x eager",
    "paired_ci": "TPOT x eager 95% CI",
    "verdict": "vs eager",
    "bytes_speedup": "bytes x eager",
    "fidelity_top1": "top-1",
    "ppl": "ppl",
    "sparsity": "sparsity",
    "n_reps": "n",
    "status": "status",
}
# shown only when some point has a value (a sweep without quality or pruning keeps its table narrow)
OPTIONAL = ("speedup_tpot", "speedup_ttft", "paired_ci", "verdict", "bytes_speedup", "fidelity_top1", "ppl", "sparsity")


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def summary_table(df: pd.DataFrame, concurrent: bool = False) -> str:
    """One line per point, sorted by model, variant and batch; failed points show their error. ``concurrent``: the
    sweep's launcher ran several points at once (``sweep.json``), so its timings interfere and the note says so.

    ``TPOT x eager`` is eager's TPOT p50 over the point's on the same model weights (kind, seed, shape), workload,
    device and dtype (above 1: faster), measured in the same environment; it is left blank where the timing is not
    representative. Points that differ in what their label would not name otherwise (weights, seed, shape of one
    model) get it in the ``scenario`` column. ``vs eager``
    is its verdict: faster, slower, no gain (within 5%) or uncertain (the CI contains 1). ``bytes x eager`` is
    eager's decode bytes per step over the point's: the speedup a decode bound by memory traffic alone would
    reach (shown when a sweep has a point beside eager).
    """
    if df.empty:
        return "(no records)"
    view = prepare(df).sort_values(["scenario", "variant", "batch_size"], na_position="last")
    rep = view["representative"]
    view["speedup_tpot"] = view["speedup_tpot"].where(rep)
    view["speedup_ttft"] = view["speedup_ttft"].where(rep)
    view["paired_ci"] = _paired_ci(view).where(rep)
    view["bytes_speedup"] = view["bytes_speedup"].where(~view["variant"].eq(BASELINE))
    columns = {c: label for c, label in COLUMNS.items()
               if c not in OPTIONAL or (c in view and view[c].notna().any())}  # fmt: skip
    if not view["scenario"].eq(view["model"]).all():
        columns["scenario"] = "scenario"
    rows = []
    for _, r in view.iterrows():
        row = {label: _fmt(r.get(col)) for col, label in columns.items()}
        if r.get("status") != "ok" and r.get("error"):
            row["status"] = f"{r['status']}: {str(r['error'])[:80]}"
        elif flags := [f for f in ("noisy", "drifting") if r.get(f) is True]:
            row["status"] = f"ok ({', '.join(flags)})"
        if r.get("timing_representative") is False:
            row["status"] += " [timing not representative]"
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False) + _ratio_note(view, concurrent) + _bytes_note(columns)


def _bytes_note(columns: dict[str, str]) -> str:
    if "bytes_speedup" not in columns:
        return ""
    return ("\n(bytes x eager: eager's decode bytes per step over the point's, the TPOT speedup a decode bound by "
            "memory traffic alone would reach; below it: per-step overhead and kernel efficiency)")  # fmt: skip


def _paired_ci(view: pd.DataFrame) -> pd.Series:
    """'[low, high]' of the TPOT speedup over eager where the point was timed in turns with eager."""
    lo, hi = "paired_speedup_tpot_ci_low", "paired_speedup_tpot_ci_high"
    if lo not in view:
        return pd.Series(None, index=view.index, dtype=object)
    return view.apply(lambda r: f"[{r[lo]:.3f}, {r[hi]:.3f}]" if pd.notna(r[lo]) else None, axis=1).astype(object)


def _ratio_note(view: pd.DataFrame, concurrent: bool = False) -> str:
    """How far the x-eager ratios can be trusted: points timed in turns share the machine's drift; points
    timed one after another do not; points run at the same time (a parallel launcher) load each other."""
    if "speedup_tpot" not in view or not view["speedup_tpot"].notna().any():
        return ""
    ranked = view[view["speedup_tpot"].notna()]
    rule = (f"\n(vs eager: no gain within ±{NO_GAIN_BAND:.0%} of eager's TPOT, uncertain where the ratio's 95% CI "
            "contains 1 or a side has fewer than 6 samples (its interval is the sample range, under 95%), else "
            "faster or slower)")  # fmt: skip
    if concurrent:
        return (
            "\n(x eager: points ran at the same time on one machine (a parallel launcher), each timed under the "
            "others' load, so the ratios do not compare the engines alone; measure with hydra/launcher=basic or "
            "hydra/launcher=interleaved)" + rule
        )
    if "timed_in_turns" in ranked and ranked["timed_in_turns"].notna().all():
        return (
            "\n(x eager: each point timed in turns with eager, one repetition each per round, so drift of the "
            "machine lands on both alike; the speedups are medians of the per-round ratios)" + rule
        )
    return (
        "\n(x eager: points timed one after another; on a machine whose speed drifts, time them in turns with "
        "hydra/launcher=interleaved)" + rule
    )


def status_counts(df: pd.DataFrame) -> str:
    if df.empty:
        return "0 points"
    counts = df["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())
