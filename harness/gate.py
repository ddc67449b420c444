"""The CI regression gate: match the points of two sweeps and give every gated metric of every point a verdict.

Pure functions of tables (``harness.export.read_points``: the ``harness.records.load()`` table plus one
``samples.<metric>`` column of raw samples per timed metric); nothing here prints.

A timed metric is a regression only when four tests agree, so noise on a shared machine does not cry wolf:
the Mann-Whitney U test on the raw samples rejects "same distribution" at ``alpha``; the medians moved the
wrong way by more than the metric's minimum relative change; the order-statistic CIs of the two medians do not
overlap; and each side has at least ``min_samples`` samples. Two points timed in turns in one run
(``hydra/launcher=interleaved``: the same ``turns_id``) pair up by repetition, and the paired versions of the
tests apply (``decide_paired``): drift of the machine common to a round then cancels. Anything less is
"no change" (measured, within the threshold) or "unknown" (not comparable: too few samples, timings not
representative, different environment fingerprints, or not measured on one side) or "inconclusive" (an unknown
whose median moved beyond the threshold but whose tests did not confirm it: it needs more samples, and is never
read as no change). The decision rules are in ``harness.gate_decide``, matching (re-runs, changed keys, labels)
in ``harness.gate_match``, between-run noise from the history (``--history``) in ``harness.gate_noise``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.gate_decide import (  # noqa: F401  (re-exported: the gate's public names)
    IMPROVEMENT,
    INCONCLUSIVE,
    NO_CHANGE,
    REGRESSION,
    UNKNOWN,
    VERDICTS,
    Verdict,
    _inconclusive,
    _pct,
    decide_intervals,
    decide_paired,
    decide_samples,
    decide_value,
    min_p_value,
    within,
)
from harness.gate_match import dedupe, match_keys, pair_changed_keys, point_labels, unmatched
from harness.gate_noise import Noise
from harness.gate_settings import METRICS, MIN_FLIPPED_POSITIONS, GateInputError, Metric, Settings, check_metric

SAMPLE_PREFIX = "samples."
FAILED_STATUSES = ("failed", "oom", "timeout")
ROW_COLUMNS = ["key", "label", "point_key", "metric", "verdict", "reason", "base", "cand", "change", "p_value",
               "base_ci_low", "base_ci_high", "cand_ci_low", "cand_ci_high", "n_base", "n_cand", "mode",
               "threshold"]  # fmt: skip


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
    return _text_or_none(row.get("fingerprint"))


def _noise_floor(b: Mapping[str, Any], metric: Metric, threshold: float, settings: Settings,
                 noise: Noise | None) -> tuple[float, str]:  # fmt: skip
    """The threshold an unpaired timed metric needs: at least ``noise_k`` times the point's run-to-run spread of
    medians in the stored history (``--history``), where that is wider; and the words that say so."""
    spread = noise.get(b, metric) if noise is not None else None
    if spread is None:
        return threshold, ""
    sigma, n = spread
    floor = math.expm1(settings.noise_k * sigma)
    if floor <= threshold:
        return threshold, ""
    return floor, (f"; threshold {threshold:.1%} raised to {floor:.1%}: {settings.noise_k:g}x the run-to-run spread "
                   f"of medians ({sigma:.1%} over {n} stored sweeps)")  # fmt: skip


def _sample_verdict(b: Mapping[str, Any], c: Mapping[str, Any], metric: Metric, settings: Settings,
                    threshold: float, noise: Noise | None) -> Verdict | None:  # fmt: skip
    """A timed metric from raw samples (paired when timed in turns), else from the table's medians and CIs."""
    x, y = metric_samples(b, metric), metric_samples(c, metric)
    args = (metric.higher_is_better,)
    if x is not None and y is not None and _paired(b, c) and x.size == y.size:
        return decide_paired(x, y, *args, threshold, settings.alpha, settings.min_samples, settings.confidence)
    threshold, raised = _noise_floor(b, metric, threshold, settings, noise)  # between runs: drift is not cancelled
    if x is not None and y is not None:
        v = decide_samples(x, y, *args, threshold, settings.alpha, settings.min_samples, settings.confidence)
    else:
        bi, ci = table_interval(b, metric), table_interval(c, metric)
        if bi is None or ci is None:
            return Verdict(UNKNOWN, "ITL needs raw samples (gaps of one repetition are correlated)", mode="table")
        if all(math.isnan(t[0]) for t in (bi, ci)):
            return None
        v = decide_intervals(bi, ci, metric.higher_is_better, threshold)
        n = (_num(b.get(f"{metric.source}_n")), _num(c.get(f"{metric.source}_n")))
        if min(n) < settings.min_samples:
            v.verdict, v.reason = UNKNOWN, f"too few samples ({n[0]:.0f} vs {n[1]:.0f}; need {settings.min_samples})"
    v.reason += raised
    v.threshold = threshold
    return v


def metric_verdict(b: Mapping[str, Any], c: Mapping[str, Any], metric: Metric, settings: Settings,
                   noise: Noise | None = None) -> Verdict | None:  # fmt: skip
    """The verdict of one metric of one matched pair of ok points (None: measured on neither side)."""
    threshold = settings.thresholds.get(metric, c)
    if metric.kind != "samples":
        base, cand = _num(b.get(metric.source)), _num(c.get(metric.source))
        if math.isnan(base) and math.isnan(cand):
            return None
        threshold, raised = _position_floor(b, c, metric, threshold)
        v = decide_value(base, cand, metric, threshold)
        v.reason += raised
        v.threshold = threshold
    else:
        v = _sample_verdict(b, c, metric, settings, threshold, noise)
        if v is None:
            return None
        if not math.isfinite(v.threshold):
            v.threshold = threshold
    if v.verdict == UNKNOWN and INCONCLUSIVE not in v.reason:
        return v
    other_inputs = _quality_inputs_differ(b, c) if metric.quality else None
    if other_inputs:
        v.verdict, v.reason = UNKNOWN, f"{other_inputs}; {v.reason}"
    elif metric.timed and not (_representative(b) and _representative(c)):
        caveat = c.get("timing_caveat") if not _representative(c) else b.get("timing_caveat")
        v.verdict, v.reason = UNKNOWN, f"timings not representative ({caveat or 'marked by the engine'}); {v.reason}"
    elif metric.env_bound and _fingerprint(b) != _fingerprint(c):
        envs = f"environments differ ({_fingerprint(b)} vs {_fingerprint(c)})"
        if settings.allow_env_mismatch:
            v.reason = f"{v.reason}; {envs}, gated because of --allow-env-mismatch"
        else:
            v.verdict, v.reason = UNKNOWN, f"{envs}; {v.reason}"
    return v


def _position_floor(b: Mapping[str, Any], c: Mapping[str, Any], metric: Metric, threshold: float) -> tuple[float, str]:
    """An agreement's threshold, at least ``MIN_FLIPPED_POSITIONS`` of the positions it is over (the fewer side's);
    and the words that say it was raised."""
    n = min(_num(b.get(metric.positions)), _num(c.get(metric.positions))) if metric.positions else math.nan
    if not n > 0:  # NaN: a side predates the count
        return threshold, ""
    floor = MIN_FLIPPED_POSITIONS / n
    if floor <= threshold:
        return threshold, ""
    return floor, (f"; threshold {threshold:g} raised to {floor:.3g}: {MIN_FLIPPED_POSITIONS} of the {n:.0f} "
                   "positions scored (a flip or two at near-ties is numerics, not a regression)")  # fmt: skip


def _quality_inputs_differ(b: Mapping[str, Any], c: Mapping[str, Any]) -> str | None:
    """Why the sides' quality figures cannot be compared: scored on other inputs (``quality.*``, the seed, the
    corpus), or against a reference whose own logits were not finite. None when they can (or a side predates
    ``quality_inputs``)."""
    ib, ic = (_text_or_none(r.get("quality_inputs")) for r in (b, c))
    if ib and ic and ib != ic:
        return f"quality scored on other inputs ({ib} vs {ic}: quality.* settings, seed or corpus differ)"
    bad = [(side, _num(r.get("fidelity_reference_nonfinite"))) for side, r in (("BASE", b), ("CAND", c))]
    bad = [(side, x) for side, x in bad if x > 0]
    if bad:
        side, x = bad[0]
        return f"the reference's logits are not finite at {x:.1%} of scored positions in {side}"
    return None


def _text_or_none(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def status_verdict(b: Mapping[str, Any], c: Mapping[str, Any]) -> Verdict | None:
    """A point ok in BASE that fails in CAND (failed, oom, timeout) is a regression; skipped (engine unavailable
    here) is unknown, said "became unavailable" where the environments agree (then the code changed it); fixed
    is an improvement; not ok on both sides is unknown. None when both are ok."""
    sb, sc = str(b.get("status")), str(c.get("status"))
    if sb == "ok" and sc == "ok":
        return None
    err = c.get("error") if sc != "ok" else b.get("error")
    detail = f": {err}" if isinstance(err, str) and err else ""
    if sb == "ok" and sc in FAILED_STATUSES:
        return Verdict(REGRESSION, f"ok in BASE, {sc} in CAND{detail}", mode="status")
    if sb in FAILED_STATUSES and sc == "ok":  # skipped in BASE: nothing was measured there to improve on
        return Verdict(IMPROVEMENT, f"{sb} in BASE{detail}, ok in CAND", mode="status")
    if sb == "ok" and sc == "skipped" and _fingerprint(b) is not None and _fingerprint(b) == _fingerprint(c):
        return Verdict(UNKNOWN, f"became unavailable: ok in BASE, skipped in CAND in the same environment{detail}",
                       mode="status")  # fmt: skip
    return Verdict(UNKNOWN, f"{sb} in BASE, {sc} in CAND{detail}", mode="status")


DECISIVE = (REGRESSION, IMPROVEMENT, NO_CHANGE)
# what docs/ci.md measured when the sides were timed in separate windows (a shared 2-core VM, --mode points)
UNPAIRED_NOTE = (
    "{n} timed verdict(s) compare samples from separate runs (not timed in turns): the rank tests see only "
    "within-run noise, so run-to-run drift beyond the threshold reads as a change (docs/ci.md: 18.8% of A/A "
    "points flagged on a shared VM timed in separate windows); time the sides in turns, or pass --history to "
    "require changes beyond each point's run-to-run spread"
)


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

    def gated_metrics(self) -> list[str]:
        """The metrics that must get a verdict for the gate to have gated anything: the timed ones selected (a
        gate on quality alone: those)."""
        metrics = [check_metric(m) for m in self.settings.metrics]
        return [m.name for m in metrics if m.timed] or [m.name for m in metrics]

    @property
    def decisive(self) -> int:
        """Rows of ``gated_metrics`` with a regression, improvement or no-change verdict; 0: nothing was gated."""
        if not len(self.rows):
            return 0
        rows = self.rows[self.rows["metric"].isin(self.gated_metrics())]
        return int(rows["verdict"].isin(DECISIVE).sum())

    @property
    def unpaired(self) -> int:
        """Timed verdicts on samples of separate runs (unpaired): exposed to drift between the runs."""
        if not len(self.rows):
            return 0
        timed = self.rows["metric"].map(lambda m: m in METRICS and METRICS[m].timed)
        return int((timed & self.rows["mode"].isin(("samples", "table"))).sum())


def _judge(rb: dict[str, Any], rc: dict[str, Any], metrics: list[Metric], settings: Settings,
           noise: Noise | None, unmeasured: dict[str, int]) -> list[tuple[str, Verdict]]:  # fmt: skip
    sv = status_verdict(rb, rc)
    if sv is not None:
        return [("status", sv)]
    verdicts = []
    for m in metrics:
        v = metric_verdict(rb, rc, m, settings, noise)
        if v is None:
            unmeasured[m.name] = unmeasured.get(m.name, 0) + 1
        else:
            verdicts.append((m.name, v))
    return verdicts


def _sides(base: pd.DataFrame, cand: pd.DataFrame, on: list[str], notes: list[str]) -> tuple[pd.DataFrame, ...]:
    """BASE and CAND indexed by match key, labelled, with CAND's changed keys paired (``gate_match``)."""
    base, cand = dedupe(base, on, "BASE", notes), dedupe(cand, on, "CAND", notes)
    both = pd.concat([base, cand], ignore_index=True)
    side = pd.Series(["base"] * len(base) + ["cand"] * len(cand), index=both.index)
    extra = pd.DataFrame({"_side": side, "_label": point_labels(both, side), "_key": match_keys(both, on)},
                         index=both.index)  # fmt: skip
    both = pd.concat([both, extra], axis=1)  # at once: column by column, pandas warns the frame is fragmented
    b = both[both["_side"] == "base"].set_index("_key")
    c = both[both["_side"] == "cand"].set_index("_key")
    if "point_key" in on:
        c = pair_changed_keys(b, c, notes)
    return b, c


def compare(base: pd.DataFrame, cand: pd.DataFrame, settings: Settings | None = None,
            noise: Noise | None = None) -> GateResult:  # fmt: skip
    """Match points by ``settings.match`` columns and give each a verdict per gated metric; ``noise`` (from
    ``--history``) raises unpaired timed thresholds to the points' run-to-run spread."""
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
    b, c = _sides(base, cand, on, notes)
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
        label = rb["_label"] if rb["_label"] == rc["_label"] else f"{rb['_label']} → {rc['_label']}"
        ident = {"key": key, "label": label, "point_key": rc.get("point_key")}
        verdicts = _judge(rb, rc, metrics, settings, noise, unmeasured)
        if "point_key" in on and rb.get("point_key") != rc.get("point_key"):
            for _, v in verdicts:
                v.reason += f"; point key changed ({str(rb.get('point_key'))[:8]} -> {str(rc.get('point_key'))[:8]})"
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
    result = GateResult(rows=rows_df.reset_index(drop=True), points=pd.DataFrame(points), base_only=unmatched(b, c),
                        cand_only=unmatched(c, b), notes=notes, settings=settings)  # fmt: skip
    if result.unpaired:
        notes.append(UNPAIRED_NOTE.format(n=result.unpaired))
    return result


def holm(verdicts: list[Verdict], alpha: float) -> str:
    """Holm-Bonferroni over the verdicts a rank test decided (those with a p-value): the i-th smallest p of m
    must be below alpha / (m - i), and from the first that is not, none is significant. A regression or
    improvement that does not hold is inconclusive (unknown: the change is beyond the threshold, the evidence
    not strong enough). Returns the note that says what was corrected."""
    tested = sorted((v for v in verdicts if math.isfinite(v.p_value)), key=lambda v: v.p_value)
    m, held = len(tested), True
    for i, v in enumerate(tested):
        level = alpha / (m - i)
        held = held and v.p_value < level
        if held or v.verdict not in (REGRESSION, IMPROVEMENT):
            continue
        reach = min_p_value(v.n_base) if v.mode == "paired" else min_p_value(v.n_base, v.n_cand)
        why = " (these sample counts cannot reach it)" if reach >= level else ""
        _inconclusive(v, f"{_pct(v.change)} but p={v.p_value:.2g} is not below Holm's {level:.2g} (test {i + 1} of "
                         f"{m}){why}")  # fmt: skip
    return f"Holm-Bonferroni over {m} rank test(s): alpha {alpha:g} bounds the chance of any false verdict"
