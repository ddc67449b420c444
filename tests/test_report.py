"""The HTML report: speedups, ranking rules, every figure on synthetic records that carry all record sections,
notes instead of empty charts, escaping, the `harness report` command, and the report of a real sweep."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
from atomic_files import old_file, replaced_not_rewritten
from plotly.offline import get_plotlyjs
from report_records import EVIL, PEAK_FLOPS, PEAK_GBS, TIMELINE_LEN, make_record, synthetic_sweep

from harness import callbacks
from harness.cli import main as harness_main
from harness.records import RECORD_NAME, load, write_record
from harness.report import collect, figures, write_report
from harness.report.data import TIMELINE_MAX_SAMPLES, best_per_batch, pareto_front, prepare, timeline_frame
from harness.report.data import with_sections as add_sections
from harness.report.quality import quality_metric, quality_scatter

ESCAPED_EVIL = "&lt;script&gt;window.__pwned=1&lt;/script&gt;"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return synthetic_sweep(tmp_path_factory.mktemp("synthetic") / "sweep")


@pytest.fixture(scope="module")
def data(sweep):
    df, records, _ = collect([sweep])
    return add_sections(prepare(df), records), records


def _row(df, variant, model, batch):
    sel = df[(df.variant == variant) & (df.model == model) & (df.batch_size == batch)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_speedup_is_eager_p50_over_the_variants_on_the_same_point(data, sweep):
    df, _ = data
    ok = df[df.status == "ok"]
    assert len(ok) == 16 and ok.speedup_tpot.notna().all()
    for _, r in ok.iterrows():
        eager = _row(df, "eager", r.model, r.batch_size)
        assert math.isclose(r.speedup_tpot, eager.tpot_ms_p50 / r.tpot_ms_p50)
        assert math.isclose(r.speedup_ttft, eager.ttft_ms_p50 / r.ttft_ms_p50)
    quant = _row(df, "quantized(scheme=int8)", "small", 4)
    assert 1.9 < quant.speedup_tpot < 2.1  # the synthetic variant is 2x faster than eager
    # tokens/s CI is the TPOT median's CI mapped through batch / TPOT
    assert math.isclose(quant.tps_ci_low, 4 * 1000 / quant.tpot_ms_ci_high)
    assert quant.tps_ci_low < quant.decode_tokens_per_s < quant.tps_ci_high


def test_bytes_speedup_is_the_memory_traffic_bound_of_the_tpot_speedup(data, sweep):
    """Eager's decode bytes per step over the variant's, beside the measured speedup (terminal and report)."""
    from harness.summary import summary_table as terminal_summary

    df, _ = data
    for _, r in df[df.status == "ok"].iterrows():
        eager = _row(df, "eager", r.model, r.batch_size)
        assert math.isclose(r.bytes_speedup, eager.decode_bytes_per_step / r.decode_bytes_per_step)
    assert math.isclose(_row(df, "quantized(scheme=int8)", "small", 1).bytes_speedup, 2.0)  # half the bytes
    assert math.isclose(_row(df, "pruned(sparsity=0.5)", "small", 1).bytes_speedup, 1.0)  # zeros stored dense
    lines = terminal_summary(load(sweep)).splitlines()
    assert "bytes x eager" in lines[0]
    quant = next(x for x in lines if x.lstrip().startswith("quantized(scheme=int8)") and " small " in x)
    assert "     2 " in quant
    assert any(x.startswith("(bytes x eager: ") for x in lines)
    page = write_report([sweep]).read_text()
    points = page[page.index('id="points"') :]
    assert "memory-traffic bound" in points and "2.00×" in points


def test_unrepresentative_timings_are_never_best(data):
    df, _ = data
    fused = df[df.variant == "fused"]
    assert (~fused.representative).all() and (fused.speedup_tpot > 9).all()  # the fastest, yet not ranked
    best = best_per_batch(df)
    assert len(best) == 4 and set(best.variant) == {"quantized(scheme=int8)"}


def test_summary_names_what_the_best_variant_costs_in_quality(data):
    from harness.report.tables import summary_table

    df, _ = data
    html = summary_table(df)
    assert "top-1 agreement with eager" in html and "perplexity (eager)" in html
    best = best_per_batch(df).iloc[0]
    eager_ppl = df[(df.variant == "eager") & (df.model == best.model)].ppl.iloc[0]
    assert f"{best.fidelity_top1:.4g}" in html and f"{best.ppl:.4g} ({eager_ppl:.4g})" in html


def test_summary_flags_noisy_or_drifting_timings_on_either_side_of_the_speedup(data):
    """A speedup divides two timings: a noisy or drifting one on either side is said beside it."""
    from harness.report.tables import summary_table

    df, _ = data
    assert "noisy:" not in summary_table(df.assign(noisy=False, drifting=False))
    best = best_per_batch(df).iloc[0]
    same = df.model.eq(best.model) & df.batch_size.eq(best.batch_size)
    flagged = df.assign(noisy=same & df.variant.eq("eager"), drifting=same & df.variant.eq(best.variant))
    html = summary_table(flagged)
    assert html.count("noisy: eager; drifting: the variant") == 1


def test_pareto_front():
    quality = np.array([1.0, 0.97, 0.90, 0.99, 0.97])
    speed = np.array([1.0, 2.0, 1.25, 1.5, 1.9])
    assert pareto_front(quality, speed, x_higher_better=True).tolist() == [True, True, False, True, False]
    ppl = np.array([12.0, 12.5, 14.0])
    assert pareto_front(ppl, np.array([1.0, 2.0, 1.25]), x_higher_better=False).tolist() == [True, True, False]


def test_heatmap_marks_the_best_and_leaves_unranked_cells_uncoloured(data):
    df, _ = data
    fig = figures.speedup_heatmap(df)
    assert [a.text for a in fig.layout.annotations] == ["small", "tiny"]
    for trace, model in zip(fig.data, ["small", "tiny"], strict=True):
        assert list(trace.x) == ["1", "4"]
        z, text = np.asarray(trace.z, dtype=float), trace.text
        rows = {v: i for i, v in enumerate(trace.y)}
        assert np.isnan(z[rows["fused"]]).all() and all(t.endswith("†") for t in text[rows["fused"]])
        assert all(t.endswith("★") for t in text[rows["quantized(scheme=int8)"]])
        for j, batch in enumerate([1, 4]):
            assert math.isclose(
                z[rows["pruned(sparsity=0.5)"], j], _row(df, "pruned(sparsity=0.5)", model, batch).speedup_tpot
            )
            assert z[rows["eager"], j] == 1.0


def test_latency_lines_carry_the_ci_of_the_median(data):
    df, _ = data
    fig = figures.by_batch(df, "tpot_ms_p50", "TPOT", "TPOT p50 (ms)", ci=("tpot_ms_ci_low", "tpot_ms_ci_high"))
    assert len(fig.data) == 8  # 4 variants x 2 scenarios
    eager = next(t for t in fig.data if t.name == "eager" and t.xaxis == "x2")  # second facet: tiny
    rows = [_row(df, "eager", "tiny", b) for b in (1, 4)]
    assert list(eager.x) == [1, 4]
    assert np.allclose(eager.y, [r.tpot_ms_p50 for r in rows])
    assert np.allclose(eager.error_y.array, [r.tpot_ms_ci_high - r.tpot_ms_p50 for r in rows])
    assert np.allclose(eager.error_y.arrayminus, [r.tpot_ms_p50 - r.tpot_ms_ci_low for r in rows])
    fused = [t for t in fig.data if t.name.startswith("fused")]
    assert all(t.line.dash == "dot" and "timing not representative" in t.name for t in fused)
    mem = figures.by_batch(df, "peak_memory_mb", "memory", "MB", kind="bar")
    assert {t.type for t in mem.data} == {"bar"} and mem.layout.barmode == "group"


def test_quality_scatter_front_skips_unranked_points(data):
    df, _ = data
    ok = df[df.status == "ok"]
    assert quality_metric(ok)[0] == "ppl"
    fig, note = quality_scatter(df)
    assert note == ""
    fronts = {t.name: t for t in fig.data if t.name.startswith("Pareto front")}
    assert set(fronts) == {"Pareto front · small", "Pareto front · tiny"}
    for front in fronts.values():
        # eager (ppl 12.0) and int8 (12.5, 2x); pruned is dominated; fused (12.01, 10x) is not representative
        assert list(front.x) == [12.0, 12.5] and 1.9 < front.y[1] < 2.1
    unranked = [t for t in fig.data if "not representative" in t.name]
    assert [list(t.text) for t in unranked] == [["fused"], ["fused"]]
    no_ppl = ok.assign(ppl=np.nan)
    assert quality_metric(no_ppl)[0] == "fidelity_top1"
    fig, note = quality_scatter(df.assign(fidelity_top1=np.nan, fidelity_kl=np.nan, ppl=np.nan))
    assert fig is None and note.startswith("Not measured in this sweep: no record carries a quality section")


def test_timelines_are_strided_and_labelled(data):
    df, records = data
    tl, monitored = timeline_frame(df, records)
    assert monitored == 16 and tl.label.nunique() == 16
    per_line = tl.groupby(["label", "series"]).size()
    assert (per_line <= TIMELINE_MAX_SAMPLES).all() and (per_line == math.ceil(TIMELINE_LEN / 4)).all()
    fig = figures.timelines(tl)
    assert [a.text for a in fig.layout.annotations] == ["process CPU % (all cores)", "resident memory (MB)"]
    assert len(fig.data) == 32


def test_roofline_points_under_the_measured_roof(data):
    df, records = data
    fig = figures.roofline(df)
    roof = fig.data[0]
    assert roof.name.startswith("roof: Test CPU")
    x = np.asarray(roof.x)
    assert np.allclose(roof.y, np.minimum(PEAK_FLOPS / 1e9, PEAK_GBS * x))
    decode = next(t for t in fig.data if t.name == "eager · decode")
    expected = sorted(r["roofline"]["decode"]["intensity"] for r in records if r["identity"]["variant"] == "eager")
    assert sorted(decode.x) == expected


def test_op_breakdown_stacks_to_the_profiled_total(data):
    df, records = data
    fig = figures.op_breakdown(df)
    assert [t.name for t in fig.data] == ["matmul", "attention", "norm", "elementwise", "copy", "other"]
    totals = np.sum([np.asarray(t.x) for t in fig.data], axis=0)
    label = list(fig.data[0].y).index("eager · tiny · b4")
    record = next(r for r in records if r["_path"] == _row(df, "eager", "tiny", 4).record_path)
    assert math.isclose(totals[label], record["profile"]["total_ms"])


def _figure_count(text: str) -> int:
    return text.count('class="figure-data"')


def test_absent_sections_are_notes_not_empty_charts(tmp_path):
    path = write_report(synthetic_sweep(tmp_path / "plain", sections=False))
    text = path.read_text()
    assert path == tmp_path / "plain" / "report.html"
    for section in ("a quality section", "a monitor timeline", "a roofline section", "a profile section"):
        assert f"no record carries {section}" in text, section
    assert _figure_count(text) == 6  # heatmap, TTFT, TPOT, throughput, memory, weights


def test_a_sweep_where_every_point_failed_still_gets_a_report(tmp_path):
    write_record(tmp_path / "0", make_record("broken", "tiny", 1, 0, status="failed", error="RuntimeError: boom"))
    write_record(tmp_path / "1", make_record("gpu-only", "tiny", 2, 1, status="skipped", error="needs CUDA"))
    text = write_report(tmp_path).read_text()
    assert _figure_count(text) == 0 and "No point was measured successfully." in text
    assert "RuntimeError: boom" in text and "needs CUDA" in text
    one = write_report(tmp_path / "0" / RECORD_NAME, tmp_path / "one.html").read_text()  # a record file works too
    assert "RuntimeError: boom" in one and "needs CUDA" not in one


def test_report_is_self_contained_escaped_and_lists_failures(sweep):
    text = write_report(sweep).read_text()
    assert _figure_count(text) == 10
    assert text.count(get_plotlyjs()[:300]) == 1  # plotly.js inlined exactly once
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)  # nothing loaded from elsewhere
    assert EVIL not in text and text.count(ESCAPED_EVIL) >= 3  # config value, variant, error message
    assert "needs CUDA sm_80+" in text and "RuntimeError: bad kernel " + ESCAPED_EVIL in text
    # figure JSON cannot close its script element
    for block in re.findall(r'class="figure-data"[^>]*>(.*?)</script>', text, flags=re.S):
        assert "<" not in block


def test_report_replaces_the_file_atomically(sweep, tmp_path):
    out = tmp_path / "r" / "report.html"
    before = old_file(out, tmp_path / "before")
    assert write_report([sweep], out) == out
    replaced_not_rewritten(out, before)
    assert out.read_text().startswith("<!DOCTYPE html")


def test_cli_writes_the_report_and_names_bad_input(sweep, tmp_path, capsys, caplog):
    out = tmp_path / "custom" / "r.html"
    assert harness_main(["report", str(sweep), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"Report: {out}" and out.stat().st_size > 1_000_000
    assert harness_main(["report", "--help"]) == 0
    assert "-o FILE" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad" / "0" / RECORD_NAME
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema_version": 1, "status": "ok", "ident')
    cases = {
        (): "the following arguments are required: DIR",
        (str(tmp_path / "nope"),): f"{tmp_path / 'nope'}: no such file or directory",
        (str(tmp_path / "empty"),): "no record.json found",
        (str(tmp_path / "bad"),): "none of the 1 record(s) could be read",
        (str(sweep), "-o", str(tmp_path)): "is a directory",
    }
    for args, message in cases.items():
        assert harness_main(["report", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("harness report: error: ") and message in err and err.count("\n") == 1, err
    # a corrupted record beside good ones: named in a warning, listed in the report, the rest reported
    write_record(tmp_path / "bad" / "1", make_record("eager", "tiny", 1, 0))
    with caplog.at_level(logging.WARNING):
        assert harness_main(["report", str(tmp_path / "bad")]) == 0
    assert str(bad) in caplog.text
    text = (tmp_path / "bad" / "report.html").read_text()
    assert "unreadable" in text and str(bad) in text


def test_a_report_that_fails_never_fails_the_run(tmp_path, monkeypatch, capsys, caplog):
    import harness.report

    def broken(directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(harness.report, "write_report", broken)
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    with caplog.at_level(logging.WARNING):
        callbacks._print_summary(tmp_path)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"Results: {tmp_path}"
    assert "report not written: RuntimeError: disk full" in caplog.text


def test_report_of_a_real_sweep(report_sweep):
    """The sweep's own callback wrote the report; failures and the unranked engine are where they belong."""
    assert report_sweep.code == 0
    lines = report_sweep.stdout.strip().splitlines()
    report = report_sweep.dir / "report.html"
    assert lines[-2:] == [f"Results: {report_sweep.dir}", f"Report: {report}"]
    df = prepare(load(report_sweep.dir))
    assert sorted(df.status) == ["failed"] * 2 + ["ok"] * 4
    unranked = df[df.variant == "unranked-test"]
    assert (~unranked.representative).all() and np.isfinite(unranked.speedup_tpot).all()
    assert set(best_per_batch(df).variant) == {"eager"}
    text = report.read_text()
    assert EVIL not in text and ESCAPED_EVIL in text
    assert text.count("RuntimeError: injected failure &lt;in prepare&gt;") == 2
    assert "timing not representative: test engine: kernels run by an interpreter" in text


def test_terminal_summary_prints_speedups_vs_eager_and_quality(sweep):
    """The summary printed at the end of a sweep carries the same-run ratio to eager, never for an interpreted
    timing, next to the quality each variant costs."""
    from harness.summary import summary_table as terminal_summary

    df = load(sweep)
    text = terminal_summary(df)
    header = text.splitlines()[0]
    assert "TPOT x eager" in header and "top-1" in header and "ppl" in header
    data = prepare(df)
    for _, r in data[data.status.eq("ok")].iterrows():
        line = next(x for x in text.splitlines() if x.split()[0] == r.variant.split()[0]
                    and f" {r.batch_size} " in x and r.model in x and f"{r.tpot_ms_p50:.4g}" in x)  # fmt: skip
        if r.representative:
            assert f"{r.speedup_tpot:.4g}" in line
        else:
            assert "not representative" in line and f"{r.speedup_tpot:.4g}" not in line


def test_speed_verdicts():
    from harness.report.data import speed_verdict

    assert speed_verdict(1.04, 1.02, 1.06) == "no gain"  # significant, but within 5%: not worth an optimization
    assert speed_verdict(0.96) == "no gain"
    assert speed_verdict(1.3, 0.9, 1.7) == "uncertain"
    assert speed_verdict(1.3, 1.1, 1.5) == speed_verdict(1.3) == "faster"
    assert speed_verdict(0.5, 0.45, 0.55) == "slower"
    assert speed_verdict(float("nan")) is None


def test_no_gain_and_slower_are_said_in_the_report_and_the_summary(tmp_path, monkeypatch):
    """Pruned weights kept dense cost what eager costs (no gain); a sparse format slower than dense says so."""
    import report_records

    from harness.report.tables import summary_table
    from harness.summary import summary_table as terminal_summary

    monkeypatch.setitem(report_records.VARIANTS, "pruned(method=magnitude)",
                        ("pruned", {"method": "magnitude"}, 1.01, 0.98, 0.01, 12.2, None))  # fmt: skip
    monkeypatch.setitem(report_records.VARIANTS, "pruned(format=csr)",
                        ("pruned", {"format": "csr"}, 0.4, 0.98, 0.01, 12.2, None))  # fmt: skip
    for i, variant in enumerate(("eager", "quantized(scheme=int8)", "pruned(method=magnitude)", "pruned(format=csr)")):
        write_record(tmp_path / str(i), make_record(variant, "small", 1, i))
    df = prepare(load(tmp_path))
    verdicts = {v: x if isinstance(x, str) else None for v, x in zip(df.variant, df.verdict, strict=True)}
    assert verdicts == {"eager": None, "quantized(scheme=int8)": "faster", "pruned(method=magnitude)": "no gain",
                        "pruned(format=csr)": "slower"}  # fmt: skip
    csr, eager = _row(df, "pruned(format=csr)", "small", 1), _row(df, "eager", "small", 1)
    assert math.isclose(csr.speedup_tpot_ci_low, eager.tpot_ms_ci_low / csr.tpot_ms_ci_high)  # not timed in turns
    assert csr.speedup_tpot_ci_low < csr.speedup_tpot < csr.speedup_tpot_ci_high < 1
    page = write_report([tmp_path]).read_text()
    summary = page[page.index('id="summary"') : page.index('id="speedup"')]
    assert re.search(r"<b>no gain</b> \(TPOT within ±5% of eager\): pruned\(method=magnitude\) on small b1 1\.0\d×",
                     summary)  # fmt: skip
    assert re.search(r"<b>slower</b> \(TPOT ratio below 0\.95 and its 95% CI below 1\): pruned\(format=csr\) on small "
                     r"b1 0\.4\d×", summary)  # fmt: skip
    assert "2.0" in summary_table(df) and "(faster)" in summary_table(df)
    lines = terminal_summary(load(tmp_path)).splitlines()
    assert "vs eager" in lines[0]
    assert "no gain" in next(x for x in lines if x.lstrip().startswith("pruned(method=magnitude)"))
    assert "slower" in next(x for x in lines if x.lstrip().startswith("pruned(format=csr)"))
    assert any("no gain within ±5%" in x for x in lines)


def test_points_table_says_when_a_speedup_is_partly_a_lower_precision(data):
    """A weight-only CPU scheme on an fp32 model runs its linears in bf16: its row says so, the others do not."""
    from harness.report.tables import points_table

    df, _ = data
    caveat = "the quantized linears take bf16 activations (the model is fp32): part of any speedup is that"
    assert caveat not in points_table(df)
    target = df["status"].eq("ok") & df["variant"].ne("eager")
    html = points_table(df.assign(precision_caveat=df["variant"].where(~target, caveat).where(target, None)))
    assert html.count(caveat) == int(target.sum()) > 0
