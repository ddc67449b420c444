"""What the report derives from the table and the records: speedups, scenario labels, and the columns of the
optional record sections (roofline, profile, monitor timelines) as DataFrames.

Everything here is a pure function of ``harness.records.load()``'s table or of record dicts, so a later
dashboard over many sweeps can reuse it unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# A speedup compares a variant with eager on exactly the same model weights (kind, seed, shape), workload, device
# and dtype, measured in the same environment (fingerprint: machine and software stack): a report over several
# machines, seeds or weights never pools their eagers.
ENV_KEY = "fingerprint"
# what the model's weights are beyond its name; labels name them only where they vary within one model (a sweep
# over models, each with its own shape and weights, names just the models)
MODEL_KEYS = ["weights", "seed", "n_params", "model_id"]
# ``model_id`` (records.model_id) tells apart what the others do not: two shapes with the same parameter count
# (``model.n_heads=4,8``), or weights trained on another corpus or for more steps; labels name the ``model.*``
# fields that differ, or ``weights <id>`` where only the training does
SHAPE_KEYS = ["model", "weights", "seed", "n_params"]
WORKLOAD_KEYS = ["prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype", "threads"]
# which sweep a point comes from: a key only in a report over several sweeps that measured the same point on the
# same machine (``harness report A B``, ``prepare(sweep_labels=True)``); empty elsewhere, so that eager from one
# sweep still serves the variants of another
SWEEP_KEY = "sweep_tag"
SCENARIO_KEYS = ["model", *MODEL_KEYS, *WORKLOAD_KEYS, ENV_KEY, SWEEP_KEY]
ENV_TAG_LEN = 8  # "env 3fa2c91b": the fingerprint's first characters name an environment in labels
SPEEDUP_KEYS = [*SCENARIO_KEYS, "batch_size"]
BASELINE = "eager"
PROFILE_CATEGORIES = ("matmul", "attention", "norm", "elementwise", "copy", "other")
# A TPOT ratio within 1 +/- NO_GAIN_BAND of eager is "no gain": smaller differences do not pay for an optimization
# (and on a shared machine they are within run-to-run drift), whatever their CI says.
NO_GAIN_BAND = 0.05
TIMELINE_MAX_POINTS = 24  # timelines drawn (one line per point); the rest are counted in a note
TIMELINE_MAX_SAMPLES = 300  # samples per drawn line, after striding


def representative(df: pd.DataFrame) -> pd.Series:
    """True unless the record says its timings must not be ranked (missing means representative)."""
    return ~df["timing_representative"].eq(False)


def _scenario_label(row: pd.Series, varying: list[str]) -> str:
    parts = [str(row["model"])]
    for key in varying:
        value = row[key]
        if key == "num_beams":
            continue
        if key == "decoding" and value == "beam":
            parts.append(f"beam×{_int(row['num_beams'])}")
        elif key in ("prompt_len", "gen_len"):
            parts.append(f"{key.split('_')[0]} {_int(value)}")
        elif key == "threads":
            n = _int(value)
            parts.append(f"{n} thread" if n == "1" else f"{n} threads")
        elif key == ENV_KEY:
            parts.append(env_tag(value))
        elif key == SWEEP_KEY:
            parts.append(f"sweep {value}")
        elif key == "weights":
            parts.append(f"{value} weights")
        elif key == "seed":
            parts.append(f"seed {_int(value)}")
        elif key == "n_params":
            parts.append(_params(value))
        elif key == "model_id":
            if row.get("_model_tag"):
                parts.append(row["_model_tag"])
        else:
            parts.append(str(value))
    return " · ".join(parts)


def _int(value: Any) -> str:
    return str(int(value)) if isinstance(value, int | float) and math.isfinite(value) else str(value)


def _params(n: Any) -> str:
    """``3.02M params``: the model's shape in a label (two shapes of one model differ in their parameter count)."""
    if not isinstance(n, int | float) or not math.isfinite(n):
        return "? params"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit} params"
    return f"{int(n)} params"


def env_tag(fingerprint: Any) -> str:
    """Short name of an environment fingerprint for labels (``env 3fa2c91b``; ``env unknown`` without one)."""
    if fingerprint is None or (isinstance(fingerprint, float) and math.isnan(fingerprint)):
        return "env unknown"
    return f"env {str(fingerprint)[:ENV_TAG_LEN]}"


def varying_keys(df: pd.DataFrame) -> list[str]:
    """Scenario keys (other than the model) that take more than one value: only those go into labels. The model's
    weights, seed and shape count only where they vary within one model (the demo's trained ``tiny`` beside a
    random larger shape needs no tag). The fingerprint counts only where two environments share a workload
    (several machines or stacks in one report), not where it follows from another key (a thread count is part of
    the fingerprint)."""
    others = [k for k in SCENARIO_KEYS if k not in (ENV_KEY, SWEEP_KEY)]

    def varies(key: str) -> bool:
        if key == "model_id":
            # a row stored by an older version has none: it names no shape, so it is not one more
            return bool(len(df)) and df.groupby(SHAPE_KEYS, dropna=False)[key].nunique().gt(1).any()
        if key in MODEL_KEYS:
            return bool(len(df)) and df.groupby("model", dropna=False)[key].nunique(dropna=False).gt(1).any()
        return df[key].nunique(dropna=False) > 1

    keys = [k for k in others[1:] if varies(k)]
    if "num_beams" in keys and "decoding" not in keys:
        keys.insert(keys.index("num_beams"), "decoding")
    measured = df[df["status"].eq("ok")] if "status" in df else df  # a point that failed early has no fingerprint
    if len(measured) and measured.groupby(others, dropna=False)[ENV_KEY].nunique(dropna=False).gt(1).any():
        keys.append(ENV_KEY)
    if SWEEP_KEY in df and df[SWEEP_KEY].fillna("").ne("").any():
        keys.append(SWEEP_KEY)
    return keys


def sweep_tags(df: pd.DataFrame) -> pd.Series:
    """Each row's sweep (``sweep_source``: the folder the report found it in, named by its last component, or
    its path where two names agree) where some point was measured in several sweeps in one environment; empty
    where none was (several sweeps of different points read as one: eager in one, the variants in another)."""
    empty = pd.Series("", index=df.index, dtype=object)
    if df.empty or not {"sweep_source", "point_key", "fingerprint"} <= set(df.columns):
        return empty
    source = df["sweep_source"].astype(str)
    key = df["point_key"].astype(str) + "@" + df["fingerprint"].astype(str)
    if not source.groupby(key).nunique().gt(1).any():
        return empty
    names = source.map(lambda p: Path(p).name)
    clash = names.groupby(names).transform(lambda n: source[n.index].nunique() > 1)
    return names.where(~clash, source)


def _model_tags(df: pd.DataFrame) -> pd.Series:
    """Where one model name, weight kind, seed and parameter count hold several ``model_id``s: the ``model.*``
    fields that differ among them (``n_heads 4``), or ``weights <id>`` where the shapes agree (the training
    differs). Empty elsewhere, and for rows without a ``model_id`` (stored by an older version)."""
    tags = pd.Series("", index=df.index, dtype=object)
    fields = [c for c in df.columns if c.startswith("model.")]
    for _, group in df[df["model_id"].notna()].groupby(SHAPE_KEYS, dropna=False):
        if group["model_id"].nunique() < 2:
            continue
        differ = [c for c in fields if group[c].map(_text).nunique() > 1]
        for i, row in group.iterrows():
            named = [f"{c.removeprefix('model.')} {_text(row[c]) or '-'}" for c in differ]
            tags[i] = " · ".join(named) if named else f"weights {_text(row['model_id'])[:ENV_TAG_LEN] or '?'}"
    return tags


def _text(v: Any) -> str:
    """A cell as text, missing as empty (a type-blind key: NaN in one frame is None in another)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _key_text(df: pd.DataFrame) -> pd.Series:
    """The speedup keys of each row as one text: a merge on it cannot fail on a key column whose type differs
    between the table and eager's medians (an all-missing fingerprint is float NaN in one, None in the other)."""
    if df.empty:
        return pd.Series("", index=df.index, dtype=object)
    return df[SPEEDUP_KEYS].map(_text).agg(" | ".join, axis=1)


def prepare(df: pd.DataFrame, env_labels: bool = False, sweep_labels: bool = False) -> pd.DataFrame:
    """The table plus the columns every figure uses.

    ``representative``; ``scenario`` (model and whatever of its weights, seed, shape or the workload fields vary;
    with ``env_labels``, as the report asks, also an ``env …`` tag where environments share a workload, so that
    figures and rankings keep them apart; the dashboard names environments in its own series labels); ``label``
    (one point); ``speedup_tpot`` / ``speedup_ttft`` (eager's p50 over the variant's, same scenario keys (named in
    the label or not), environment fingerprint and batch; NaN without an ok, representative eager point there; for
    a point timed in turns with eager, the median of the per-round ratios instead, which drift of the machine does
    not bias); ``speedup_tpot_ci_low/high``
    (the paired CI where timed in turns, else the conservative ratio of the two medians' CIs); ``verdict``
    (``speed_verdict``);
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
                    "speedup_tpot_ci_high", "verdict", "bytes_speedup", "tps_ci_low", "tps_ci_high"):  # fmt: skip
            out[col] = pd.Series(dtype=object if col in ("scenario", "label", "verdict") else float)
        return out
    out["representative"] = representative(out)
    varying = [k for k in varying_keys(out) if env_labels or k != ENV_KEY]
    out["_model_tag"] = _model_tags(out)
    out["scenario"] = out.apply(_scenario_label, axis=1, varying=varying)
    out = out.drop(columns="_model_tag")
    out["label"] = out["variant"].astype(str) + " · " + out["scenario"] + " · b" + out["batch_size"].map(_int)

    ok = out["status"].eq("ok")
    eager = out[ok & out["engine"].eq(BASELINE) & out["representative"]]
    if eager["variant"].eq(BASELINE).any():  # an eager with non-default parameters is not the baseline
        eager = eager[eager["variant"].eq(BASELINE)]
    cols = [c for c in ("tpot_ms_p50", "ttft_ms_p50", "tpot_ms_ci_low", "tpot_ms_ci_high", "decode_bytes_per_step")
            if c in out]  # fmt: skip
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
    out = _speedup_ci(out)
    is_baseline = out["variant"].eq(BASELINE)
    out["verdict"] = [
        None if base or not rep else speed_verdict(r, lo, hi)
        for base, rep, r, lo, hi in zip(is_baseline, out["representative"], out["speedup_tpot"],
                                        out["speedup_tpot_ci_low"], out["speedup_tpot_ci_high"], strict=True)
    ]  # fmt: skip
    # tokens/s = batch / TPOT median, so the CI of the median maps through the same monotone function
    tps = out["decode_tokens_per_s"]
    out["tps_ci_low"] = tps * out["tpot_ms_p50"] / out["tpot_ms_ci_high"]
    out["tps_ci_high"] = tps * out["tpot_ms_p50"] / out["tpot_ms_ci_low"]
    return out


def _speedup_ci(out: pd.DataFrame) -> pd.DataFrame:
    """The TPOT speedup's 95% CI: paired (timed in turns) where recorded, else eager's CI bounds over the
    variant's opposite bounds (wider than the true CI of a ratio: a verdict from it errs towards "uncertain")."""
    lo = out["eager_tpot_ms_ci_low"] / out["tpot_ms_ci_high"] if "eager_tpot_ms_ci_low" in out else np.nan
    hi = out["eager_tpot_ms_ci_high"] / out["tpot_ms_ci_low"] if "eager_tpot_ms_ci_high" in out else np.nan
    out["speedup_tpot_ci_low"], out["speedup_tpot_ci_high"] = lo, hi
    for bound in ("low", "high"):
        paired = f"paired_speedup_tpot_ci_{bound}"
        if paired in out:
            own = f"speedup_tpot_ci_{bound}"
            out[own] = out[paired].where(out[paired].notna(), out[own])
    return out


def speed_verdict(ratio: float, ci_low: float = math.nan, ci_high: float = math.nan) -> str | None:
    """What a TPOT ratio over eager says: ``no gain`` within 1 +/- NO_GAIN_BAND; ``uncertain`` when its 95% CI
    still contains 1; else ``faster`` or ``slower``. None without a ratio."""
    if ratio is None or not math.isfinite(ratio):
        return None
    if abs(ratio - 1) <= NO_GAIN_BAND:
        return "no gain"
    if ci_low is not None and ci_high is not None and math.isfinite(ci_low) and math.isfinite(ci_high):
        if ci_low <= 1 <= ci_high:
            return "uncertain"
    return "faster" if ratio > 1 else "slower"


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
