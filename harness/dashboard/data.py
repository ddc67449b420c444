"""What the dashboard derives from the history: the table of every stored point (prepared as the report prepares
it), one series per point and environment fingerprint, and the confirmed steps of every series.

A series is keyed by ``point_key`` (variant with its parameters, model, workload, device type, dtype) and the
environment fingerprint: measurements from different machines or software stacks are never joined into one
line. Points are ordered by their sweep's start time; a step falls only between two commits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.gate_settings import METRICS
from harness.report.data import prepare
from harness.steps import StepSettings, detect

SERIES_KEYS = ["point_key", "fingerprint"]
FILTER_KEYS = ("device", "model", "variant", "batch")
FILTER_COLUMNS = {"device": "device_label", "model": "model", "variant": "variant", "batch": "batch"}


@dataclass(frozen=True)
class Trend:
    """One trend chart: the column drawn, its CI columns, and the metric whose steps are marked on it (tokens/s
    and MBU are functions of TPOT, so they carry TPOT's steps, and their CI is TPOT's: ``<steps_of>_ci_coverage``
    is the coverage of every band); ``note``: what the chart measures, shown under it."""

    id: str
    column: str
    title: str
    y_title: str
    ci: tuple[str, str] | None
    log_y: bool
    steps_of: str
    note: str = ""

    @property
    def timed(self) -> bool:
        """Whether the chart draws a timing (an engine's unrepresentative timing says nothing of its memory)."""
        return METRICS[self.steps_of].timed


TRENDS = (
    Trend("tpot", "tpot_ms_p50", "Time per output token", "TPOT p50 (ms)", ("tpot_ms_ci_low", "tpot_ms_ci_high"),
          True, "tpot_ms"),
    Trend("ttft", "ttft_ms_p50", "Time to first token", "TTFT p50 (ms)", ("ttft_ms_ci_low", "ttft_ms_ci_high"),
          True, "ttft_ms"),
    Trend("throughput", "decode_tokens_per_s", "Decode throughput", "decode tokens/s", ("tps_ci_low", "tps_ci_high"),
          True, "tpot_ms"),
    Trend("memory", "peak_memory_mb", "Peak memory", "peak memory (MiB)", None, True, "peak_memory_mb",
          "MiB (2^20 bytes). CPU: whole-process peak RSS (VmHWM: the harness, torch and the reference model besides "
          "the engine); CUDA: torch.cuda.max_memory_allocated after a reset."),
    Trend("mbu", "mbu", "Memory-bandwidth utilization (decode)", "MBU", ("mbu_ci_low", "mbu_ci_high"), False,
          "tpot_ms"),
    Trend("fidelity", "fidelity_top1", "Fidelity", "top-1 agreement with eager", None, False, "fidelity_top1"),
)  # fmt: skip

# metric -> (per-sweep value column, raw-sample key or None); thresholds and direction are the gate's
STEP_METRICS: dict[str, tuple[str, str | None]] = {
    "tpot_ms": ("tpot_ms_p50", "tpot_ms"),
    "ttft_ms": ("ttft_ms_p50", "ttft_ms"),
    "peak_memory_mb": ("peak_memory_mb", None),
    "fidelity_top1": ("fidelity_top1", None),
}
STEP_COLUMNS = ["series", "series_label", "metric", "kind", "before", "after", "change", "absolute", "z", "p_value",
                "n_before", "n_after", "last_good_sha", "last_good_t", "last_good_sweep", "first_bad_sha",
                "first_bad_t", "first_bad_sweep", *FILTER_KEYS]  # fmt: skip


def step_settings(metric: str, **overrides) -> StepSettings:
    """The gate's minimum change and direction for ``metric``, with step detection's own defaults."""
    m = METRICS[metric]
    absolute = m.kind == "absolute"
    base = StepSettings(
        min_change=m.threshold if m.threshold is not None else 0.05,
        absolute=absolute,
        higher_is_better=m.higher_is_better,
        min_noise=0.001 if absolute else 0.005,
    )
    return StepSettings(**{**base.__dict__, **overrides})


def short_sha(sha: object) -> str:
    return str(sha)[:10] if isinstance(sha, str) and sha else "no commit"


def history_frame(points: pd.DataFrame) -> pd.DataFrame:
    """The ok points of the history (``harness.history.points``), prepared as the report prepares a table, with
    ``series``, ``series_label``, ``t`` (the sweep's start), ``commit``, ``quality_segment``
    (``quality_segments``) and the filter columns. Only the ok points
    are prepared: a failed sweep on another workload does not rename the measured series."""
    data = points[points["status"].eq("ok")]
    if data.empty:
        return data.copy()
    data = prepare(data)
    data["fingerprint"] = data["fingerprint"].fillna("unknown")
    data["series"] = data["point_key"].astype(str) + "@" + data["fingerprint"].astype(str)
    envs = data.groupby("point_key")["fingerprint"].transform("nunique")
    data["series_label"] = data["label"].where(envs.le(1), data["label"] + " · env " + data["fingerprint"].str[:8])
    data["t"] = pd.to_datetime(data["sweep_started_at"], utc=True, format="ISO8601")
    data["commit"] = data["sweep_git_sha"].map(short_sha)
    data["device_label"] = data["device_name"].fillna(data["device"]).astype(str)
    data["batch"] = data["batch_size"].map(lambda b: str(int(b)) if math.isfinite(b) else str(b))
    data["model"] = data["model"].astype(str)
    data["variant"] = data["variant"].astype(str)
    # MBU is bytes / TPOT / peak bandwidth: the TPOT median's CI maps through it as through tokens/s
    data["mbu_ci_low"] = data["mbu"] * data["tpot_ms_p50"] / data["tpot_ms_ci_high"]
    data["mbu_ci_high"] = data["mbu"] * data["tpot_ms_p50"] / data["tpot_ms_ci_low"]
    # a point re-run into one sweep: the latest record is the sweep's value
    data = data.sort_values(["t", "sweep_id", "started_at"]).drop_duplicates(["series", "sweep_id"], keep="last")
    data = data.sort_values(["series_label", "series", "t", "sweep_id"]).reset_index(drop=True)
    data["quality_segment"] = quality_segments(data)
    return data


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def quality_segments(data: pd.DataFrame) -> pd.Series:
    """Per series, in time order: 0, one more at each sweep whose ``quality_inputs`` (what the quality figures were
    scored on: quality settings, seed, corpus) differs from the last one known. Quality figures of two segments
    scored other text: never joined into one line, never a step. A record predating ``quality_inputs`` (or without
    quality) continues its segment, as the gate compares it."""
    out = pd.Series(0, index=data.index, dtype=int)
    column = data["quality_inputs"] if "quality_inputs" in data else pd.Series(None, index=data.index)
    for _, g in data.groupby("series", sort=False):
        last, segment = None, 0
        for i, value in zip(g.index, column[g.index].tolist(), strict=True):
            q = _text(value)
            if q is not None:
                segment += last is not None and q != last
                last = q
            out[i] = segment
    return out


def failed_points(points: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """The points of the history that were not measured (failed, oom, timeout, skipped) in a sweep, of the series
    that ``data`` (``history_frame``) draws: ``series``, ``t``, ``sweep_id``, ``commit``, ``status`` and ``error``,
    in time order. A sweep that also holds an ok record of the point is left out (its value is drawn)."""
    columns = ["series", "t", "sweep_id", "commit", "status", "error"]
    bad = points[points["status"].ne("ok")]
    if bad.empty or data.empty:
        return pd.DataFrame(columns=columns)
    bad = bad.assign(fingerprint=bad["fingerprint"].fillna("unknown"))
    bad = bad.assign(series=bad["point_key"].astype(str) + "@" + bad["fingerprint"].astype(str),
                     t=pd.to_datetime(bad["sweep_started_at"], utc=True, format="ISO8601"),
                     commit=bad["sweep_git_sha"].map(short_sha))  # fmt: skip
    measured = set(zip(data["series"], data["sweep_id"], strict=True))
    keep = bad["series"].isin(set(data["series"])) & ~pd.Series(
        [(s, w) in measured for s, w in zip(bad["series"], bad["sweep_id"], strict=True)], index=bad.index
    )
    bad = bad[keep].sort_values(["t", "sweep_id"]).drop_duplicates(["series", "sweep_id"], keep="last")
    return bad[columns].reset_index(drop=True)


def never_measured(points: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """The points no stored sweep measured in their environment (every record failed, oom, timed out or was
    skipped): they have no line to mark a ✕ on. One row per point and fingerprint: ``series``, ``label``, the filter
    columns, ``tries`` (sweeps that tried it), and the latest try's ``t``, ``sweep_id``, ``commit``, ``status`` and
    ``error``; newest first."""
    columns = ["series", "label", *FILTER_COLUMNS, "tries", "t", "sweep_id", "commit", "status", "error"]
    bad = points[points["status"].ne("ok")]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    bad = prepare(bad)
    bad["fingerprint"] = bad["fingerprint"].fillna("unknown")
    bad["series"] = bad["point_key"].astype(str) + "@" + bad["fingerprint"].astype(str)
    bad = bad[~bad["series"].isin(set(data["series"]) if len(data) else set())]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    bad["t"] = pd.to_datetime(bad["sweep_started_at"], utc=True, format="ISO8601")
    bad["commit"] = bad["sweep_git_sha"].map(short_sha)
    bad["device"] = bad["device_name"].fillna(bad["device"]).astype(str)
    bad["batch"] = bad["batch_size"].map(lambda b: str(int(b)) if math.isfinite(b) else str(b))
    bad["model"], bad["variant"] = bad["model"].astype(str), bad["variant"].astype(str)
    bad["label"] = bad["label"] + " · env " + bad["fingerprint"].str[:8]
    bad = bad.sort_values(["t", "sweep_id"])
    tries = bad.groupby("series")["sweep_id"].nunique().rename("tries")
    latest = bad.drop_duplicates("series", keep="last").join(tries, on="series")
    return latest.sort_values("t", ascending=False)[columns].reset_index(drop=True)


def series_steps(g: pd.DataFrame, metric: str, settings: StepSettings | None = None) -> pd.DataFrame:
    """Confirmed steps of ``metric`` in one series (rows of one ``series``, in time order). A timing an engine
    marked unrepresentative is never judged: its sweep is left out of the levels, and is never the last good or
    first bad sweep of a step (the others still are judged)."""
    column, sample_key = STEP_METRICS[metric]
    if METRICS[metric].timed:
        g = g[g["representative"].to_numpy(dtype=bool)]
    g = g[np.isfinite(g[column].to_numpy(dtype=float))]
    if g.empty:
        return pd.DataFrame(columns=STEP_COLUMNS)
    samples = None
    if sample_key is not None:
        raw = g[f"samples.{sample_key}"]
        if raw.map(lambda v: isinstance(v, list) and len(v) > 0).all():
            samples = list(raw)
    commits = g["sweep_git_sha"].where(g["sweep_git_sha"].notna(), g["sweep_id"]).tolist()
    s = settings or step_settings(metric)
    rows = []
    for step in detect(g[column].to_numpy(dtype=float), samples, commits, s):
        good, bad = g.iloc[step.index - 1], g.iloc[step.index]
        rows.append({
            "series": bad["series"], "series_label": bad["series_label"], "metric": metric, "kind": step.kind,
            "before": step.before, "after": step.after, "change": step.change, "absolute": s.absolute,
            "z": step.z, "p_value": step.p_value, "n_before": step.n_before, "n_after": step.n_after,
            "last_good_sha": good["sweep_git_sha"], "last_good_t": good["t"], "last_good_sweep": good["sweep_id"],
            "first_bad_sha": bad["sweep_git_sha"], "first_bad_t": bad["t"], "first_bad_sweep": bad["sweep_id"],
            **{k: bad[FILTER_COLUMNS[k]] for k in FILTER_KEYS},
        })  # fmt: skip
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def find_steps(data: pd.DataFrame, metrics: tuple[str, ...] = tuple(STEP_METRICS)) -> pd.DataFrame:
    """Every confirmed step of every series and metric, newest first."""
    frames = []
    for _, g in data.groupby("series", sort=False):
        for m in metrics:
            # quality figures scored on other inputs are not a step of one another: each segment on its own
            parts = g.groupby("quality_segment", sort=False) if METRICS[m].quality else [(0, g)]
            for _, part in parts:
                if part[STEP_METRICS[m][0]].notna().any():
                    found = series_steps(part, m)
                    if len(found):
                        frames.append(found)
    if not frames:
        return pd.DataFrame(columns=STEP_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(["first_bad_t", "series_label"], ascending=[False, True])
