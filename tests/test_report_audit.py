"""What a performance engineer checks in the report before trusting it: quality compared only where it was scored
on the same inputs as eager's (and said to be measured once per engine, over how many positions), eager heading
its scenario, every median and speedup in the summary with its interval and sample count, paired TTFT speedups
marked as such, the measured sparsity shown, and no warning noise from building the report."""

from __future__ import annotations

import re
import warnings

import numpy as np
from report_records import make_record
from test_report_intervals import _section

from harness.records import load, write_record
from harness.report import build_html, collect, figures, write_report
from harness.report.data import prepare, with_sections
from harness.report.quality import quality_scatter
from harness.report.tables import ONCE_PER_ENGINE, OTHER_INPUTS, fmt, summary_table

QUANT = "quantized(scheme=int8)"
PRUNED = "pruned(sparsity=0.5)"


def _with_inputs(record: dict, inputs_id: str) -> dict:
    record["quality"]["inputs_id"] = inputs_id
    return record


def _rows(fragment: str) -> list[str]:
    return [r for r in fragment.split("<tr")[1:] if "<td" in r]


def test_quality_scored_on_other_inputs_than_eagers_is_not_compared_with_it(tmp_path):
    """Eager and pruned scored the same windows; quantized scored others (another quality.n_seqs, say). Its
    perplexity is not set beside eager's, it is left off the speed-vs-quality axes with why, and its row says so."""
    write_record(tmp_path / "0", _with_inputs(make_record("eager", "tiny", 1, 0), "aaaa"))
    write_record(tmp_path / "1", _with_inputs(make_record(QUANT, "tiny", 1, 1), "bbbb"))
    write_record(tmp_path / "2", _with_inputs(make_record(PRUNED, "tiny", 1, 2), "aaaa"))
    df, records, _ = collect([tmp_path])
    data = with_sections(prepare(df), records)
    other = dict(zip(data["variant"], data["quality_other_inputs"], strict=True))
    assert other == {"eager": False, QUANT: True, PRUNED: False}
    summary = summary_table(data)  # quantized (2x) is the best variant: its perplexity 12.5 is not vs eager's 12
    assert f"12.5 (eager: {OTHER_INPUTS})" in summary and "12.5 (12)" not in summary
    assert f"0.97 ({OTHER_INPUTS})" in summary
    fig, note = quality_scatter(data)
    drawn = {name for trace in fig.data for name in (trace.text or ())}
    assert QUANT not in drawn and {"eager", PRUNED} <= drawn
    assert f"{QUANT} on tiny ({OTHER_INPUTS}: quality_inputs differ)" in note
    page = build_html(df, records)
    quant_row = next(r for r in _rows(_section(page, "points")) if QUANT in r)
    assert "quality_inputs bbbb" in quant_row and "not comparable with eager" in quant_row
    pruned_row = next(r for r in _rows(_section(page, "points")) if PRUNED in r)
    assert OTHER_INPUTS not in pruned_row
    # rows stored before quality.inputs_id existed compare as they did
    for i in range(3):
        write_record(tmp_path / "old" / str(i), make_record(("eager", QUANT, PRUNED)[i], "tiny", 1, i))
    old = prepare(load(tmp_path / "old"))
    assert not old["quality_other_inputs"].any() and "12.5 (12)" in summary_table(old)


def test_quality_is_said_to_be_measured_once_per_engine_over_its_positions(tmp_path):
    """The same top-1/KL/perplexity at batch 1 and 4 is one measurement, not two agreeing ones: the page says so
    and names how many positions the figures are over."""
    for i, (variant, batch) in enumerate((("eager", 1), ("eager", 4), (QUANT, 1), (QUANT, 4))):
        record = make_record(variant, "tiny", batch, i)
        record["quality"]["decode_n_tokens"] = 128
        write_record(tmp_path / str(i), record)
    page = write_report(tmp_path).read_text()
    once = ONCE_PER_ENGINE.replace("'", "&#x27;")
    assert once in _section(page, "points") and once in _section(page, "quality")
    points = _section(page, "points")
    assert "quality positions scored (decode steps)" in points
    assert all("<td>4,096 (128)</td>" in r for r in _rows(points))


def test_eager_heads_its_scenario_in_the_points_table_and_the_figures(tmp_path):
    """A variant whose name sorts before 'eager' (distilled, compiled) must not push the baseline down."""
    for i, variant in enumerate(("distilled", "eager", QUANT)):
        for j, batch in enumerate((1, 4)):
            write_record(tmp_path / f"{i}{j}", make_record(variant, "tiny", batch, 2 * i + j))
    df, records, _ = collect([tmp_path])
    data = with_sections(prepare(df), records)
    page = build_html(df, records)
    variants = [re.findall(r"<td>(.*?)</td>", r)[1] for r in _rows(_section(page, "points"))]
    assert variants == ["eager", "eager", "distilled", "distilled", QUANT, QUANT]
    heat = figures.speedup_heatmap(data)
    assert list(heat.data[0].y) == ["eager", "distilled", QUANT]
    assert heat.layout.yaxis.autorange == "reversed"  # the first row is drawn on top
    tpot = figures.by_batch(data, "tpot_ms_p50", "TPOT", "TPOT p50 (ms)")
    assert tpot.data[0].name == "eager"  # the first trace, the first legend entry


def test_the_summary_gives_each_median_and_speedup_its_interval_and_sample_count(tmp_path):
    """The summary's speedup divides two medians: both come with their 95% CI and n, and the speedup with its
    own CI; decode tokens/s with the CI mapped from TPOT's."""
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    data = prepare(load(tmp_path))
    eager, quant = (data[data["variant"].eq(v)].iloc[0] for v in ("eager", QUANT))
    row = re.findall(r"<td>(.*?)</td>", _rows(summary_table(data))[0])
    assert "TPOT speedup 95% CI" in summary_table(data)
    fmt4 = fmt
    assert row[3] == f"{fmt4(quant.tpot_ms_p50)} [{fmt4(quant.tpot_ms_ci_low)}, {fmt4(quant.tpot_ms_ci_high)}], n=15"
    assert row[4] == f"{fmt4(eager.tpot_ms_p50)} [{fmt4(eager.tpot_ms_ci_low)}, {fmt4(eager.tpot_ms_ci_high)}], n=15"
    assert row[6] == f"[{quant.speedup_tpot_ci_low:.3g}, {quant.speedup_tpot_ci_high:.3g}]"
    assert row[8] == f"{fmt4(quant.decode_tokens_per_s)} [{fmt4(quant.tps_ci_low)}, {fmt4(quant.tps_ci_high)}]"


def test_a_paired_ttft_speedup_is_marked_paired(tmp_path):
    """Timed in turns, the TTFT speedup is the median of per-round ratios, not the ratio of the medians shown:
    like TPOT's, it says so."""
    eager = make_record("eager", "tiny", 1, 0)
    quant = make_record(QUANT, "tiny", 1, 1)
    for record, position in ((eager, 0), (quant, 1)):
        record["timing"]["interleaved"] = {"id": "turns", "points": 2, "position": position, "rounds": 15}
    stat = {"median": 1.5, "ci_low": 1.4, "ci_high": 1.6, "coverage": 0.96, "n": 15}
    quant["timing"]["interleaved"]["vs_eager"] = {"ttft_ms": stat, "tpot_ms": {**stat, "median": 2.0}}
    write_record(tmp_path / "0", eager)
    write_record(tmp_path / "1", quant)
    data = prepare(load(tmp_path))
    row = re.findall(r"<td>(.*?)</td>", _rows(summary_table(data))[0])
    assert row[5].startswith("2.00× paired") and row[7] == "1.50× paired"


def test_the_measured_sparsity_is_in_the_points_table(tmp_path):
    """A pruned engine's requested sparsity is in its name; what it removed is in the record, and shown."""
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    pruned = make_record(PRUNED, "tiny", 1, 1)
    pruned["engine_info"] = {"sparsity": 0.4873}
    write_record(tmp_path / "1", pruned)
    page = build_html(*collect([tmp_path])[:2])
    points = _section(page, "points")
    assert "sparsity (measured)" in points
    assert "<td>0.4873</td>" in next(r for r in _rows(points) if PRUNED in r)


def test_a_report_of_failed_points_builds_without_warnings(tmp_path):
    """Records without measurements leave many columns to fill: building the report must not print pandas'
    fragmentation warning (or any other) to the user's terminal."""
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0, status="failed", error="RuntimeError: x"))
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1, status="oom", error=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = write_report(tmp_path).read_text()
    failed = _section(page, "failed")
    assert "RuntimeError: x" in failed and "<td>oom</td>" in failed


def test_a_point_that_did_not_measure_shows_its_status_in_the_heatmap(tmp_path):
    """quantized ran out of memory at batch 4: its cell says oom (the error in the hover), not an empty cell
    that reads as a point never run; a variant that measured nowhere still gets its row."""
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    write_record(tmp_path / "1", make_record("eager", "tiny", 4, 1))
    write_record(tmp_path / "2", make_record(QUANT, "tiny", 1, 2))
    write_record(tmp_path / "3", make_record(QUANT, "tiny", 4, 3, status="oom", error="CUDA out of memory <b>"))
    write_record(tmp_path / "4", make_record("gpu-only", "tiny", 1, 4, status="skipped", error="needs CUDA"))
    heat = figures.speedup_heatmap(prepare(load(tmp_path)))
    trace = heat.data[0]
    rows = {v: i for i, v in enumerate(trace.y)}
    assert list(trace.y) == ["eager", "gpu-only", QUANT] and list(trace.x) == ["1", "4"]
    assert trace.text[rows[QUANT]][1] == "oom" and np.isnan(np.asarray(trace.z, dtype=float)[rows[QUANT], 1])
    assert trace.customdata[rows[QUANT]][1] == "oom: CUDA out of memory &lt;b&gt;"
    assert list(trace.text[rows["gpu-only"]]) == ["skipped", ""]
    assert trace.text[rows[QUANT]][0].startswith("2.0") and "a status: not measured" in heat.layout.title.text


def test_speed_vs_quality_names_speedups_averaged_over_fewer_batch_sizes(tmp_path):
    """Quantized ran out of memory at batch 4: its speed-axis position is the mean over batch 1 alone, which the
    others' means over 1 and 4 are not like for like with. The note says so."""
    for i, (variant, batch) in enumerate((("eager", 1), ("eager", 4), (PRUNED, 1), (PRUNED, 4), (QUANT, 1))):
        write_record(tmp_path / str(i), make_record(variant, "tiny", batch, i))
    write_record(tmp_path / "5", make_record(QUANT, "tiny", 4, 5, status="oom", error="out of memory"))
    fig, note = quality_scatter(prepare(load(tmp_path)))
    assert fig is not None
    assert f"{QUANT} on tiny over batch 1 only (the others also over 4)" in note
    assert PRUNED not in note and "eager on" not in note


def test_a_noisy_eager_that_is_the_best_variant_is_named_eager(tmp_path):
    """Where eager itself is the fastest, its noise flag names eager, not 'the variant'."""
    eager = make_record("eager", "tiny", 1, 0)
    eager["summary"]["tpot_ms"]["noisy"] = True
    write_record(tmp_path / "0", eager)
    write_record(tmp_path / "1", make_record(PRUNED, "tiny", 1, 1))
    data = prepare(load(tmp_path))
    data.loc[data["variant"].eq(PRUNED), "tpot_ms_p50"] *= 3  # slower than eager: eager is the best
    row = re.findall(r"<td>(.*?)</td>", _rows(summary_table(data))[0])
    assert row[2] == "eager" and row[5] == "1.00×; noisy: eager"
