"""The report's tables as HTML fragments (the header is ``header``). Every value is HTML-escaped here: config
values, variant names and error messages are user text."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd

from harness.report.data import BASELINE, NO_GAIN_BAND, NOMINAL_COVERAGE, SUSPECT_OVER_BOUND, below_nominal, ranked
from harness.report.labels import cell_text

NOT_RANKED = "timing not representative"
OTHER_INPUTS = "other quality inputs than eager"
ONCE_PER_ENGINE = (
    "Top-1 agreement, KL and perplexity are measured once per engine, its quality settings and seed, on the same "
    "rows per forward pass whatever the batch size: a variant shows the same figures at every batch size, over "
    "the positions counted in 'quality positions scored'."
)


class Markup(str):
    """An HTML fragment built from escaped parts."""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, suffix: str = "") -> str:
    """Numbers with 4 significant digits (thousands separated), '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating) and math.isinf(value):  # measured, e.g. an overflowing perplexity
        return "inf" if value > 0 else "-inf"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | float | np.number):
        v = float(value)
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return text + suffix
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], classes: Iterable[str] | None = None) -> str:
    """An HTML table; cells are escaped unless given as ``Markup`` (already-escaped fragments)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row, cls in zip(rows, classes or repeat(""), strict=False):
        cells = "".join(f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in row)
        body.append(f'<tr class="{esc(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def speedup(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, int | float) and math.isfinite(value) else "-"


def percent(coverage: float) -> str:
    return f"{100 * coverage:.3g}%"


def interval_note(coverage: Any, n: Any) -> str:
    """'(75% CI: the range of n=3)' for an interval below the nominal coverage (fewer than 6 samples), else ''."""
    return f"({percent(coverage)} CI: the range of n={fmt(n)})" if below_nominal(coverage) else ""


def _ci(row: pd.Series, metric: str) -> str:
    """'23.59 [13.3, 26.97]', with the interval's real coverage where it is below 95%."""
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(row.get(f"{metric}_p50"))
    note = interval_note(row.get(f"{metric}_ci_coverage"), row.get(f"{metric}_n"))
    return f"{fmt(row.get(f'{metric}_p50'))} [{fmt(lo)}, {fmt(hi)}]" + (f" {note}" if note else "")


def verdict(row: pd.Series) -> str:
    """'no gain [0.944, 1.17]': what the TPOT ratio over eager says, with its CI where known (and the CI's
    coverage where an interval behind it covers less than 95%)."""
    v = row.get("verdict")
    if not isinstance(v, str):
        return "-"
    interval = speedup_interval(row)
    return f"{v} {interval}" if interval != "-" else v


def speedup_interval(row: pd.Series) -> str:
    """'[0.944, 1.17]': the TPOT speedup's CI, with its coverage where an interval behind it covers less than 95%;
    '-' where unknown."""
    lo, hi = row.get("speedup_tpot_ci_low"), row.get("speedup_tpot_ci_high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "-"
    coverage = row.get("speedup_tpot_ci_coverage")
    return f"[{lo:.3g}, {hi:.3g}]" + (f" ({percent(coverage)} CI)" if below_nominal(coverage) else "")


def flag(row: pd.Series, column: str) -> bool:
    """A boolean cell that is true (missing, NaN and None are not)."""
    value = row.get(column)
    return isinstance(value, bool | np.bool_) and bool(value)


def tpot_speedup(row: pd.Series, with_verdict: bool = False) -> str:
    """'1.00× paired (no gain, suspect)': the TPOT speedup, marked paired where it is the median of per-round
    ratios (timed in turns with eager), with its verdict and whether it is suspect (``speedup_note``)."""
    text = speedup(row.get("speedup_tpot")) + (" paired" if flag(row, "speedup_tpot_paired") else "")
    flags = [row["verdict"]] if with_verdict and isinstance(row.get("verdict"), str) else []
    flags += ["suspect"] if flag(row, "speedup_suspect") else []
    return text + (f" ({', '.join(flags)})" if flags else "")


def verdict_note(df: pd.DataFrame) -> str:
    """One line per verdict other than faster, naming the variants it applies to (the optimizations that did
    not pay on this workload), and how the verdicts are decided."""
    ok = df[df["status"].eq("ok") & df["verdict"].notna()] if "verdict" in df else df.iloc[:0]
    lines = []
    rules = (
        ("no gain", f"TPOT within ±{NO_GAIN_BAND:.0%} of eager"),
        ("slower", f"TPOT ratio below {1 - NO_GAIN_BAND:g} and its 95% CI below 1"),
        ("uncertain", f"the ratio's 95% CI contains 1, or an interval behind it covers less than "
                      f"{NOMINAL_COVERAGE:.0%}, from fewer than 6 samples"),
    )  # fmt: skip
    for v, why in rules:
        rows = ok[ok["verdict"].eq(v)].sort_values(["scenario", "batch_size", "variant"])
        if len(rows):
            items = "; ".join(f"{esc(r['variant'])} on {esc(r['scenario'])} b{fmt(r['batch_size'])} "
                              f"{speedup(r['speedup_tpot'])}" for _, r in rows.iterrows())  # fmt: skip
            lines.append(f"<li><b>{esc(v)}</b> ({esc(why)}): {items}</li>")
    if not lines:
        return ""
    return f"<ul class='verdicts'>{''.join(lines)}</ul>"


def speedup_note(df: pd.DataFrame) -> str:
    """How the speedups beside the medians were obtained (paired, or ratios of medians timed one after another),
    which intervals cover less than 95%, and what a suspect speedup is; empty without a speedup over eager."""
    ok = df[df["status"].eq("ok")]
    compared = ok[ok["variant"].ne(BASELINE) & np.isfinite(ok["speedup_tpot"])]
    if compared.empty:
        return ""
    paired = compared["speedup_tpot_paired"].eq(True)
    lines = []
    if paired.any():
        lines.append("Speedups marked paired were timed in turns with eager (one repetition of each per round): they "
                     "are medians of the per-round ratios, not the ratio of the medians shown beside them, and drift "
                     "of the machine cancels in them.")  # fmt: skip
    if (~paired).any():
        lines.append(f"{'Other speedups' if paired.any() else 'Speedups'} are ratios of the medians of points timed "
                     "one after another: on a machine whose speed drifts, time them in turns "
                     "(hydra/launcher=interleaved).")  # fmt: skip
    low = [c for c in ("tpot_ms_ci_coverage", "ttft_ms_ci_coverage", "speedup_tpot_ci_coverage") if c in ok]
    if ok[low].map(below_nominal).any(axis=None):
        lines.append(f"Intervals marked with a coverage below {NOMINAL_COVERAGE:.0%} come from fewer than 6 samples: "
                     "they are the whole sample range, which holds the median only with that probability, and a "
                     "verdict drawn from one is uncertain.")  # fmt: skip
    if compared["speedup_suspect"].eq(True).any():
        lines.append(f"Speedups marked suspect are more than {SUSPECT_OVER_BOUND:g}× the memory-traffic bound "
                     "(eager's decode bytes per step over the variant's): check eager's timing (noisy, too few "
                     "samples, a busy machine) before trusting them.")  # fmt: skip
    return "".join(f"<p class='note'>{esc(line)}</p>" for line in lines)


def ttft_speedup(row: pd.Series) -> str:
    """'1.50× paired': the TTFT speedup, marked paired where it is the median of per-round ratios."""
    return speedup(row.get("speedup_ttft")) + (" paired" if flag(row, "speedup_ttft_paired") else "")


def baseline_first(df: pd.DataFrame, keys: Sequence[str] = ("scenario", "variant", "batch_size")) -> pd.DataFrame:
    """``df`` sorted by ``keys``, eager before the other variants of its scenario (so the baseline heads them)."""
    by: list[str] = []
    for key in keys:
        by += ["_not_baseline", key] if key == "variant" else [key]
    order = df.assign(_not_baseline=~df["variant"].eq(BASELINE))
    return order.sort_values(by, na_position="last").drop(columns="_not_baseline")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool) and math.isfinite(value)


def _ci_n(row: pd.Series, metric: str = "tpot_ms", n: str = "n_reps") -> str:
    """``_ci`` and the sample count (which an interval below 95% already names)."""
    named = below_nominal(row.get(f"{metric}_ci_coverage")) and _finite(row.get(f"{metric}_ci_low"))
    return _ci(row, metric) + (f", n={fmt(row.get(n))}" if _finite(row.get(n)) and not named else "")


def _eager_tpot(row: pd.Series) -> str:
    """Eager's TPOT p50 with its CI and n: the denominator of the speedup beside it."""
    prefix = f"{BASELINE}_"
    eager = pd.Series({str(k).removeprefix(prefix): v for k, v in row.items() if str(k).startswith(prefix)})
    if not _finite(eager.get("tpot_ms_p50")):
        return "-"
    return _ci_n(eager)


def _caveat(row: pd.Series) -> str:
    caveat = row.get("timing_caveat")
    return f"{NOT_RANKED}: {caveat}" if isinstance(caveat, str) and caveat else NOT_RANKED


def summary_table(df: pd.DataFrame) -> str:
    """Best variant (lowest TPOT p50 among representative timings) per scenario and batch, with its speedups
    vs eager; variants whose timings cannot be ranked are listed beside it, never chosen."""
    ok = df[df["status"].eq("ok")]
    if ok.empty:
        return "<p class='note'>No point was measured successfully.</p>"
    candidates = ranked(df)
    rows = []
    for (scenario, batch), group in ok.groupby(["scenario", "batch_size"], sort=True):
        pool = candidates[candidates["scenario"].eq(scenario) & candidates["batch_size"].eq(batch)]
        unranked = group[~group["representative"]]
        note = "; ".join(f"{r['variant']} {speedup(r['speedup_tpot'])} ({_caveat(r)})" for _, r in unranked.iterrows())
        if pool.empty:
            rows.append([scenario, fmt(batch), *["-"] * 9, note or "-"])
            continue
        best = pool.loc[pool["tpot_ms_p50"].idxmin()]
        flags = _timing_flags(best, group)
        rows.append(
            [
                scenario,
                fmt(batch),
                best["variant"],
                _ci_n(best),
                _eager_tpot(best),
                tpot_speedup(best, with_verdict=True) + (f"; {flags}" if flags else ""),
                "-" if best["variant"] == BASELINE else speedup_interval(best),
                ttft_speedup(best),
                _tps(best),
                fmt(best.get("fidelity_top1")) + (f" ({OTHER_INPUTS})" if flag(best, "quality_other_inputs") else ""),
                _ppl_cost(best, ok),
                note or "-",
            ]
        )
    headers = [
        "scenario",
        "batch",
        "best variant",
        "TPOT p50 ms [95% CI], n",
        "eager TPOT p50 ms [95% CI], n",
        "TPOT speedup",
        "TPOT speedup 95% CI",
        "TTFT speedup",
        "decode tok/s [95% CI]",
        "top-1 agreement with eager",
        "perplexity (eager)",
        f"not ranked ({NOT_RANKED})",
    ]
    return table(headers, rows)


def _timing_flags(best: pd.Series, group: pd.DataFrame) -> str:
    """'noisy: eager; drifting: the variant': the flags of the two timings a speedup divides, where it is read."""
    eager = group[group["variant"].eq(BASELINE)]
    if best["variant"] == BASELINE:  # eager is the fastest: one timing, eager's own
        sides = [("eager", best)]
    else:
        sides = [("the variant", best)] + ([("eager", eager.iloc[0])] if len(eager) else [])
    parts = []
    for flag in ("noisy", "drifting"):
        who = [name for name, row in sides if isinstance(row.get(flag), bool | np.bool_) and bool(row.get(flag))]
        if who:
            parts.append(f"{flag}: {' and '.join(who)}")
    return "; ".join(parts)


def _ppl_cost(best: pd.Series, ok: pd.DataFrame) -> str:
    """The best variant's held-out perplexity next to eager's in the same scenario (the same weights, seed and
    shape: what the speed costs), scored on the same quality inputs; where eager's were other text, said so."""
    ppl = best.get("ppl")
    if ppl is None or not np.isfinite(ppl):
        return "-"
    eager = ok[ok["variant"].eq(BASELINE) & ok["scenario"].eq(best["scenario"]) & np.isfinite(ok["ppl"])]
    inputs = cell_text(best.get("quality_inputs"))
    eager_inputs = eager.get("quality_inputs", pd.Series(None, index=eager.index, dtype=object)).map(cell_text)
    same = eager[eager_inputs.isin({inputs, ""})] if inputs else eager  # an unknown id (older rows) is no mismatch
    if len(same):
        return f"{fmt(ppl)} ({fmt(same['ppl'].iloc[0])})"
    return f"{fmt(ppl)} (eager: {OTHER_INPUTS})" if len(eager) else fmt(ppl)


def _tps(row: pd.Series) -> str:
    """Decode tokens/s with the CI mapped from the TPOT median's."""
    lo, hi = row.get("tps_ci_low"), row.get("tps_ci_high")
    value = fmt(row.get("decode_tokens_per_s"))
    if not (_finite(lo) and _finite(hi)):
        return value
    return f"{value} [{fmt(lo)}, {fmt(hi)}]"


def points_table(df: pd.DataFrame) -> str:
    """Every measured point with its main numbers; non-representative timings are greyed and say why."""
    ok = baseline_first(df[df["status"].eq("ok")])
    rows, classes = [], []
    for _, r in ok.iterrows():
        notes = [] if r["representative"] else [_caveat(r)]
        if r.get("noisy") is True:
            notes.append("noisy (IQR/median > 10%)")
        if r.get("drifting") is True:
            notes.append("drifting (the timings trend through the window: its median stands for neither end)")
        if flag(r, "speedup_suspect"):
            notes.append(f"suspect: {r['speedup_tpot'] / r['bytes_speedup']:.1f}× the memory-traffic bound "
                         "(check eager's timing)")  # fmt: skip
        if isinstance(r.get("precision_caveat"), str):
            notes.append(r["precision_caveat"])
        if flag(r, "quality_other_inputs"):
            notes.append(f"{OTHER_INPUTS} (quality_inputs {cell_text(r.get('quality_inputs'))}): its top-1, KL "
                         "and perplexity are not comparable with eager's")  # fmt: skip
        nonfinite = r.get("fidelity_nonfinite")
        if isinstance(nonfinite, float) and nonfinite > 0:
            notes.append(f"NaN/inf logits at {nonfinite:.2%} of the quality positions (KL, perplexity not numbers)")
        rows.append(
            [
                r["scenario"],
                r["variant"],
                fmt(r["batch_size"]),
                _ci(r, "ttft_ms"),
                _ci(r, "tpot_ms"),
                _tps(r),
                tpot_speedup(r),
                verdict(r),
                "-" if r["variant"] == BASELINE else speedup(r.get("bytes_speedup")),
                fmt(r["peak_memory_mb"]),
                _top1(r),
                fmt(r.get("fidelity_kl")),
                fmt(r.get("ppl")),
                _positions(r),
                fmt(r.get("sparsity")),
                fmt(r["n_reps"]),
                r.get("stop_reason") or "-",
                "; ".join(notes) or "-",
            ]
        )
        classes.append("" if r["representative"] else "nr")
    headers = [
        "scenario",
        "variant",
        "batch",
        "TTFT p50 ms [95% CI]",
        "TPOT p50 ms [95% CI]",
        "decode tok/s [95% CI]",
        "TPOT speedup",
        "vs eager [95% CI]",
        "memory-traffic bound (eager's decode bytes / the variant's)",
        "peak memory MiB",
        "top-1 agreement with eager (on decode steps)",
        "KL(eager ‖ variant) nats/token",
        "perplexity",
        "quality positions scored (decode steps)",
        "sparsity (measured)",
        "n",
        "stopped by",
        "notes",
    ]
    return table(headers, rows, classes)


def _positions(row: pd.Series) -> str:
    """How many positions the quality figures are over, and how many of them were decode steps."""
    overall, decode = fmt(row.get("fidelity_n")), row.get("fidelity_n_decode")
    return f"{overall} ({fmt(decode)})" if _finite(decode) else overall


def quality_note(df: pd.DataFrame) -> str:
    """That quality is measured once per engine (shared by its batch sizes), and which points scored other
    inputs than eager; empty without a quality figure."""
    ok = df[df["status"].eq("ok")]
    cols = [c for c in ("fidelity_top1", "fidelity_kl", "ppl") if c in ok]
    if ok.empty or not ok[cols].notna().any(axis=None):
        return ""
    text = ONCE_PER_ENGINE
    if "quality_other_inputs" in ok and ok["quality_other_inputs"].eq(True).any():
        text += f" Points marked '{OTHER_INPUTS}' scored other text or settings than eager (quality_inputs differ)."
    return f"<p class='note'>{esc(text)}</p>"


def _top1(row: pd.Series) -> str:
    """Top-1 agreement over every scored position, and over those fed one token at a time through the KV cache."""
    overall, decode = fmt(row.get("fidelity_top1")), row.get("fidelity_top1_decode")
    return f"{overall} ({fmt(decode)})" if isinstance(decode, float) and math.isfinite(decode) else overall


def failed_table(df: pd.DataFrame, unreadable: Sequence[str] = (), missing: Sequence[dict[str, Any]] = ()) -> str:
    """Every point that did not measure (failed, skipped, oom, timeout), every unreadable record, and every point
    a sweep planned that left no record at all (its process died, or the sweep was stopped), with why."""
    bad = df[~df["status"].eq("ok")].sort_values(["status", "scenario", "variant", "batch_size"])
    rows = [
        [r["status"], r["variant"], r["scenario"], fmt(r["batch_size"]), r["error"] or "-", r["record_path"]]
        for _, r in bad.iterrows()
    ]
    rows += [["unreadable", "-", "-", "-", msg, msg.split(":", 1)[0]] for msg in unreadable]
    why = "no record: the process running it ended before writing one, or the sweep was stopped"
    rows += [["missing", " ".join(m["overrides"]), "-", "-", why, f"job {m['job']}"] for m in missing]
    if not rows:
        return "<p class='note'>Every point was measured: none failed or was skipped.</p>"
    return table(["status", "variant", "scenario", "batch", "reason", "record"], rows, ["bad"] * len(rows))
