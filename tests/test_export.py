"""`harness export`: pytest-benchmark JSON that `pytest-benchmark compare` and github-action-benchmark read, and
the table as json/parquet/csv that `harness compare` reads back (with raw samples, or threshold-only from CSV)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from atomic_files import old_file, replaced_not_rewritten
from pytest_benchmark.stats import Stats

from harness.export import PYTEST_METRICS, pytest_stats, read_points, table_with_samples
from harness.gate import compare
from harness.records import RECORD_NAME, write_record

PYTEST_BENCHMARK = Path(sys.executable).parent / "pytest-benchmark"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 20, 37])
def test_stats_are_computed_exactly_as_pytest_benchmark_does(n):
    rng = np.random.default_rng(n)
    data = list(np.round(rng.lognormal(-6, 0.3, n), 6))  # rounded: ties happen
    data[-1] = data[-1] * 5 if n > 3 else data[-1]  # an outlier
    ref = Stats()
    for v in data:
        ref.update(v)
    ours = pytest_stats(data)
    for field in Stats.fields:
        expected = getattr(ref, field)
        assert ours[field] == (expected if isinstance(expected, str) else pytest.approx(expected, rel=1e-12)), field
    assert ours["data"] == data and ours["iterations"] == 1


@pytest.fixture(scope="module")
def exported(report_sweep, tmp_path_factory):
    """The shared real sweep (eager, a non-representative engine and a failing one, batch 1 and 2) exported."""
    out = tmp_path_factory.mktemp("export") / "bench.json"
    from harness.cli import main

    assert main(["export", str(report_sweep.dir), "--format", "pytest-benchmark", "-o", str(out)]) == 0
    return out, json.loads(out.read_text()), table_with_samples(report_sweep.dir)


def _reference_json(tmp_path: Path) -> dict:
    """What `pytest --benchmark-json` itself writes, for the layout."""
    (tmp_path / "test_ref.py").write_text("def test_sum(benchmark):\n    benchmark(sum, range(10))\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_ref.py", "-c", "/dev/null",
           "--benchmark-json=ref.json", "--benchmark-max-time=0.001", "--benchmark-min-rounds=3"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "ref.json").read_text())


def test_pytest_benchmark_layout_matches_what_pytest_writes(exported, tmp_path):
    _, doc, df = exported
    ref = _reference_json(tmp_path)
    assert set(ref) <= set(doc)
    assert set(ref["commit_info"]) <= set(doc["commit_info"])
    assert set(ref["machine_info"]) - {"cpu"} <= set(doc["machine_info"])
    bench, ref_bench = doc["benchmarks"][0], ref["benchmarks"][0]
    assert set(ref_bench) == set(bench) and set(ref_bench["stats"]) == set(bench["stats"])
    # one benchmark per measured, representative point and timed metric; the rest counted, not exported
    ok = df[(df.status == "ok") & (df.timing_representative != False)]  # noqa: E712
    assert len(doc["benchmarks"]) == len(ok) * len(PYTEST_METRICS) == 2 * 5
    left = {"not ok": 2, "timing not representative": 2, "older record of a re-run point": 0}
    assert doc["harness"]["left_out"] == left
    assert len({b["fullname"] for b in doc["benchmarks"]}) == len(doc["benchmarks"])
    for b in doc["benchmarks"]:
        row = ok[ok.point_key == b["params"]["point_key"]].iloc[0]
        metric = b["group"]
        raw = np.asarray(row[f"samples.{'tpot_ms' if metric == 'decode_tokens_per_s' else metric}"])
        per_op = raw / 1000 / (row.batch_size if metric == "decode_tokens_per_s" else 1)
        assert np.allclose(b["stats"]["data"], per_op) and b["stats"]["rounds"] == len(raw)
        assert math.isclose(b["stats"]["ops"], 1 / np.mean(per_op), rel_tol=1e-9)
        assert b["name"].startswith(f"{metric}[eager-tiny-b{row.batch_size}-p16-g4-cpu-fp32-")


def test_github_action_benchmark_reads_ops_as_higher_is_better(exported):
    """github-action-benchmark's `pytest` parser takes name = fullname, value = stats.ops ("iter/sec", bigger is
    better), range = stddev, extra = mean and rounds. ops must therefore rise when the harness gets faster:
    repetitions per second for latencies, tokens per second for decode throughput."""
    _, doc, df = exported
    parsed = {b["fullname"]: (b["stats"]["ops"], b["stats"]["stddev"], b["stats"]["mean"]) for b in doc["benchmarks"]}
    assert len(parsed) == len(doc["benchmarks"])
    for b in doc["benchmarks"]:
        row = df[df.point_key == b["params"]["point_key"]].iloc[0]
        ops = parsed[b["fullname"]][0]
        if b["group"] == "decode_tokens_per_s":
            # tokens/s from the mean TPOT, next to the table's (from the median): same quantity and units (one
            # slow repetition on a busy machine moves the mean of a few quick samples far from the median)
            assert math.isclose(ops, row.batch_size * 1000 / np.mean(row["samples.tpot_ms"]), rel_tol=1e-9)
            assert 0.25 < ops / row.decode_tokens_per_s < 4
            assert b["extra_info"]["harness_value"] == row.decode_tokens_per_s
        else:
            assert math.isclose(ops, 1000 / np.mean(row[f"samples.{b['group']}"]), rel_tol=1e-9)


def test_pytest_benchmark_compare_prints_the_exported_table(exported, tmp_path):
    path, doc, _ = exported
    proc = subprocess.run(
        [str(PYTEST_BENCHMARK), "compare", str(path), "--csv", str(tmp_path / "table")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for metric in PYTEST_METRICS:
        assert f"benchmark '{metric}': 2 tests" in out
    for b in doc["benchmarks"]:
        assert b["name"] in out
    assert "Median" in out and "OPS" in out
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    by_name = {r["name"]: r for r in rows}  # the CSV names benchmarks by their fullname
    assert len(rows) == len(doc["benchmarks"])
    for b in doc["benchmarks"]:
        assert math.isclose(float(by_name[b["fullname"]]["median"]), b["stats"]["median"], rel_tol=1e-9)
        assert math.isclose(float(by_name[b["fullname"]]["ops"]), b["stats"]["ops"], rel_tol=1e-9)


@pytest.fixture()
def synthetic_sweep(tmp_path, synthetic_point):
    rng = np.random.default_rng(0)
    for i, b in enumerate((1, 2, 4)):
        tpot = list(2.0 * b * (1 + 0.02 * rng.uniform(-1, 1, 20)))
        synthetic_point(tmp_path / "sweep" / str(i), tpot=tpot, ttft=[10.0 * x / 2 for x in tpot], batch_size=b)
    return tmp_path / "sweep"


@pytest.mark.parametrize("fmt, ext", [("json", "json"), ("parquet", "parquet")])
def test_json_and_parquet_keep_raw_samples_for_the_gate(run_harness, synthetic_sweep, tmp_path, capsys, fmt, ext):
    out = tmp_path / f"table.{ext}"
    assert run_harness("export", str(synthetic_sweep), "--format", fmt, "-o", str(out)) == 0
    assert f"Exported 3 points to {out}" in capsys.readouterr().out
    back, direct = read_points(out), read_points(synthetic_sweep)
    assert len(back) == 3 and back.attrs["source"] == ext
    for col in ("samples.tpot_ms", "samples.itl_ms"):
        for a, b in zip(back.sort_values("batch_size")[col], direct.sort_values("batch_size")[col], strict=True):
            assert np.allclose(a, b)
    assert back.tpot_ms_p50.dtype == float and back.batch_size.dtype != object
    rows = compare(direct, back).rows
    assert set(rows["mode"]) == {"samples"} and set(rows.verdict) == {"no change"}
    assert run_harness("compare", str(synthetic_sweep), str(out)) == 0


def test_csv_is_the_flat_table_and_the_gate_degrades_to_thresholds(run_harness, synthetic_sweep, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert run_harness("export", str(synthetic_sweep), "--format", "csv", "-o", str(out)) == 0
    header = out.read_text().splitlines()[0].split(",")
    assert "tpot_ms_p50" in header and "variant" in header and not any(h.startswith("samples.") for h in header)
    capsys.readouterr()
    assert run_harness("compare", str(out), str(synthetic_sweep)) == 0
    text = capsys.readouterr().out
    assert "(no raw samples: threshold and CIs only)" in text


def test_export_to_stdout_and_default_path(run_harness, synthetic_sweep, capsys):
    assert run_harness("export", str(synthetic_sweep), "--format", "json", "-o", "-") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["format"] == "llm-inference-harness.table"
    assert "Exported 3 points to stdout" in captured.err
    assert run_harness("export", str(synthetic_sweep), "--format", "pytest-benchmark", "--metric", "tpot_ms") == 0
    doc = json.loads((synthetic_sweep / "pytest-benchmark.json").read_text())
    assert {b["group"] for b in doc["benchmarks"]} == {"tpot_ms"} and len(doc["benchmarks"]) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "--format", "csv"], "{tmp}/missing: no such file or directory"),
        (["{tmp}/empty", "--format", "csv"], "{tmp}/empty: no record.json found"),
        (["{sweep}", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["{sweep}", "--format", "pytest-benchmark", "--metric", "peak_memory_mb"], "pytest-benchmark holds times"),
        (["{sweep}", "--format", "csv", "--metric", "tpot_ms"], "--metric applies to --format pytest-benchmark"),
        (["{sweep}", "--format", "parquet", "-o", "-"], "parquet is binary"),
    ],
)
def test_export_bad_input_is_one_line_and_exit_2(run_harness, synthetic_sweep, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fill = lambda s: s.format(tmp=tmp_path, sweep=synthetic_sweep)
    assert run_harness("export", *map(fill, args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness export: error: ") and fill(message) in err and len(err.splitlines()) == 1


def test_export_names_a_corrupted_record_and_exports_the_rest(run_harness, synthetic_sweep, capsys):
    bad = synthetic_sweep / "1" / RECORD_NAME
    bad.write_text("{not json")
    assert run_harness("export", str(synthetic_sweep), "--format", "json") == 0
    captured = capsys.readouterr()
    assert f"harness export: warning: {bad}: unreadable record" in captured.err
    assert "Exported 2 points" in captured.out
    doc = json.loads((synthetic_sweep / "table.json").read_text())
    assert len(doc["rows"]) == 2 and str(bad) in doc["errors"][0]


@pytest.mark.parametrize(("fmt", "code"), [("json", 0), ("parquet", 0), ("csv", 2), ("pytest-benchmark", 2)])
def test_a_gate_on_an_export_of_an_incomplete_sweep_is_never_green(run_harness, synthetic_sweep, tmp_path, capsys,
                                                                  fmt, code):  # fmt: skip
    """json and parquet carry the unreadable record's message, so `harness compare` on them exits 2 as on the
    records; csv and pytest-benchmark have no place for it, so the export itself exits 2 (the file is written)."""
    import shutil

    clean = shutil.copytree(synthetic_sweep, tmp_path / "clean")
    (synthetic_sweep / "1" / RECORD_NAME).write_text("{not json")
    out = tmp_path / f"table.{fmt}"
    assert run_harness("export", str(synthetic_sweep), "--format", fmt, "-o", str(out)) == code
    assert out.exists()
    if code:
        assert f"{fmt} cannot carry the 1 record error(s)" in capsys.readouterr().err
    else:
        assert run_harness("compare", str(clean), str(clean)) == 0
        assert run_harness("compare", str(clean), str(out)) == 2


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json", "pytest-benchmark"])
def test_every_export_format_replaces_the_file_atomically(run_harness, synthetic_sweep, tmp_path, capsys, fmt):
    out = tmp_path / "out" / f"table.{fmt}"
    before = old_file(out, tmp_path / "before")
    assert run_harness("export", str(synthetic_sweep), "--format", fmt, "-o", str(out)) == 0
    replaced_not_rewritten(out, before)
    if fmt != "pytest-benchmark":
        assert len(read_points(out)) == 3


def test_compare_writes_markdown_and_json_atomically_and_appends_the_step_summary(
    run_harness, synthetic_sweep, tmp_path, capsys, monkeypatch
):
    summary = tmp_path / "step-summary.md"
    summary.write_text("# an earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    md, js = tmp_path / "gate" / "gate.md", tmp_path / "gate" / "gate.json"
    md_before, js_before = old_file(md, tmp_path / "md-before"), old_file(js, tmp_path / "js-before")
    args = ("compare", str(synthetic_sweep), str(synthetic_sweep), "--markdown", str(md), "--json", str(js))
    assert run_harness(*args) == 0
    assert sorted(p.name for p in md.parent.iterdir()) == [".gate.json.tmp", ".gate.md.tmp", "gate.json", "gate.md"]
    assert md_before.read_text() == js_before.read_text() == "old"
    assert json.loads(js.read_text()) and md.read_text() != "old"
    assert summary.read_text() == "# an earlier step\n" + md.read_text() + "\n"  # appended, not replaced


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    from harness import records

    out = tmp_path / "table.csv"
    out.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        records.write_bytes_atomic(out, b"new")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_json_table_keeps_an_infinite_perplexity(run_harness, tmp_path, synthetic_point, capsys):
    """Records derive ppl = inf from the NLL; the table export writes it as null plus a "nonfinite" mark that the
    reader restores, so a gate on table.json still sees the regression (and the file is strict JSON)."""
    good = {"top1_agreement": 0.99, "ppl": 10.0, "nll": math.log(10.0), "nonfinite_fraction": 0.0}
    synthetic_point(tmp_path / "base" / "0", tpot=[2.0] * 10, ttft=[5.0] * 10, quality=good)
    synthetic_point(tmp_path / "cand" / "0", tpot=[2.0] * 10, ttft=[5.0] * 10,
                    quality={**good, "ppl": None, "nll": 800.0})  # fmt: skip
    out = tmp_path / "cand.json"
    assert run_harness("export", str(tmp_path / "cand"), "--format", "json", "-o", str(out)) == 0
    doc = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the export"))
    assert doc["rows"][0]["ppl"] is None and doc["nonfinite"] == [[0, "ppl", "inf"]]
    assert read_points(out)["ppl"].tolist() == [math.inf]
    capsys.readouterr()
    assert run_harness("compare", str(tmp_path / "base"), str(out), "--metric", "ppl") == 1
    assert "regression" in capsys.readouterr().out


def test_csv_keeps_identifiers_as_text(run_harness, tmp_path, synthetic_point, capsys):
    """Fingerprint 123e45678901 reads as a float and a key of digits loses its leading zeros, unless kept as text."""
    for side in ("base", "cand"):
        rec = synthetic_point(tmp_path / side / "0", tpot=[2.0] * 10, ttft=[5.0] * 10, env_id="123e45678901")
    path = tmp_path / "cand" / "0" / RECORD_NAME
    path.write_text(path.read_text().replace(rec["point_key"], "0012345678901234"))
    path = tmp_path / "base" / "0" / RECORD_NAME
    path.write_text(path.read_text().replace(rec["point_key"], "0012345678901234"))
    out = tmp_path / "cand.csv"
    assert run_harness("export", str(tmp_path / "cand"), "--format", "csv", "-o", str(out)) == 0
    back = read_points(out)
    assert back["fingerprint"].tolist() == ["123e45678901"] and back["point_key"].tolist() == ["0012345678901234"]
    capsys.readouterr()
    assert run_harness("compare", str(tmp_path / "base"), str(out)) == 0
    text = capsys.readouterr().out
    assert "environments differ" not in text and "2 no change" not in text and "1 no change" in text


def test_pytest_benchmark_keeps_the_latest_record_of_a_re_run_point(run_harness, tmp_path, synthetic_point, capsys):
    """A point re-run into its sweep has two records: one benchmark per name (the latest), the other listed."""
    old = synthetic_point(tmp_path / "sweep" / "0", tpot=[3.0] * 10, ttft=[5.0] * 10)
    new = synthetic_point(tmp_path / "sweep" / "0-rerun", tpot=[2.0] * 10, ttft=[5.0] * 10)
    for d, rec, when in (("0", old, "2026-11-23T12:00:00+00:00"), ("0-rerun", new, "2026-11-23T13:00:00+00:00")):
        write_record(tmp_path / "sweep" / d, {**rec, "started_at": when})
    out = tmp_path / "bench.json"
    assert run_harness("export", str(tmp_path / "sweep"), "--format", "pytest-benchmark", "-o", str(out)) == 0
    assert "(left out: 1 older record of a re-run point)" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    names = [b["fullname"] for b in doc["benchmarks"]]
    assert len(names) == len(set(names)) == len(PYTEST_METRICS)
    tpot = next(b for b in doc["benchmarks"] if b["group"] == "tpot_ms")
    assert tpot["stats"]["median"] == pytest.approx(0.002)  # the re-run's 2 ms, not the first 3 ms
    assert doc["harness"]["superseded"] == [{"point_key": old["point_key"], "started_at": "2026-11-23T12:00:00+00:00",
                                             "record_path": str(tmp_path / "sweep" / "0" / RECORD_NAME)}]  # fmt: skip
