"""How far the report's intervals and verdicts can be trusted: intervals of fewer than 6 samples are the sample
range with its real coverage (below 95%), labelled so and never the ground of a confident verdict; a speedup far
above the memory-traffic bound is flagged; speedups timed in turns say they are medians of per-round ratios."""

from __future__ import annotations

import math
import re

import pytest
from report_records import make_record

from harness.records import load, write_record
from harness.report import write_report
from harness.report.data import NO_GAIN_BAND, prepare, speed_verdict
from harness.report.tables import verdict_note
from harness.stats import summarize

QUANT = "quantized(scheme=int8)"


def _few(record: dict, n: int) -> dict:
    """``record`` with only its first ``n`` repetitions (as a point stopped early by the time budget)."""
    record["samples"] = {k: v[:n] for k, v in record["samples"].items()}
    record["summary"] = {k: summarize(v) for k, v in record["samples"].items()}
    record["timing"]["reps"] = n
    return record


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


def test_the_coverage_of_each_interval_is_a_table_column(tmp_path):
    write_record(tmp_path / "0", _few(make_record("eager", "tiny", 1, 0), 3))
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    df = load(tmp_path).set_index("variant")
    assert df.loc["eager", "tpot_ms_ci_coverage"] == pytest.approx(0.75)  # 3 samples: the range covers 75%
    assert df.loc[QUANT, "tpot_ms_ci_coverage"] >= 0.95
    assert df["ttft_ms_ci_coverage"].dtype.kind == "f"


def test_a_verdict_from_intervals_below_95_percent_is_uncertain(tmp_path):
    """Eager of 3 samples (its 'CI' is their range, 75% coverage) against a 2x faster variant: the CIs do not
    overlap, yet the verdict must not be 'faster' at a confidence the intervals do not have."""
    write_record(tmp_path / "0", _few(make_record("eager", "tiny", 1, 0), 3))
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    quant = prepare(load(tmp_path)).set_index("variant").loc[QUANT]
    assert quant.speedup_tpot > 1.9 and quant.speedup_tpot_ci_low > 1  # the interval alone would say faster
    assert quant.speedup_tpot_ci_coverage == pytest.approx(0.75)
    assert quant.verdict == "uncertain"
    page = write_report(tmp_path).read_text()
    points = _section(page, "points")
    # eager's interval is named by what it covers, the variant's 15-sample one stays a 95% CI
    assert re.search(r"\[[\d.]+, [\d.]+\] \(75% CI: the range of n=3\)", points)
    assert points.count("% CI: the range of n=") == 2  # eager's TTFT and TPOT
    assert re.search(r"uncertain \[[\d.]+, [\d.]+\] \(75% CI\)", points)
    summary = _section(page, "summary")
    assert "(uncertain)" in summary and "fewer than 6 samples" in summary
    # the same pair with 15 samples each is faster
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    assert prepare(load(tmp_path)).set_index("variant").loc[QUANT, "verdict"] == "faster"


def test_speed_verdict_needs_intervals_at_the_nominal_coverage():
    assert speed_verdict(2.0, 1.5, 2.5, coverage=0.9375) == "uncertain"
    assert speed_verdict(2.0, 1.5, 2.5, coverage=0.96) == speed_verdict(2.0, 1.5, 2.5) == "faster"
    assert speed_verdict(0.5, 0.4, 0.6, coverage=0.75) == "uncertain"
    assert speed_verdict(1.02, 0.5, 2.0, coverage=0.75) == "no gain"  # the band is read from the ratio alone


def test_a_speedup_far_above_the_memory_traffic_bound_is_flagged_as_suspect(tmp_path):
    """int8 halves the bytes a decode step reads (bound 2x); 20x over an eager slowed by a busy machine cannot
    come from the engine alone."""
    eager = make_record("eager", "tiny", 1, 0)
    eager["samples"] = {k: [10 * x for x in v] for k, v in eager["samples"].items()}
    eager["summary"] = {k: summarize(v) for k, v in eager["samples"].items()}
    write_record(tmp_path / "0", eager)
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    df = prepare(load(tmp_path)).set_index("variant")
    assert df.loc[QUANT, "bytes_speedup"] == pytest.approx(2.0) and df.loc[QUANT, "speedup_tpot"] > 19
    assert df.loc[QUANT, "speedup_suspect"] and not df.loc["eager", "speedup_suspect"]
    page = write_report(tmp_path).read_text()
    row = next(r for r in _section(page, "points").split("<tr") if QUANT in r)
    assert re.search(r"suspect: [\d.]+× the memory-traffic bound", row)
    summary = _section(page, "summary")
    assert "(faster, suspect)" in summary and "more than 4× the memory-traffic bound" in summary
    # the same variant over an eager measured on a quiet machine: 2x, at its bound, nothing to flag
    quiet = tmp_path / "quiet"
    write_record(quiet / "0", make_record("eager", "tiny", 1, 0))
    write_record(quiet / "1", make_record(QUANT, "tiny", 1, 1))
    assert not prepare(load(quiet)).speedup_suspect.any()
    page = write_report(quiet).read_text()
    assert "suspect" not in _section(page, "summary") + _section(page, "points")


def _paired(record: dict, median: float) -> dict:
    """``record`` as timed in turns with eager, its per-round ratios' median ``median``."""
    record["timing"]["interleaved"] = {
        "id": "turns", "points": 2, "position": 1, "rounds": 15,
        "vs_eager": {"tpot_ms": {"median": median, "ci_low": median * 0.9, "ci_high": median * 1.1,
                                 "coverage": 0.96, "n": 15}},
    }  # fmt: skip
    return record


def test_speedups_timed_in_turns_are_labelled_paired_and_explained(tmp_path):
    """The paired speedup (1.0) differs from the ratio of the medians shown (2x): the page says which it is."""
    eager = make_record("eager", "tiny", 1, 0)
    eager["timing"]["interleaved"] = {"id": "turns", "points": 2, "position": 0, "rounds": 15}
    write_record(tmp_path / "0", eager)
    write_record(tmp_path / "1", _paired(make_record(QUANT, "tiny", 1, 1), 1.0))
    df = prepare(load(tmp_path)).set_index("variant")
    assert df.loc[QUANT, "speedup_tpot"] == 1.0 and df.loc[QUANT, "speedup_tpot_paired"]
    page = write_report(tmp_path).read_text()
    summary = _section(page, "summary")
    assert "1.00× paired (no gain)" in summary
    assert "medians of the per-round ratios" in summary and "not the ratio of the medians shown" in summary
    assert "1.00× paired" in _section(page, "points")
    # the same points timed one after another: ratios of the medians, with the terminal's caveat
    sequential = tmp_path / "seq"
    write_record(sequential / "0", make_record("eager", "tiny", 1, 0))
    write_record(sequential / "1", make_record(QUANT, "tiny", 1, 1))
    summary = _section(write_report(sequential).read_text(), "summary")
    assert "paired" not in summary and "timed one after another" in summary


def test_the_verdict_legend_states_the_rules_the_code_applies():
    """Each legend line names the rule of ``speed_verdict``: slower is below 1 - NO_GAIN_BAND with a CI below 1."""
    import pandas as pd

    low = 1 - NO_GAIN_BAND
    cases = [(low - 0.01, low - 0.05, low - 0.001, 0.96), (0.5, 0.4, 0.6, 0.96), (2.0, 0.9, 2.5, 0.96),
             (2.0, 1.5, 2.5, 0.75), (1.01, 0.9, 1.1, 0.96)]  # fmt: skip
    rows = pd.DataFrame(
        [dict(status="ok", variant=f"v{i}", scenario="tiny", batch_size=1, speedup_tpot=r, speedup_tpot_ci_low=lo,
              speedup_tpot_ci_high=hi, speedup_tpot_ci_coverage=c, verdict=speed_verdict(r, lo, hi, c))
         for i, (r, lo, hi, c) in enumerate(cases)]
    )  # fmt: skip
    assert list(rows.verdict) == ["slower", "slower", "uncertain", "uncertain", "no gain"]
    note = verdict_note(rows)
    assert f"<b>slower</b> (TPOT ratio below {low:g} and its 95% CI below 1)" in note
    assert "<b>uncertain</b> (the ratio&#x27;s 95% CI contains 1, or an interval behind it covers less than 95%" in note
    assert f"<b>no gain</b> (TPOT within ±{NO_GAIN_BAND:.0%} of eager)" in note
    assert math.isclose(low, 0.95)
