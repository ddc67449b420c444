"""What the report's sections say when a sweep is not the usual one: quality measured without an eager to place
it against, scenarios whose quality is measured differently, memory (what was measured, in which unit), config
keys only some points have, and unreadable or missing records in the header and the failed table."""

from __future__ import annotations

import json
import re

from report_records import make_record, synthetic_sweep
from test_dashboard import FIGURE

from harness.progress import write_sweep_meta
from harness.records import RECORD_NAME, load, write_record
from harness.report import collect, write_report
from harness.report.data import prepare, with_sections
from harness.report.quality import quality_scatter

QUANT = "quantized(scheme=int8)"


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


def _figure(page: str, sid: str) -> dict:
    plot = re.search(r'<div class="plot" id="(plot-\d+)"', _section(page, sid)).group(1)
    return next(json.loads(body) for target, body in FIGURE.findall(page) if target == plot)


def test_quality_without_an_eager_to_compare_says_so(tmp_path):
    """Only quantized points (eager failed, say): their quality is measured, but there is no speedup to place it
    against. The section says that, not that no record carries quality."""
    for job, batch in enumerate((1, 4)):
        write_record(tmp_path / str(job), make_record(QUANT, "tiny", batch, job))
    quality = _section(write_report(tmp_path).read_text(), "quality")
    assert "no record carries a quality section" not in quality
    assert "No speedup to place quality against: no ok, representative eager point" in quality
    assert "points table" in quality  # where the measured quality is


def _weights(record: dict, weights: str, ppl: bool = True) -> dict:
    from harness.records import point_key

    record["identity"]["weights"] = weights
    record["point_key"] = point_key(record["identity"])
    if not ppl:  # random weights: no held-out perplexity, only fidelity against eager
        record["quality"]["ppl"] = None
    return record


def test_speed_vs_quality_keeps_scenarios_without_perplexity(tmp_path):
    """Trained tiny (perplexity) beside random-weight tiny (top-1 agreement only): both are drawn, each against
    the metric it has, on its own axis named by that metric."""
    for job, (weights, variant) in enumerate((w, v) for w in ("trained", "random") for v in ("eager", QUANT)):
        write_record(tmp_path / str(job), _weights(make_record(variant, "tiny", 1, job), weights, weights == "trained"))
    df, records, _ = collect([tmp_path])
    fig, note = quality_scatter(with_sections(prepare(df), records))
    fronts = sorted(t.name for t in fig.data if t.name.startswith("Pareto front"))
    assert fronts == ["Pareto front · tiny · random weights", "Pareto front · tiny · trained weights"]
    titles = {a.text for a in fig.layout.annotations}
    assert titles == {"tiny · random weights", "tiny · trained weights"}
    layout = fig.to_dict()["layout"]
    axes = {layout[k]["title"]["text"] for k in layout if k.startswith("xaxis")}
    assert any(t.startswith("perplexity") for t in axes) and any(t.startswith("top-1 agreement") for t in axes)
    random_points = next(t for t in fig.data if t.name == "tiny · random weights")
    assert sorted(random_points.x) == [0.97, 1.0]  # top-1 agreement of int8 and eager
    assert "top-1 agreement %{x" in random_points.hovertemplate  # the hover names the metric
    assert random_points.cliponaxis is False  # labels at the plot's edge are not cut
    assert note == ""


def test_scenarios_left_out_of_speed_vs_quality_are_named(tmp_path):
    """A scenario with speedups but no quality measure at all is named under the chart, with why."""
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    write_record(tmp_path / "2", make_record("eager", "small", 1, 2, sections=False))
    write_record(tmp_path / "3", make_record(QUANT, "small", 1, 3, sections=False))
    quality = _section(write_report(tmp_path).read_text(), "quality")
    assert "Not drawn: small (no quality measure: no top-1 agreement, KL or perplexity)." in quality


def test_memory_is_in_mib_with_its_method_and_the_weights_beside_it(tmp_path):
    record = make_record("eager", "tiny", 1, 0)
    record["metrics"]["peak_memory_method"] = "VmHWM (peak RSS, reset at window start)"
    write_record(tmp_path / "0", record)
    write_record(tmp_path / "1", make_record(QUANT, "tiny", 1, 1))
    page = write_report(tmp_path).read_text()
    memory = _section(page, "memory")
    fig = _figure(page, "memory")
    assert fig["layout"]["yaxis"]["title"]["text"] == "peak memory (MiB)"
    assert "MB)" not in memory and "cpu: VmHWM (peak RSS, reset at window start)" in memory
    assert "the whole process" in memory
    weights = _figure(page, "weights")
    bars = {t["name"]: t["y"][0] for t in weights["data"]}
    assert bars["eager"] == 3_016_960 * 4 / 2**20 and bars[QUANT] == bars["eager"] / 2
    assert "peak memory MiB" in _section(page, "points")


def test_config_keys_only_some_points_have_are_not_the_same_for_all(tmp_path):
    write_record(tmp_path / "0", make_record("eager", "tiny", 1, 0))
    write_record(tmp_path / "1", make_record("eager", "tiny", 4, 1))
    write_record(tmp_path / "2", make_record(QUANT, "tiny", 1, 2))
    header = write_report(tmp_path).read_text().split("<nav>")[0]
    rows = {re.sub("<[^>]+>", "|", r).strip("|"): r for r in header.split("<tr>")[1:]}
    scheme = next(k for k in rows if k.startswith("engine.scheme"))
    assert scheme == "engine.scheme||int8||in 1 of 3 points"
    name = next(k for k in rows if k.startswith("engine.name"))
    assert name == "engine.name||eager, quantized||varies"
    note = next(k for k in rows if k.startswith("note|"))
    assert note.endswith("same for all points")


def test_unreadable_records_are_not_also_missing_and_the_header_counts_both(tmp_path):
    """A sweep that planned 4 points: 2 records fine, one truncated, one never written."""
    records = [make_record(v, "tiny", 1, i) for i, v in enumerate(("eager", QUANT, "pruned(sparsity=0.5)", "fused"))]
    for job, record in enumerate(records[:3]):
        write_record(tmp_path / str(job), record)
    (tmp_path / "2" / RECORD_NAME).write_text('{"schema_version": 1, "status": "ok", "ident')
    write_sweep_meta(tmp_path, {"command": ["harness", "run", "-m"], "total": 4,
                                "points": [[f"job={i}"] for i in range(4)],
                                "point_keys": [r["point_key"] for r in records]})  # fmt: skip
    assert len(load(tmp_path)) == 2
    page = write_report(tmp_path).read_text()
    failed = _section(page, "failed")
    assert failed.count("<td>unreadable</td>") == 1 and failed.count("<td>missing</td>") == 1
    assert "job=3" in failed and "job=2" not in failed
    assert "<dt>points</dt><dd>4 planned: 2 ok, 1 unreadable, 1 missing</dd>" in page


def test_the_header_counts_every_status_and_unreadable_records_without_a_sweep_file(tmp_path):
    synthetic_sweep(tmp_path)
    (tmp_path / "sweep.json").unlink()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD_NAME).write_text("{")
    page = write_report(tmp_path).read_text()
    assert "<dt>points</dt><dd>19 (16 ok, 1 failed, 1 skipped, 1 unreadable)</dd>" in page


def test_a_parallel_launchers_warning_is_in_the_header(tmp_path):
    """Points a launcher ran at the same time interfere: the report says so where its numbers are read."""
    record = make_record("eager", "tiny", 1, 0)
    write_record(tmp_path / "0", record)
    warning = "the joblib launcher runs up to 2 points at once on this machine: their timings interfere"
    write_sweep_meta(tmp_path, {"command": ["harness", "run", "-m"], "total": 1, "points": [["job=0"]],
                                "point_keys": [record["point_key"]], "parallel_warning": warning})  # fmt: skip
    assert f"<dt>warning</dt><dd>{warning}</dd>" in write_report(tmp_path).read_text()
    write_sweep_meta(tmp_path, {"command": ["harness", "run", "-m"], "total": 1, "points": [["job=0"]],
                                "point_keys": [record["point_key"]], "parallel_warning": None})  # fmt: skip
    assert "<dt>warning</dt>" not in write_report(tmp_path).read_text()
