"""Which eager a variant is compared with, and how labels tell scenarios apart: one workload and environment,
one model's weights, seed and shape, one sweep where several measured the same point."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from report_records import make_record

from harness.records import load, write_record
from harness.report import collect, figures, write_report
from harness.report.data import best_per_batch, prepare


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


def test_failed_points_do_not_rename_the_measured_scenarios(tmp_path):
    """`harness report s1 s3` where every point of s3 failed on another workload (prompt 32): the measured
    scenarios keep their names ("tiny", as in s1's own report), and the failed point is told apart by its own."""
    from harness.records import point_key

    ok, bad = tmp_path / "ok", tmp_path / "bad"
    write_record(ok / "0", make_record("eager", "tiny", 1, 0))
    write_record(ok / "1", make_record("quantized(scheme=int8)", "tiny", 1, 1))
    failed = make_record("eager", "tiny", 1, 2, status="failed", error="boom")
    failed["identity"]["prompt_len"] = 32
    failed["point_key"] = point_key(failed["identity"])
    write_record(bad / "0", failed)
    df = prepare(load([ok, bad]))
    assert set(df[df.status == "ok"].scenario) == {"tiny"}
    assert df[df.status == "failed"].scenario.tolist() == ["tiny · prompt 32"]
    assert set(df[df.status == "ok"].label) == {"eager · tiny · b1", "quantized(scheme=int8) · tiny · b1"}
    page = write_report([ok, bad], tmp_path / "r.html").read_text()
    summary = page[page.index('<section id="summary">') : page.index('<section id="speedup">')]
    assert "<td>tiny</td>" in summary and "prompt" not in summary
    assert "<td>tiny · prompt 32</td>" in page[page.index('<section id="failed">') :]
