"""The CI regression gate: match the points of two sweeps and give every gated metric of every point a verdict.

Pure functions of tables (``harness.export.read_points``: the ``harness.records.load()`` table plus one
``samples.<metric>`` column of raw samples per timed metric); nothing here prints.

A timed metric is a regression only when four tests agree, so noise on a shared machine does not cry wolf:
the Mann-Whitney U test on the raw samples rejects "same distribution" at ``alpha``; the medians moved the
wrong way by more than the metric's minimum relative change; the order-statistic CIs of the two medians do not
overlap; and each side has at least ``min_samples`` samples. Two points timed in turns in one run
(``hydra/launcher=interleaved``: the same ``turns_id``) pair up by repetition, and the paired versions of the
tests apply (``decide_paired``): drift of the machine common to a round then cancels. Anything less is
"no change" (measured, within noise or threshold) or "unknown" (not comparable: too few samples, timings not
representative, different environment fingerprints, or not measured on one side).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu, wilcoxon

from harness.gate_settings import GateInputError, Metric, Settings, check_metric, text_value
from harness.stats import median_ci

REGRESSION, IMPROVEMENT, NO_CHANGE, UNKNOWN = "regression", "improvement", "no change", "unknown"
VERDICTS = (REGRESSION, IMPROVEMENT, UNKNOWN, NO_CHANGE)  # also the order of severity in outputs
SAMPLE_PREFIX = "samples."
FAILED_STATUSES = ("failed", "oom", "timeout")
ROW_COLUMNS = ["key", "label", "point_key", "metric", "verdict", "reason", "base", "cand", "change", "p_value",
               "base_ci_low", "base_ci_high", "cand_ci_low", "cand_ci_high", "n_base", "n_cand", "mode",
               "threshold"]  # fmt: skip


@dataclass
class Verdict:
    verdict: str
    reason: str
    base: float = math.nan
    cand: float = math.nan
    change: float = math.nan  # (cand - base) / base, or cand - base for absolute metrics
    p_value: float = math.nan
    base_ci: tuple[float, float] = (math.nan, math.nan)
    cand_ci: tuple[float, float] = (math.nan, math.nan)
    n_base: int = 0
    n_cand: int = 0
    mode: str = "samples"
    threshold: float = math.nan


def within(change: float, threshold: float) -> bool:
    """Whether a relative change is within the threshold as a ratio, either way: ``1/(1+t) <= ratio <= 1+t``.
    Symmetric in the logarithm, so TPOT x1.051 and tokens/s x1/1.051 (-4.9%), the same data, get one verdict."""
    if change <= -1:
        return False
    return abs(math.log1p(change)) <= math.log1p(threshold)


def min_p_value(n_base: int, n_cand: int | None = None) -> float:
    """The smallest two-sided p-value the rank test can give at these sample counts (exact, no ties): 2 / 2**n
    for the signed-rank test on n pairs, 2 / C(n_base + n_cand, n_base) for the U test. At or above alpha, no
    change can be significant, however large: the verdict is unknown, not no change."""
    if n_cand is None:
        return 2.0 / 2.0**n_base
    return 2.0 / math.comb(n_base + n_cand, n_base)


def _pairs_needed(alpha: float) -> int:
    return next(n for n in range(1, 64) if min_p_value(n) < alpha)


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def decide_samples(
    x: Sequence[float],
    y: Sequence[float],
    higher_is_better: bool,
    threshold: float,
    alpha: float = 0.01,
    min_samples: int = 5,
    confidence: float = 0.95,
) -> Verdict:
    """Verdict for base samples ``x`` against candidate samples ``y`` (independent samples, e.g. one per
    repetition): U test, relative change of the medians, and non-overlap of the medians' CIs must all agree."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if min(x.size, y.size) < min_samples:
        return Verdict(
            UNKNOWN, f"too few samples ({x.size} vs {y.size}; need {min_samples})", n_base=x.size, n_cand=y.size
        )
    bx, cy = float(np.median(x)), float(np.median(y))
    p = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    blo, bhi, _ = median_ci(x, confidence)
    clo, chi, _ = median_ci(y, confidence)
    change = (cy - bx) / abs(bx) if bx else math.nan
    v = Verdict(NO_CHANGE, "", bx, cy, change, p, (blo, bhi), (clo, chi), x.size, y.size)
    worse = change < 0 if higher_is_better else change > 0
    apart = clo > bhi or chi < blo
    if not math.isfinite(change):
        v.verdict, v.reason = UNKNOWN, "base median is zero"
    elif within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%}"
    elif min_p_value(x.size, y.size) >= alpha:
        v.verdict = UNKNOWN
        v.reason = f"{_pct(change)} but {x.size} vs {y.size} samples cannot reach U test p < {alpha:g}"
    elif p >= alpha:
        v.reason = f"{_pct(change)} but U test p={p:.2g} >= {alpha:g}"
    elif not apart:
        v.reason = f"{_pct(change)} but the medians' CIs overlap"
    else:
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), p={p:.2g}, CIs apart"
    return v


def decide_paired(
    x: Sequence[float],
    y: Sequence[float],
    higher_is_better: bool,
    threshold: float,
    alpha: float = 0.01,
    min_samples: int = 5,
    confidence: float = 0.95,
) -> Verdict:
    """Verdict for base and candidate samples taken in turns (``x[i]`` and ``y[i]`` in the same round): the
    per-round ratios ``y[i] / x[i]`` cancel what the round shares (the machine's speed at that moment). The
    Wilcoxon signed-rank test on their logarithms, their median against the threshold, and the median ratio's
    CI excluding 1 must all agree."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if x.size < min_samples:
        return Verdict(UNKNOWN, f"too few paired samples ({x.size}; need {min_samples})", n_base=x.size,
                       n_cand=y.size, mode="paired")  # fmt: skip
    r = np.log(y / x)
    p = 1.0 if np.all(r == 0) else float(wilcoxon(r, alternative="two-sided").pvalue)
    lo, hi, _ = median_ci(r, confidence)
    change = math.expm1(float(np.median(r)))
    blo, bhi, _ = median_ci(x, confidence)
    clo, chi, _ = median_ci(y, confidence)
    v = Verdict(NO_CHANGE, "", float(np.median(x)), float(np.median(y)), change, p, (blo, bhi), (clo, chi), x.size,
                y.size, mode="paired")  # fmt: skip
    worse = change < 0 if higher_is_better else change > 0
    ci = f"ratio CI [{math.exp(lo):.3f}, {math.exp(hi):.3f}]"
    if within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%} (paired by round)"
    elif min_p_value(x.size) >= alpha:
        v.verdict = UNKNOWN
        v.reason = (f"{_pct(change)} but {x.size} paired samples cannot reach signed-rank p < {alpha:g} "
                    f"(it takes {_pairs_needed(alpha)})")  # fmt: skip
    elif p >= alpha:
        v.reason = f"{_pct(change)} but signed-rank p={p:.2g} >= {alpha:g} (paired by round)"
    elif lo <= 0 <= hi:
        v.reason = f"{_pct(change)} but the paired {ci} holds 1"
    else:
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), paired by round: p={p:.2g}, {ci}"
    return v


def decide_intervals(
    base: tuple[float, float, float], cand: tuple[float, float, float], higher_is_better: bool, threshold: float
) -> Verdict:
    """Verdict from (median, CI low, CI high) only, for tables exported without raw samples: the relative change
    and non-overlapping CIs must agree (no U test possible)."""
    (bx, blo, bhi), (cy, clo, chi) = base, cand
    if not all(math.isfinite(v) for v in (bx, blo, bhi, cy, clo, chi)) or not bx:
        return Verdict(UNKNOWN, "median or CI not measured", mode="table")
    change = (cy - bx) / abs(bx)
    v = Verdict(NO_CHANGE, "", bx, cy, change, base_ci=(blo, bhi), cand_ci=(clo, chi), mode="table")
    note = " (no raw samples: threshold and CIs only)"
    if within(change, threshold):
        v.reason = f"{_pct(change)} within ±{threshold:.1%}{note}"
    elif not (clo > bhi or chi < blo):
        v.reason = f"{_pct(change)} but the medians' CIs overlap{note}"
    else:
        worse = change < 0 if higher_is_better else change > 0
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{_pct(change)} (threshold {threshold:.1%}), CIs apart{note}"
    return v


def decide_value(base: float, cand: float, metric: Metric, threshold: float) -> Verdict:
    """One value per side: relative change (``scalar``) or absolute change (``absolute``) against the threshold."""
    mode = metric.kind
    if math.isnan(base) or math.isnan(cand):
        return Verdict(UNKNOWN, "not measured on one side", base, cand, mode=mode)
    if math.isinf(base) or math.isinf(cand):  # an infinite perplexity was measured: worse than any finite one
        v = Verdict(NO_CHANGE, "both infinite", base, cand, mode=mode, n_base=1, n_cand=1)
        if base != cand:
            v.change = math.inf if cand > base else -math.inf
            worse = (cand < base) if metric.higher_is_better else (cand > base)
            v.verdict, v.reason = (REGRESSION if worse else IMPROVEMENT), f"{base:.4g} -> {cand:.4g} (not finite)"
        return v
    if mode == "absolute":
        change, shown = cand - base, f"{cand - base:+.4g}"
        limit = f"{threshold:g}"
    else:
        change = (cand - base) / abs(base) if base else math.nan
        shown, limit = _pct(change), f"{threshold:.1%}"
    v = Verdict(NO_CHANGE, "", base, cand, change, n_base=1, n_cand=1, mode=mode)
    if not math.isfinite(change):
        v.verdict, v.reason = UNKNOWN, "base value is zero"
    elif within(change, threshold) if mode != "absolute" else abs(change) <= threshold:
        v.reason = f"{shown} within ±{limit}"
    else:
        worse = change < 0 if metric.higher_is_better else change > 0
        v.verdict = REGRESSION if worse else IMPROVEMENT
        v.reason = f"{shown} (threshold {limit}; one value per point, no test)"
    return v


def _num(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def metric_samples(row: Mapping[str, Any], metric: Metric) -> np.ndarray | None:
    """Independent samples of ``metric`` for one point, or None without raw samples.

    ITL gaps within one repetition are correlated, so ITL is tested on per-repetition medians; tokens/s is
    the TPOT samples mapped through batch * 1000 / TPOT (a monotone map: the U test is unchanged by it).
    """
    raw = row.get(SAMPLE_PREFIX + metric.source)
    if raw is None or isinstance(raw, float | str):
        return None
    x = np.asarray(raw, dtype=float).ravel()
    if metric.name == "itl_ms":
        reps = int(_num(row.get("n_reps"))) if math.isfinite(_num(row.get("n_reps"))) else 0
        if reps <= 0 or x.size % reps:
            return None
        x = np.median(x.reshape(reps, -1), axis=1)
    elif metric.name == "decode_tokens_per_s":
        x = _num(row.get("batch_size")) * 1000.0 / x
    return x


def table_interval(row: Mapping[str, Any], metric: Metric) -> tuple[float, float, float] | None:
    """(median, CI low, CI high) from the table's summary columns, for tables without raw samples."""
    if metric.name == "itl_ms":
        return None  # the table's ITL CI pools correlated gaps: too narrow to gate on
    src = metric.source
    med, lo, hi = (_num(row.get(f"{src}_{s}")) for s in ("p50", "ci_low", "ci_high"))
    if metric.name == "decode_tokens_per_s":
        b = _num(row.get("batch_size")) * 1000.0
        med, lo, hi = b / med, b / hi, b / lo
    return med, lo, hi


def _representative(row: Mapping[str, Any]) -> bool:
    """False only when the record says so (missing means representative; CSV reads it back as text)."""
    return str(row.get("timing_representative")).lower() != "false"


def _paired(b: Mapping[str, Any], c: Mapping[str, Any]) -> bool:
    """Both points were timed in the same rounds (one ``turns_id``), so their samples pair up by repetition."""
    tb, tc = b.get("turns_id"), c.get("turns_id")
    return isinstance(tb, str) and bool(tb) and tb == tc


def _fingerprint(row: Mapping[str, Any]) -> str | None:
    fp = row.get("fingerprint")
    return None if fp is None or (isinstance(fp, float) and math.isnan(fp)) else str(fp)


def metric_verdict(b: Mapping[str, Any], c: Mapping[str, Any], metric: Metric, settings: Settings) -> Verdict | None:
    """The verdict of one metric of one matched pair of ok points (None: measured on neither side)."""
    threshold = settings.thresholds.get(metric, c)
    if metric.kind != "samples":
        base, cand = _num(b.get(metric.source)), _num(c.get(metric.source))
        if math.isnan(base) and math.isnan(cand):
            return None
        v = decide_value(base, cand, metric, threshold)
    else:
        x, y = metric_samples(b, metric), metric_samples(c, metric)
        if x is not None and y is not None and _paired(b, c) and x.size == y.size:
            v = decide_paired(x, y, metric.higher_is_better, threshold, settings.alpha, settings.min_samples,
                              settings.confidence)  # fmt: skip
        elif x is not None and y is not None:
            v = decide_samples(x, y, metric.higher_is_better, threshold, settings.alpha, settings.min_samples,
                               settings.confidence)  # fmt: skip
        else:
            bi, ci = table_interval(b, metric), table_interval(c, metric)
            if bi is None or ci is None:
                v = Verdict(UNKNOWN, "ITL needs raw samples (gaps of one repetition are correlated)", mode="table")
            elif all(math.isnan(t[0]) for t in (bi, ci)):
                return None
            else:
                v = decide_intervals(bi, ci, metric.higher_is_better, threshold)
                n = (_num(b.get(f"{metric.source}_n")), _num(c.get(f"{metric.source}_n")))
                if min(n) < settings.min_samples:
                    v.verdict, v.reason = (
                        UNKNOWN,
                        f"too few samples ({n[0]:.0f} vs {n[1]:.0f}; need {settings.min_samples})",
                    )
    v.threshold = threshold
    if v.verdict == UNKNOWN:
        return v
    if metric.timed and not (_representative(b) and _representative(c)):
        caveat = c.get("timing_caveat") if not _representative(c) else b.get("timing_caveat")
        v.verdict, v.reason = UNKNOWN, f"timings not representative ({caveat or 'marked by the engine'}); {v.reason}"
    elif metric.env_bound and _fingerprint(b) != _fingerprint(c):
        envs = f"environments differ ({_fingerprint(b)} vs {_fingerprint(c)})"
        if settings.allow_env_mismatch:
            v.reason = f"{v.reason}; {envs}, gated because of --allow-env-mismatch"
        else:
            v.verdict, v.reason = UNKNOWN, f"{envs}; {v.reason}"
    return v


def status_verdict(b: Mapping[str, Any], c: Mapping[str, Any]) -> Verdict | None:
    """A point ok in BASE that fails in CAND (failed, oom, timeout) is a regression; skipped (engine unavailable
    here) is unknown; fixed is an improvement; not ok on both sides is unknown. None when both are ok."""
    sb, sc = str(b.get("status")), str(c.get("status"))
    if sb == "ok" and sc == "ok":
        return None
    err = c.get("error") if sc != "ok" else b.get("error")
    detail = f": {err}" if isinstance(err, str) and err else ""
    if sb == "ok" and sc in FAILED_STATUSES:
        return Verdict(REGRESSION, f"ok in BASE, {sc} in CAND{detail}", mode="status")
    if sb in FAILED_STATUSES and sc == "ok":  # skipped in BASE: nothing was measured there to improve on
        return Verdict(IMPROVEMENT, f"{sb} in BASE{detail}, ok in CAND", mode="status")
    return Verdict(UNKNOWN, f"{sb} in BASE, {sc} in CAND{detail}", mode="status")


@dataclass
class GateResult:
    rows: pd.DataFrame  # one per matched point and metric (and status)
    points: pd.DataFrame  # one per matched point: its overall verdict
    base_only: pd.DataFrame
    cand_only: pd.DataFrame
    notes: list[str]
    settings: Settings

    @property
    def regressions(self) -> int:
        return int(self.points["verdict"].eq(REGRESSION).sum()) if len(self.points) else 0

    def counts(self) -> dict[str, int]:
        vc = self.points["verdict"].value_counts() if len(self.points) else pd.Series(dtype=int)
        return {v: int(vc.get(v, 0)) for v in VERDICTS}


def point_labels(df: pd.DataFrame) -> pd.Series:
    """Readable point names: variant, model and batch, plus whichever workload fields vary."""
    optional = ["prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype", "seed", "weights"]
    varying = [k for k in optional if k in df.columns and df[k].nunique(dropna=False) > 1]
    short = {"prompt_len": "p", "gen_len": "g", "num_beams": "beams", "seed": "seed"}

    def label(r: pd.Series) -> str:
        parts = [str(r.get("variant")), str(r.get("model")), f"b{text_value(r.get('batch_size'))}"]
        parts += [f"{short.get(k, '')}{text_value(r.get(k))}" for k in varying]
        return " · ".join(parts)

    return df.apply(label, axis=1) if len(df) else pd.Series(dtype=str)


def _dedupe(df: pd.DataFrame, on: list[str], side: str, notes: list[str]) -> pd.DataFrame:
    """One row per match key: the latest record wins (a re-run point), with a note."""
    if df.empty:
        return df
    key = match_keys(df, on)  # as text: a list-valued engine parameter is a key too
    dup = key.duplicated(keep=False)
    if dup.any():
        keys = int(key[dup].nunique())
        notes.append(f"{side}: {int(dup.sum())} records share {keys} match key(s); the latest of each is compared")
        order = df["started_at"].sort_values(na_position="first").index if "started_at" in df.columns else df.index
        df = df.loc[order][~key.loc[order].duplicated(keep="last")]
    return df


def match_keys(df: pd.DataFrame, on: list[str]) -> pd.Series:
    """Each row's match key as one text (4.0 and 4 are one batch size)."""
    return df[on].map(text_value).agg(" | ".join, axis=1)


def compare(base: pd.DataFrame, cand: pd.DataFrame, settings: Settings | None = None) -> GateResult:
    """Match points by ``settings.match`` columns and give each a verdict per gated metric."""
    settings = settings or Settings()
    metrics = [check_metric(m) for m in settings.metrics]
    on = list(settings.match)
    for side, df in (("BASE", base), ("CAND", cand)):
        missing = [c for c in on if c not in df.columns]
        if missing:
            raise GateInputError(f"{side}: no column(s) {', '.join(missing)} to match points on")
    notes: list[str] = []
    for i, rule in enumerate(settings.thresholds.rules):  # a misspelt column would match nothing, silently
        absent = [col for col in rule.match if col not in base.columns and col not in cand.columns]
        if absent:
            notes.append(f"thresholds: points[{i}]: no column {', '.join(map(repr, absent))} in BASE or CAND: "
                         "the rule applies to no point")  # fmt: skip
    base, cand = _dedupe(base, on, "BASE", notes), _dedupe(cand, on, "CAND", notes)
    both = pd.concat([base, cand], ignore_index=True)
    extra = pd.DataFrame({"_side": ["base"] * len(base) + ["cand"] * len(cand), "_label": point_labels(both),
                          "_key": match_keys(both, on)}, index=both.index)  # fmt: skip
    both = pd.concat([both, extra], axis=1)  # at once: column by column, pandas warns the frame is fragmented
    b = both[both["_side"] == "base"].set_index("_key")
    c = both[both["_side"] == "cand"].set_index("_key")
    common = [k for k in b.index if k in c.index]
    if not common:
        raise GateInputError(
            f"no point in common ({len(b)} in BASE, {len(c)} in CAND, matched on {', '.join(on)}): "
            "are these sweeps of the same configuration?"
        )
    rows, points = [], []
    unmeasured: dict[str, int] = {}
    judged = []
    for key in common:
        rb, rc = b.loc[key].to_dict(), c.loc[key].to_dict()
        ident = {"key": key, "label": rb["_label"], "point_key": rc.get("point_key")}
        verdicts: list[tuple[str, Verdict]] = []
        sv = status_verdict(rb, rc)
        if sv is not None:
            verdicts.append(("status", sv))
        else:
            for m in metrics:
                v = metric_verdict(rb, rc, m, settings)
                if v is None:
                    unmeasured[m.name] = unmeasured.get(m.name, 0) + 1
                else:
                    verdicts.append((m.name, v))
        judged.append((ident, rb, rc, verdicts))
    if settings.correction == "holm":
        notes.append(holm(
            [v for *_, verdicts in judged for _, v in verdicts], settings.alpha,
        ))  # fmt: skip
    for ident, rb, rc, verdicts in judged:
        for name, v in verdicts:
            row = {**ident, "metric": name, **asdict(v)}
            row["base_ci_low"], row["base_ci_high"] = row.pop("base_ci")
            row["cand_ci_low"], row["cand_ci_high"] = row.pop("cand_ci")
            rows.append(row)
        found = {v.verdict for _, v in verdicts}
        overall = next((x for x in VERDICTS if x in found), UNKNOWN)
        points.append({**ident, "verdict": overall, "status_base": rb.get("status"), "status_cand": rc.get("status")})
    for name, n in unmeasured.items():
        notes.append(f"{name}: not measured in either sweep for {n} point(s) (not gated there)")
    mism = sum(_fingerprint(b.loc[k]) != _fingerprint(c.loc[k]) for k in common)
    if mism:
        how = "gated anyway (--allow-env-mismatch)" if settings.allow_env_mismatch else "their timings are unknown"
        notes.append(f"{mism} matched point(s) ran in different environments (fingerprints differ): {how}")
    order = {v: i for i, v in enumerate(VERDICTS)}
    rows_df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    rows_df = rows_df.assign(_o=rows_df["verdict"].map(order)).sort_values(["_o", "label", "metric"]).drop(columns="_o")
    return GateResult(
        rows=rows_df.reset_index(drop=True),
        points=pd.DataFrame(points),
        base_only=_unmatched(b, c),
        cand_only=_unmatched(c, b),
        notes=notes,
        settings=settings,
    )


def holm(verdicts: list[Verdict], alpha: float) -> str:
    """Holm-Bonferroni over the verdicts a rank test decided (those with a p-value): the i-th smallest p of m
    must be below alpha / (m - i), and from the first that is not, none is significant. A regression or
    improvement that does not hold is no change, or unknown where its sample counts cannot reach that level.
    Returns the note that says what was corrected."""
    tested = sorted((v for v in verdicts if math.isfinite(v.p_value)), key=lambda v: v.p_value)
    m, held = len(tested), True
    for i, v in enumerate(tested):
        level = alpha / (m - i)
        held = held and v.p_value < level
        if held or v.verdict not in (REGRESSION, IMPROVEMENT):
            continue
        reach = min_p_value(v.n_base) if v.mode == "paired" else min_p_value(v.n_base, v.n_cand)
        v.verdict = UNKNOWN if reach >= level else NO_CHANGE
        v.reason = f"{_pct(v.change)} but p={v.p_value:.2g} is not below Holm's {level:.2g} (test {i + 1} of {m})"
    return f"Holm-Bonferroni over {m} rank test(s): alpha {alpha:g} bounds the chance of any false verdict"


def _unmatched(side: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Points of ``side`` with no partner in ``other``: listed in every output, never silently dropped."""
    rows = side.loc[~side.index.isin(other.index)]
    cols = [c for c in ("_label", "point_key", "status", "error") if c in rows.columns]
    return rows[cols].rename(columns={"_label": "label"}).reset_index(drop=True)
