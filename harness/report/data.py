"""What the report derives from the table and the records: speedups and their verdicts (scenario labels come
from ``labels``), and the columns of the optional record sections (roofline, profile, monitor timelines) as
DataFrames.

Everything here is a pure function of ``harness.records.load()``'s table or of record dicts, so a later
dashboard over many sweeps can reuse it unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.report.labels import SCENARIO_KEYS, SWEEP_KEY, cell_text, int_text, scenario_labels, sweep_tags

SPEEDUP_KEYS = [*SCENARIO_KEYS, "batch_size"]
BASELINE = "eager"
PROFILE_CATEGORIES = ("matmul", "attention", "norm", "elementwise", "copy", "other")
# A TPOT ratio within 1 +/- NO_GAIN_BAND of eager is "no gain": smaller differences do not pay for an optimization
# (and on a shared machine they are within run-to-run drift), whatever their CI says.
NO_GAIN_BAND = 0.05
# The confidence every interval is labelled with: the median's order-statistic CI reaches it from 6 samples on; with
# fewer it is the whole sample range, whose real coverage (``<metric>_ci_coverage``) is lower (3 samples: 75%), and
# a verdict drawn from it is "uncertain".
NOMINAL_COVERAGE = 0.95
# A TPOT speedup more than this many times the memory-traffic bound (``bytes_speedup``) is flagged as suspect: an
# engine can beat the bound by cutting per-step overhead, but so far above it the baseline's timing is the likelier
# cause (a noisy or busy eager, too few samples).
SUSPECT_OVER_BOUND = 4.0
TIMELINE_MAX_POINTS = 24  # timelines drawn (one line per point); the rest are counted in a note
TIMELINE_MAX_SAMPLES = 300  # samples per drawn line, after striding


def representative(df: pd.DataFrame) -> pd.Series:
    """True unless the record says its timings must not be ranked (missing means representative)."""
    return ~df["timing_representative"].eq(False)


def _key_text(df: pd.DataFrame) -> pd.Series:
    """The speedup keys of each row as one text: a merge on it cannot fail on a key column whose type differs
    between the table and eager's medians (an all-missing fingerprint is float NaN in one, None in the other)."""
    if df.empty:
        return pd.Series("", index=df.index, dtype=object)
    return df[SPEEDUP_KEYS].map(cell_text).agg(" | ".join, axis=1)


def prepare(df: pd.DataFrame, env_labels: bool = False, sweep_labels: bool = False) -> pd.DataFrame:
    """The table plus the columns every figure uses.

    ``representative``; ``scenario`` (model and whatever of its weights, seed, shape or the workload fields vary;
    with ``env_labels``, as the report asks, also an ``env …`` tag where environments share a workload, so that
    figures and rankings keep them apart; the dashboard names environments in its own series labels); ``label``
    (one point); ``speedup_tpot`` / ``speedup_ttft`` (eager's p50 over the variant's, same scenario keys (named in
    the label or not), environment fingerprint and batch; NaN without an ok, representative eager point there; for
    a point timed in turns with eager, the median of the per-round ratios instead, which drift of the machine does
    not bias; ``speedup_tpot_paired`` says which); ``speedup_tpot_ci_low/high`` (the paired CI where timed in
    turns, else the conservative ratio of the two medians' CIs) and ``speedup_tpot_ci_coverage`` (the lower of the
    coverages of the intervals it comes from: below NOMINAL_COVERAGE where one has fewer than 6 samples); ``verdict``
    (``speed_verdict``); ``speedup_suspect`` (a TPOT speedup above SUSPECT_OVER_BOUND times ``bytes_speedup``);
    ``bytes_speedup`` (eager's decode bytes per step over the variant's: the TPOT speedup a decode bound by memory
    traffic alone would reach, so ``speedup_tpot`` below it is what per-step overhead and kernel efficiency keep);
    decode tokens/s CI bounds mapped from the TPOT median's CI. With ``sweep_labels`` (the report over several
    sweeps), where a point was measured in more than one sweep in one environment, every row's scenario also
    names its sweep (``sweep_tags``), and speedups compare within a sweep.
    """
    out = df.copy().reset_index(drop=True)
    out[SWEEP_KEY] = sweep_tags(out) if sweep_labels else ""
    for key in SCENARIO_KEYS:  # a frame built by hand or by an older version may lack one (e.g. threads)
        if key not in out:
            out[key] = np.nan
    if out.empty:
        for col in ("representative", "scenario", "label", "speedup_tpot", "speedup_ttft", "speedup_tpot_ci_low",
                    "speedup_tpot_ci_high", "speedup_tpot_ci_coverage", "speedup_tpot_paired", "verdict",
                    "bytes_speedup", "speedup_suspect", "tps_ci_low", "tps_ci_high", "speedup_ttft_paired",
                    "quality_other_inputs"):  # fmt: skip
            kinds = {"scenario": object, "label": object, "verdict": object, "speedup_tpot_paired": bool,
                     "speedup_ttft_paired": bool, "speedup_suspect": bool, "quality_other_inputs": bool}  # fmt: skip
            out[col] = pd.Series(dtype=kinds.get(col, float))
        return out
    out["representative"] = representative(out)
    out["scenario"] = scenario_labels(out, env_labels)
    out["label"] = out["variant"].astype(str) + " · " + out["scenario"] + " · b" + out["batch_size"].map(int_text)

    ok = out["status"].eq("ok")
    eager = out[ok & out["engine"].eq(BASELINE) & out["representative"]]
    if eager["variant"].eq(BASELINE).any():  # an eager with non-default parameters is not the baseline
        eager = eager[eager["variant"].eq(BASELINE)]
    cols = [c for c in ("tpot_ms_p50", "ttft_ms_p50", "tpot_ms_ci_low", "tpot_ms_ci_high", "tpot_ms_ci_coverage",
                        "tpot_ms_n", "n_reps", "decode_bytes_per_step") if c in out]  # fmt: skip
    base = eager[cols].assign(_key=_key_text(eager)).groupby("_key")[cols].median()
    base = base.rename(columns={c: f"{BASELINE}_{c}" for c in cols})
    out = out.drop(columns=[c for c in base.columns if c in out.columns]).assign(_key=_key_text(out))
    out = out.merge(base.reset_index(), on="_key", how="left").drop(columns="_key")
    out["speedup_tpot"] = out["eager_tpot_ms_p50"] / out["tpot_ms_p50"].where(ok)
    out["speedup_ttft"] = out["eager_ttft_ms_p50"] / out["ttft_ms_p50"].where(ok)
    if "decode_bytes_per_step" in out:
        out["bytes_speedup"] = out["eager_decode_bytes_per_step"] / out["decode_bytes_per_step"].where(ok)
    else:
        out["bytes_speedup"] = np.nan
    for metric in ("tpot", "ttft"):
        paired = f"paired_speedup_{metric}"
        if paired in out:
            out[f"speedup_{metric}"] = out[paired].where(ok & out[paired].notna(), out[f"speedup_{metric}"])
    for metric in ("tpot", "ttft"):  # which speedups are medians of per-round ratios (timed in turns)
        paired = f"paired_speedup_{metric}"
        out[f"speedup_{metric}_paired"] = ok & out[paired].notna() if paired in out else False
    out = _speedup_ci(out)
    is_baseline = out["variant"].eq(BASELINE)
    out["verdict"] = [
        None if base or not rep else speed_verdict(r, lo, hi, cov)
        for base, rep, r, lo, hi, cov in zip(is_baseline, out["representative"], out["speedup_tpot"],
                                             out["speedup_tpot_ci_low"], out["speedup_tpot_ci_high"],
                                             out["speedup_tpot_ci_coverage"], strict=True)
    ]  # fmt: skip
    out["speedup_suspect"] = ~is_baseline & (out["speedup_tpot"] > SUSPECT_OVER_BOUND * out["bytes_speedup"])
    # tokens/s = batch / TPOT median, so the CI of the median maps through the same monotone function
    tps = out["decode_tokens_per_s"]
    out["tps_ci_low"] = tps * out["tpot_ms_p50"] / out["tpot_ms_ci_high"]
    out["tps_ci_high"] = tps * out["tpot_ms_p50"] / out["tpot_ms_ci_low"]
    out["quality_other_inputs"] = quality_other_inputs(out)
    return out


def quality_other_inputs(df: pd.DataFrame) -> pd.Series:
    """True for an ok row whose quality was scored on other inputs (``quality_inputs``: quality settings, seed,
    corpus, rows per pass) than eager's in its scenario (or, without an eager that names its inputs, than most
    of the scenario's points): its top-1 agreement, KL and perplexity are not comparable with theirs. False
    where either id is unknown (rows stored by older versions)."""
    other = pd.Series(False, index=df.index, dtype=bool)
    if "quality_inputs" not in df or df.empty:
        return other
    ids = df["quality_inputs"].map(cell_text)
    ok = df["status"].eq("ok") & ids.ne("")
    for _, part in df[ok].groupby("scenario", sort=False):
        own = ids[part.index]
        eager = own[part["variant"].eq(BASELINE)]
        reference = set(eager) if len(eager) else set(own.mode().iloc[:1])
        other[part.index] = ~own.isin(reference)
    return other


def _speedup_ci(out: pd.DataFrame) -> pd.DataFrame:
    """The TPOT speedup's CI: paired (timed in turns) where recorded, else eager's CI bounds over the variant's
    opposite bounds (wider than the true CI of a ratio: a verdict from it errs towards "uncertain"); and its
    coverage: the paired CI's own, else the lower of the two intervals' (NaN where the table has none, e.g.
    rows stored by an older version)."""
    lo = out["eager_tpot_ms_ci_low"] / out["tpot_ms_ci_high"] if "eager_tpot_ms_ci_low" in out else np.nan
    hi = out["eager_tpot_ms_ci_high"] / out["tpot_ms_ci_low"] if "eager_tpot_ms_ci_high" in out else np.nan
    out["speedup_tpot_ci_low"], out["speedup_tpot_ci_high"] = lo, hi
    own = out.get("tpot_ms_ci_coverage", pd.Series(np.nan, index=out.index))
    out["speedup_tpot_ci_coverage"] = np.fmin(own, out.get("eager_tpot_ms_ci_coverage", own))
    paired_rows = out["speedup_tpot_paired"]
    for bound in ("low", "high", "coverage"):
        paired = f"paired_speedup_tpot_ci_{bound}"
        mine = f"speedup_tpot_ci_{bound}"
        if paired in out:
            out[mine] = out[paired].where(out[paired].notna(), out[mine])
            if bound == "coverage":  # the coverage of the unpaired intervals says nothing of a paired CI
                out[mine] = out[mine].where(~paired_rows | out[paired].notna(), np.nan)
    return out


def speed_verdict(
    ratio: float, ci_low: float = math.nan, ci_high: float = math.nan, coverage: float = math.nan
) -> str | None:
    """What a TPOT ratio over eager says: ``no gain`` within 1 +/- NO_GAIN_BAND; ``uncertain`` when its 95% CI
    still contains 1, or when the intervals it comes from cover less than NOMINAL_COVERAGE (``coverage``, fewer
    than 6 samples; NaN: not known, as in rows stored by older versions); else ``faster`` or ``slower``. None
    without a ratio."""
    if ratio is None or not math.isfinite(ratio):
        return None
    if abs(ratio - 1) <= NO_GAIN_BAND:
        return "no gain"
    if below_nominal(coverage):
        return "uncertain"
    if ci_low is not None and ci_high is not None and math.isfinite(ci_low) and math.isfinite(ci_high):
        if ci_low <= 1 <= ci_high:
            return "uncertain"
    return "faster" if ratio > 1 else "slower"


def below_nominal(coverage: Any) -> bool:
    """True for a known interval coverage below NOMINAL_COVERAGE (the interval of fewer than 6 samples)."""
    return isinstance(coverage, int | float) and math.isfinite(coverage) and coverage < NOMINAL_COVERAGE - 1e-9


def ranked(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that may be ranked: measured and representative."""
    return df[df["status"].eq("ok") & df["representative"] & np.isfinite(df["tpot_ms_p50"])]


def best_per_batch(df: pd.DataFrame) -> pd.DataFrame:
    """The fastest representative variant (lowest TPOT p50) of each scenario and batch size."""
    r = ranked(df)
    if r.empty:
        return r
    idx = r.groupby(["scenario", "batch_size"])["tpot_ms_p50"].idxmin()
    return r.loc[idx.values].sort_values(["scenario", "batch_size"])


def pareto_front(x: np.ndarray, y: np.ndarray, x_higher_better: bool) -> np.ndarray:
    """Mask of points no other point beats on both axes (y = speedup, always higher is better)."""
    x = np.asarray(x, dtype=float) * (1 if x_higher_better else -1)
    y = np.asarray(y, dtype=float)
    front = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def _section_row(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"record_path": record.get("_path")}
    roof = record.get("roofline") or {}
    peaks = roof.get("peaks") or {}
    row["peak_bandwidth_gbs"] = peaks.get("bandwidth_gbs")
    row["peak_gflops"] = peaks["flops"] / 1e9 if isinstance(peaks.get("flops"), int | float) else None
    row["peak_source"] = peaks.get("source")
    row["peak_device"] = peaks.get("device")
    for phase in ("decode", "prefill"):
        part = roof.get(phase) or {}
        for key in ("intensity", "achieved_gflops", "achieved_gbs"):
            row[f"{phase}_{key}"] = part.get(key)
    profile = record.get("profile") or {}
    breakdown = profile.get("breakdown_ms") or {}
    for cat in PROFILE_CATEGORIES:
        row[f"profile_{cat}_ms"] = breakdown.get(cat)
    row["profile_total_ms"] = profile.get("total_ms")
    return row


def with_sections(df: pd.DataFrame, records: list[dict[str, Any]]) -> pd.DataFrame:
    """``df`` plus flat roofline and profile columns from the records (NaN where a record has none)."""
    extra = pd.DataFrame([_section_row(r) for r in records])
    if extra.empty:
        extra = pd.DataFrame(columns=list(_section_row({}).keys()))
    numeric = [c for c in extra.columns if c not in ("record_path", "peak_source", "peak_device")]
    extra[numeric] = extra[numeric].apply(pd.to_numeric, errors="coerce")
    extra = extra.drop_duplicates("record_path")
    return df.drop(columns=[c for c in extra.columns if c != "record_path" and c in df.columns]).merge(
        extra, on="record_path", how="left"
    )


def timeline_frame(df: pd.DataFrame, records: list[dict[str, Any]]) -> tuple[pd.DataFrame, int]:
    """Long table (label, series, series_label, t_s, value) of monitor timelines, strided to at most
    TIMELINE_MAX_SAMPLES per line, for at most TIMELINE_MAX_POINTS points; also the count of monitored points."""
    by_path = {r.get("_path"): r for r in records}
    monitored = []
    for _, row in df.sort_values(["scenario", "variant", "batch_size"]).iterrows():
        timeline = ((by_path.get(row["record_path"]) or {}).get("monitor") or {}).get("timeline") or {}
        if timeline.get("t_s"):
            monitored.append((row, by_path[row["record_path"]]["monitor"]))
    frames = []
    for row, monitor in monitored[:TIMELINE_MAX_POINTS]:
        timeline = monitor["timeline"]
        t = np.asarray(timeline["t_s"], dtype=float)
        stride = max(1, math.ceil(len(t) / TIMELINE_MAX_SAMPLES))
        labels = monitor.get("labels") or {}
        for series, values in timeline.items():
            if series == "t_s" or not isinstance(values, list) or len(values) != len(t):
                continue
            v = pd.to_numeric(pd.Series(values[::stride], dtype=object), errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(v).any():
                continue
            frames.append(
                pd.DataFrame(
                    {
                        "label": row["label"],
                        "variant": row["variant"],
                        "series": series,
                        "series_label": labels.get(series, series),
                        "t_s": t[::stride],
                        "value": v,
                    }
                )
            )
    columns = ["label", "variant", "series", "series_label", "t_s", "value"]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)), len(monitored)
