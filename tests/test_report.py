"""The HTML report: speedups, ranking rules, every figure on synthetic records that carry all record sections,
notes instead of empty charts, escaping, the `harness report` command, and the report of a real sweep."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pandas as pd
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


def test_speedup_needs_eager_on_the_same_workload(tmp_path):
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    other = make_record("quantized(scheme=int8)", "tiny", 1, 1)
    other["identity"]["prompt_len"] = 32  # another workload: no baseline
    write_record(tmp_path / "1", other)
    df = prepare(load(tmp_path))
    assert df.loc[df.variant == "eager", "speedup_tpot"].item() == 1.0
    assert math.isnan(df.loc[df.variant != "eager", "speedup_tpot"].item())
    assert set(df.scenario) == {"tiny · prompt 16", "tiny · prompt 32"}  # labels name only what varies


def _on_machine(record, fingerprint, slower=1.0, threads=None):
    """``record`` as measured in environment ``fingerprint``, ``slower`` times slower."""
    from harness.stats import summarize

    record["env"]["id"] = fingerprint
    if threads is not None:
        record["env"]["torch_threads"] = threads
    record["samples"] = {k: [x * slower for x in v] for k, v in record["samples"].items()}
    record["summary"] = {k: summarize(v) for k, v in record["samples"].items()}
    return record


def test_speedups_never_pool_eager_across_environments(tmp_path):
    """Two machines in one report: each variant is compared with eager of its own environment fingerprint."""
    write_record(tmp_path / "a" / "0", _on_machine(make_record("eager", "tiny", 1, 0), "aaaaaaaa1111"))
    write_record(tmp_path / "b" / "0", _on_machine(make_record("eager", "tiny", 1, 0), "bbbbbbbb2222", slower=3))
    quant = make_record("quantized(scheme=int8)", "tiny", 1, 0)
    write_record(tmp_path / "b" / "1", _on_machine(quant, "bbbbbbbb2222", slower=3))
    df = prepare(load([tmp_path / "a", tmp_path / "b"]), env_labels=True)  # as the report prepares its table
    eager = df[df.variant == "eager"].set_index("fingerprint")
    assert 1.9 < eager.tpot_ms_p50["aaaaaaaa1111"] < 2.1 and 5.8 < eager.tpot_ms_p50["bbbbbbbb2222"] < 6.2
    assert (eager.speedup_tpot == 1.0).all()
    q = df[df.variant == "quantized(scheme=int8)"].iloc[0]
    assert math.isclose(q.speedup_tpot, eager.tpot_ms_p50["bbbbbbbb2222"] / q.tpot_ms_p50)  # 2.0, not 4/3
    assert math.isclose(q.speedup_tpot, 2.0, rel_tol=1e-9)
    # the environments are told apart in scenarios, labels and the heatmap's panels
    assert set(df.scenario) == {"tiny · env aaaaaaaa", "tiny · env bbbbbbbb"}
    assert df.label.nunique() == 3 and q.label == "quantized(scheme=int8) · tiny · env bbbbbbbb · b1"
    fig = figures.speedup_heatmap(df)
    assert [a.text for a in fig.layout.annotations] == ["tiny · env aaaaaaaa", "tiny · env bbbbbbbb"]
    assert [list(t.y) for t in fig.data] == [["eager"], ["eager", "quantized(scheme=int8)"]]
    assert len(best_per_batch(df)) == 2  # one best per environment
    plain = prepare(load([tmp_path / "a", tmp_path / "b"]))  # the dashboard's: its series labels name the env
    assert set(plain.scenario) == {"tiny"} and plain.speedup_tpot.tolist() == df.speedup_tpot.tolist()
    page = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r.html").read_text()
    assert "tiny · env bbbbbbbb" in page and "2.00×" in page


def test_a_fingerprint_that_follows_the_thread_count_adds_no_env_tag(tmp_path):
    for job, threads in enumerate((1, 2)):
        for variant in ("eager", "quantized(scheme=int8)"):
            record = _on_machine(make_record(variant, "tiny", 1, 0), f"fp-threads-{threads}", threads=threads)
            write_record(tmp_path / f"{job}-{variant[:5]}", record)
    df = prepare(load(tmp_path), env_labels=True)
    assert set(df.scenario) == {"tiny · 1 thread", "tiny · 2 threads"}
    assert np.allclose(df[df.variant != "eager"].speedup_tpot, 2.0)


def _as(record, slower=1.0, **identity):
    """``record`` with other identity fields (weights, seed, shape), ``slower`` times slower."""
    from harness.records import point_key

    record["identity"].update(identity)
    record["point_key"] = point_key(record["identity"])
    return _on_machine(record, record["env"]["id"], slower=slower)


@pytest.mark.parametrize(
    ("field", "values", "tags"),
    [
        ("weights", ("random", "trained"), ("random weights", "trained weights")),
        ("seed", (0, 1), ("seed 0", "seed 1")),
        ("n_params", (3_016_960, 12_000_000), ("3.02M params", "12M params")),
        # two shapes with one parameter count: the fields that differ name them
        ("model_args", ({"dim": 64, "n_heads": 4}, {"dim": 64, "n_heads": 8}), ("n_heads 4", "n_heads 8")),
    ],
)
def test_speedups_and_labels_tell_weights_seeds_and_shapes_of_one_model_apart(tmp_path, field, values, tags):
    """`model=tiny model.weights=random,trained` (or two seeds, two shapes of tiny): each variant is compared with
    the eager of its own weights, not with a median of both eagers, and the labels say which is which."""
    from harness.summary import summary_table as terminal_summary

    for job, (value, slower) in enumerate(zip(values, (1.0, 3.0), strict=True)):
        for variant in ("eager", "quantized(scheme=int8)"):
            record = _as(make_record(variant, "tiny", 1, job), slower, **{field: value})
            write_record(tmp_path / f"{job}-{variant[:5]}", record)
    df = prepare(load(tmp_path))
    assert set(df.scenario) == {f"tiny · {tag}" for tag in tags} and df.label.nunique() == 4
    eager = df[df.variant == "eager"]
    assert (eager.speedup_tpot == 1.0).all() and eager.tpot_ms_p50.max() > 2.5 * eager.tpot_ms_p50.min()
    assert np.allclose(df[df.variant != "eager"].speedup_tpot, 2.0)  # 2x its own eager (pooled: ~1 and ~4)
    lines = terminal_summary(load(tmp_path)).splitlines()
    assert lines[0].split()[:3] == ["variant", "scenario", "batch"]
    for tag in tags:  # after the scenario: batch, TTFT, TPOT, tok/s, then TPOT x eager and TTFT x eager
        eager = next(x for x in lines if x.split()[0] == "eager" and f" {tag} " in x).split(tag)[1].split()
        quant = next(x for x in lines if x.split()[0] == "quantized(scheme=int8)" and f" {tag} " in x)
        assert eager[4:6] == ["1", "1"] and quant.split(tag)[1].split()[4:6] == ["2", "2"]


def test_a_copied_sweep_reports_its_own_sweep_json_not_what_lies_at_its_old_path(tmp_path):
    """Records name the folder they were measured in (``sweep.dir``); once the sweep is archived elsewhere and
    another run uses the old folder, the report of the copy must not take that run's command or missing points."""
    import shutil

    from harness.progress import write_sweep_meta

    original = tmp_path / "s1"
    for job, variant in enumerate(("eager", "quantized(scheme=int8)")):
        record = make_record(variant, "tiny", 1, job)
        record["sweep"] = {"dir": str(original.resolve()), "job": job}
        write_record(original / str(job), record)
    write_sweep_meta(original, {"command": ["harness", "run", "THE-SWEEP"], "total": 2, "points": [[], []]})
    archive = shutil.copytree(original, tmp_path / "archive")
    shutil.rmtree(original)
    write_sweep_meta(original, {"command": ["harness", "run", "ANOTHER-RUN"], "total": 3, "points": [[], [], []]})
    _, _, metas = collect([archive])
    assert [m["command"][-1] for m in metas] == ["THE-SWEEP"] and metas[0]["missing"] == []
    _, _, metas = collect([archive / "1"])  # one job's folder: its sweep is the folder above
    assert [m["command"][-1] for m in metas] == ["THE-SWEEP"]


def _one_sweep(root, quant_slower=1.0, variants=("eager", "quantized(scheme=int8)")):
    from harness.progress import write_sweep_meta

    for job, variant in enumerate(variants):
        slower = quant_slower if variant != "eager" else 1.0
        write_record(root / str(job), _on_machine(make_record(variant, "tiny", 1, job), "env-a", slower=slower))
    write_sweep_meta(root, {"command": ["harness", "run"], "total": len(variants), "points": [[]] * len(variants)})
    return root


def test_a_report_over_two_sweeps_of_the_same_points_keeps_each_sweep_apart(tmp_path):
    """`harness report A B`, the same points measured twice on one machine (quantized 2x in A, 0.5x in B): each
    sweep's variant is compared with its own eager, and no cell, line or label merges the two."""
    a = _one_sweep(tmp_path / "a")
    b = _one_sweep(tmp_path / "b", quant_slower=4.0)
    df, records, _ = collect([a, b])
    data = prepare(df, env_labels=True, sweep_labels=True)
    assert set(data.scenario) == {"tiny · sweep a", "tiny · sweep b"} and data.label.nunique() == 4
    quant = data[data.variant != "eager"].set_index("scenario").speedup_tpot
    assert quant["tiny · sweep a"] == pytest.approx(2.0, rel=0.05)
    assert quant["tiny · sweep b"] == pytest.approx(0.5, rel=0.05)
    cells = [t.text for t in figures.speedup_heatmap(data).data]
    assert len(cells) == 2  # one heatmap per sweep
    # eager in one sweep, the variant in another (different points): read as one, the variant finds its eager
    only_eager = _one_sweep(tmp_path / "e", variants=("eager",))
    only_quant = _one_sweep(tmp_path / "q", variants=("quantized(scheme=int8)",))
    df, _, _ = collect([only_eager, only_quant])
    data = prepare(df, env_labels=True, sweep_labels=True)
    assert set(data.scenario) == {"tiny"}
    assert data[data.variant != "eager"].speedup_tpot.tolist() == [pytest.approx(2.0, rel=0.05)]


def test_the_best_variants_perplexity_sits_beside_its_own_eagers(tmp_path):
    """Two seeds of tiny (eager ppl 12 and 30): each best variant's cost is read against the eager of its seed."""
    from harness.report.tables import summary_table

    for job, (seed, ppl) in enumerate(((0, 12.0), (0, 12.5), (1, 30.0), (1, 30.5))):
        variant = "eager" if job % 2 == 0 else "quantized(scheme=int8)"
        record = _as(make_record(variant, "tiny", 1, job), 1.0, seed=seed)
        record["quality"]["ppl"] = ppl
        write_record(tmp_path / str(job), record)
    html_rows = summary_table(prepare(load(tmp_path), env_labels=True)).split("<tr")
    for tag, cost in (("seed 0", "12.5 (12)"), ("seed 1", "30.5 (30)")):
        row = next(r for r in html_rows if f"tiny · {tag}" in r)
        assert f"<td>{cost}</td>" in row, row


def test_weights_trained_differently_are_told_apart(tmp_path):
    """`model.weights=trained train.steps=100,2000`: one shape, two checkpoints. Each variant is compared with the
    eager of its own checkpoint, and the labels tag the weights by their id."""
    from harness.records import model_id

    tags = []
    for job, (steps, slower) in enumerate(((100, 1.0), (2000, 3.0))):
        training = {"train": {"steps": steps}, "checkpoint_key": f"key{steps}"}
        for variant in ("eager", "quantized(scheme=int8)"):
            record = _as(make_record(variant, "tiny", 1, job), slower, weights="trained", training=training)
            write_record(tmp_path / f"{job}-{variant[:5]}", record)
        tags.append(f"tiny · weights {model_id(record['identity'])[:8]}")
    df = prepare(load(tmp_path))
    assert set(df.scenario) == set(tags) and len(set(tags)) == 2
    assert np.allclose(df[df.variant != "eager"].speedup_tpot, 2.0)


def test_rows_without_a_model_id_read_as_before(tmp_path):
    """Rows an older version stored in the history database have no model_id (nor model.* columns): they pair
    with their eager as before, and beside new rows of the same model they add no tag."""
    for job, variant in enumerate(("eager", "quantized(scheme=int8)")):
        write_record(tmp_path / str(job), make_record(variant, "tiny", 1, job))
    new = load(tmp_path)
    old = new.drop(columns=[c for c in new if c.startswith("model.")]).assign(model_id=None)
    df = prepare(old)
    assert set(df.scenario) == {"tiny"}
    assert df[df.variant != "eager"].speedup_tpot.tolist() == [pytest.approx(2.0, rel=0.05)]
    both = prepare(pd.concat([old.assign(job=old.job.astype(str) + "-old"), new], ignore_index=True))
    assert set(both.scenario) == {"tiny"}


def test_models_with_their_own_weights_and_shapes_add_no_tags(tmp_path):
    """The demo's trained tiny beside a random larger shape: the model names them, labels stay as they were."""
    from harness.summary import summary_table as terminal_summary

    write_record(tmp_path / "0", _as(make_record("eager", "tiny", 1, 0), weights="trained", seed=0))
    write_record(tmp_path / "1", _as(make_record("eager", "small", 1, 1), weights="random", seed=0))
    write_record(tmp_path / "2", _as(make_record("quantized(scheme=int8)", "small", 1, 2), weights="random", seed=0))
    df = prepare(load(tmp_path))
    assert set(df.scenario) == {"tiny", "small"} and (df[df.variant == "eager"].speedup_tpot == 1.0).all()
    assert terminal_summary(load(tmp_path)).splitlines()[0].split()[:3] == ["variant", "model", "batch"]


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
    assert figures.quality_metric(df)[0] == "ppl"
    fig = figures.quality_scatter(df)
    fronts = {t.name: t for t in fig.data if t.name.startswith("Pareto front")}
    assert set(fronts) == {"Pareto front · small", "Pareto front · tiny"}
    for front in fronts.values():
        # eager (ppl 12.0) and int8 (12.5, 2x); pruned is dominated; fused (12.01, 10x) is not representative
        assert list(front.x) == [12.0, 12.5] and 1.9 < front.y[1] < 2.1
    unranked = [t for t in fig.data if "not representative" in t.name]
    assert [list(t.text) for t in unranked] == [["fused"], ["fused"]]
    no_ppl = df.assign(ppl=np.nan)
    assert figures.quality_metric(no_ppl)[0] == "fidelity_top1"
    assert figures.quality_scatter(no_ppl.assign(fidelity_top1=np.nan, fidelity_kl=np.nan)) is None


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
    assert _figure_count(text) == 5  # heatmap, TTFT, TPOT, throughput, memory


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
    assert _figure_count(text) == 9
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
    assert re.search(r"<b>slower</b> \(TPOT ratio below 1\): pruned\(format=csr\) on small b1 0\.4\d×", summary)
    assert "2.0" in summary_table(df) and "(faster)" in summary_table(df)
    lines = terminal_summary(load(tmp_path)).splitlines()
    assert "vs eager" in lines[0]
    assert "no gain" in next(x for x in lines if x.lstrip().startswith("pruned(method=magnitude)"))
    assert "slower" in next(x for x in lines if x.lstrip().startswith("pruned(format=csr)"))
    assert any("no gain within ±5%" in x for x in lines)


def test_records_without_a_fingerprint_and_early_failures_keep_one_scenario(tmp_path):
    """Hand-made or foreign records without env.id still get speedups (no merge on mismatched key types), and a
    point that failed before its environment was read does not tag every label with an environment."""
    no_id = tmp_path / "no_id"
    for i, variant in enumerate(("eager", "quantized(scheme=int8)")):
        rec = make_record(variant, "tiny", 1, i)
        rec["env"].pop("id")
        write_record(no_id / str(i), rec)
    out = prepare(load(no_id), env_labels=True)
    assert out.speedup_tpot.notna().all() and set(out.scenario) == {"tiny"}

    early = tmp_path / "early"
    write_record(early / "0", make_record("eager", "tiny", 1, 0))
    write_record(early / "1", make_record("quantized(scheme=int8)", "tiny", 1, 1))
    failed = make_record("quantized(scheme=int8)", "tiny", 2, 2, status="failed", error="boom")
    failed["env"] = {}
    write_record(early / "2", failed)
    out = prepare(load(early), env_labels=True)
    assert set(out.scenario) == {"tiny"} and not out.label.str.contains("env").any()
    assert (out[out.variant.ne("eager") & out.status.eq("ok")].speedup_tpot > 1).all()
