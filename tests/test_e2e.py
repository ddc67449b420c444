"""End to end: real Hydra multiruns with the quick policy, on the trained `tiny` (the session's briefly trained
checkpoint) where the weights matter, on the random-weight `tiny` where only the harness' handling does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import FAST_POINT

from harness.progress import SWEEP_META
from harness.records import RECORD_NAME, load

QUICK = FAST_POINT  # the trained tiny's runs add `*tiny` after it (model.weights=trained, its cache)


@pytest.fixture()
def tiny(trained_tiny) -> list[str]:
    """Overrides that select the trained tiny from the session's checkpoint cache (no training in the test)."""
    return trained_tiny["overrides"]


def test_console_script_sweep_writes_one_record_per_point(tmp_path, subprocess_env, tiny):
    """The foundation issue's acceptance command, through the installed console script."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        "-m",
        "engine=eager",
        "model=tiny",
        "workload.batch_size=1,4",
        *QUICK,
        *tiny,
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.parent.name for p in sweep.rglob(RECORD_NAME)) == ["0", "1"]
    df = load(sweep)
    assert len(df) == 2 and (df.status == "ok").all()
    assert sorted(df.batch_size) == [1, 4]
    assert np.isfinite(df.ttft_ms_p50).all() and np.isfinite(df.tpot_ms_p50).all()
    assert (df.decode_tokens_per_s > 0).all() and (df.peak_memory_mb > 0).all()
    assert df.point_key.nunique() == 2 and (df.variant == "eager").all()
    # the summary table, the results directory, then the report last
    out = proc.stdout.strip().splitlines()
    assert out[-2] == f"Results: {sweep}"
    assert out[-1] == f"Report: {sweep / 'report.html'}" and (sweep / "report.html").stat().st_size > 0
    assert any("TPOT p50 ms" in line for line in out)
    assert "[1/2]" in proc.stdout and "[2/2]" in proc.stdout and "ETA" in proc.stdout  # progress lines
    meta = json.loads((sweep / SWEEP_META).read_text())
    assert meta["total"] == 2 and meta["command"][:3] == ["harness", "run", "-m"]


def test_record_contents(run_harness, tmp_path, tiny):
    args = ("run", *QUICK, *tiny, "quality.enabled=true", "workload.batch_size=2", f"hydra.run.dir={tmp_path}")
    assert run_harness(*args) == 0
    rec = json.loads((tmp_path / RECORD_NAME).read_text())
    assert rec["schema_version"] == 1 and rec["status"] == "ok" and rec["error"] is None
    assert rec["config"]["workload"]["batch_size"] == 2 and "hydra" not in rec["config"]
    ident = rec["identity"]
    assert ident["n_params"] == 3_016_960 and ident["device"] == "cpu" and ident["dtype"] == "fp32"
    env = rec["env"]
    for key in ("device_name", "cpu_model", "torch_threads", "hostname", "versions", "git", "id"):
        assert key in env, key
    assert env["versions"]["torch"].startswith("2.13.0")
    timing = rec["timing"]
    assert timing["clock"] == "perf_counter_ns" and timing["overhead_ns"] > 0
    assert timing["reps"] == len(rec["samples"]["ttft_ms"]) == len(rec["samples"]["tpot_ms"])
    assert len(rec["samples"]["itl_ms"]) == timing["reps"] * (4 - 1)  # every inter-token gap is kept
    # TPOT of a repetition is the mean of its inter-token gaps; E2E is TTFT plus all of them
    itl = np.array(rec["samples"]["itl_ms"]).reshape(timing["reps"], 3)
    assert np.allclose(itl.mean(1), rec["samples"]["tpot_ms"])
    assert np.allclose(np.array(rec["samples"]["ttft_ms"]) + itl.sum(1), rec["samples"]["e2e_ms"])
    s = rec["summary"]["tpot_ms"]
    assert s["ci_low"] <= s["p50"] <= s["ci_high"] and s["n"] == timing["reps"]
    m = rec["metrics"]
    assert math.isclose(m["decode_tokens_per_s"], 2 * 1000 / s["p50"])
    assert math.isclose(m["prefill_tokens_per_s"], 2 * 16 * 1000 / rec["summary"]["ttft_ms"]["p50"])
    assert m["weight_bytes"] == ident["n_params"] * 4
    # trained weights: quality against the eager reference (itself here) with perplexity on held-out text
    assert rec["reference"]["weights"] == "trained" and rec["reference"]["training"]["steps"] == 40
    q = rec["quality"]
    assert q["top1_agreement"] == 1.0 and q["kl"] == 0.0 and q["trained"] is True
    assert q["inputs"] == "corpus held-out text" and q["corpus"]["name"] == "python-docs"
    assert 1.0 < q["bits_per_byte"] < 8.0 and math.isclose(q["ppl"], 2 ** q["bits_per_byte"], rel_tol=1e-6)
    row = load(tmp_path).iloc[0]
    assert row.fidelity_top1 == 1.0 and row.fidelity_kl == 0.0 and math.isclose(row.ppl, q["ppl"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
def test_threads_sweep_measures_each_count(run_harness, tmp_path):
    """`-m threads=1,2` (in turns with eager, as the presets run): each point runs with its own count, records
    it, has its own key, and the report's speedups compare like with like. The thread count is what is tested:
    a cheap second engine (the test wrapper around eager) on random weights, no compile, no quality pass."""
    from harness.report.data import prepare

    sweep = tmp_path / "sweep"
    args = ("-m", "threads=1,2", "engine.name=eager,slowed-test", "hydra/launcher=interleaved", *QUICK)
    assert run_harness("run", *args, f"hydra.sweep.dir={sweep}") == 0
    df = load(sweep)
    assert len(df) == 4 and df["status"].eq("ok").all()
    assert sorted(df["threads"]) == [1, 1, 2, 2] and df["point_key"].nunique() == 4
    for rec in (json.loads(p.read_text()) for p in sweep.rglob(RECORD_NAME)):
        assert rec["env"]["torch_threads"] == rec["identity"]["threads"] == rec["config"]["threads"]
        # timed in turns only with the point of the same thread count
        assert rec["timing"]["interleaved"]["points"] == 2
    report = prepare(df)
    assert set(report["scenario"].str.extract(r"· (\d+ threads?)")[0]) == {"1 thread", "2 threads"}
    assert report.loc[report["engine"].eq("eager"), "speedup_tpot"].tolist() == [1.0, 1.0]


def test_failing_points_are_recorded_and_the_sweep_goes_on(run_harness, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = run_harness(
        "run", "-m", "engine.name=eager,failing-test", "+engine.phase=prepare", *QUICK, f"hydra.sweep.dir={sweep}"
    )
    assert code == 2  # +engine.phase is not a parameter of eager: refused before any work
    assert not sweep.exists()
    capsys.readouterr()

    # failing-test fails in prepare by default (no +engine.phase); its points run first, eager's after them
    code = run_harness(
        "run",
        "-m",
        "engine.name=failing-test,eager",
        "model=tiny",
        "workload.decoding=greedy,beam",
        "workload.num_beams=1",
        *QUICK,
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0  # some points failed, not all
    df = load(sweep).sort_values("job")
    assert len(df) == 4 and sorted(p.parent.name for p in sweep.rglob(RECORD_NAME)) == ["0", "1", "2", "3"]
    failed, ok = df[df.engine == "failing-test"], df[df.engine == "eager"]
    assert (failed.status == "failed").all() and set(failed.decoding) == {"greedy", "beam"}
    assert failed.error.eq("RuntimeError: injected failure <in prepare>").all()
    assert failed.tpot_ms_p50.isna().all()  # nothing timed for a failed point
    assert (ok.status == "ok").all() and set(ok.decoding) == {"greedy", "beam"}
    assert ok.job.min() > failed.job.max()  # measured after the failures: the sweep went on
    assert np.isfinite(ok.tpot_ms_p50).all() and (ok.tpot_ms_p50 > 0).all() and ok.error.isna().all()


def test_failure_injection_in_process(run_harness, tmp_path):
    """A failing engine's point is recorded with its error; the healthy points still run."""
    base = tmp_path / "sweep"
    for phase in ("prepare", "oom", "none"):
        code = run_harness(
            "run", "engine.name=failing-test", f"+engine.phase={phase}", *QUICK, f"hydra.run.dir={base}/{phase}"
        )
        assert code == (1 if phase != "none" else 0)
    df = load(base).set_index(pd.Index([p.split("/")[-2] for p in load(base).record_path]))
    assert df.loc["prepare", "status"] == "failed"
    assert df.loc["prepare", "error"] == "RuntimeError: injected failure <in prepare>"
    assert df.loc["oom", "status"] == "oom"
    assert df.loc["none", "status"] == "ok" and df.loc["none", "variant"] == "failing-test(phase=none)"
    rec = json.loads((base / "prepare" / RECORD_NAME).read_text())
    assert "Traceback" in rec["traceback"] and rec["duration_s"] >= 0


def test_peak_memory_is_the_engines_own(run_harness, tmp_path):
    """A half-depth student must not be charged for the reference it was cut from: the timed window holds only
    the prepared model, so its peak is lower by about the weights it dropped."""
    big_layers = ["model=tiny", "model.weights=random", "model.dim=768", "model.n_layers=8", "model.n_heads=12",
                  "model.n_kv_heads=4", "model.intermediate_size=3072", "quality.enabled=false"]  # fmt: skip
    code = run_harness("run", "-m", "engine=eager,distilled", *big_layers, *QUICK, f"hydra.sweep.dir={tmp_path}")
    assert code == 0
    df = load(tmp_path).set_index("engine")
    dropped_mb = (df.loc["eager", "weight_bytes"] - df.loc["distilled", "weight_bytes"]) / 2**20
    assert dropped_mb > 100
    saved_mb = df.loc["eager", "peak_memory_mb"] - df.loc["distilled", "peak_memory_mb"]
    assert 0.85 * dropped_mb < saved_mb < 1.15 * dropped_mb


def test_a_profiling_failure_keeps_the_points_timings(run_harness, tmp_path, monkeypatch):
    """Profiling runs after the timed window: when it fails (here inside the profiled steps, the profiler
    running), the point stays ok with its timings, the profile section says why, and the profiler is off again."""
    import torch

    import harness.profiling

    def failing_generate(model, prompt, n, decoding, num_beams, clock=None):
        if clock is None:  # the unprofiled generation before the profiler's
            return None
        clock.start()
        clock.mark()  # prefill done: the profiler starts
        raise RuntimeError("cache too small for profiling")

    monkeypatch.setattr(harness.profiling, "generate", failing_generate)
    args = ("model=tiny", "model.weights=random", "quality.enabled=false", "profile=true", "profile_steps=2", *QUICK)
    assert run_harness("run", *args, f"hydra.run.dir={tmp_path}") == 0
    rec = json.loads((tmp_path / RECORD_NAME).read_text())
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["profile"]["error"] == "RuntimeError: cache too small for profiling" and rec["profile"]["steps"] == 2
    assert "breakdown_ms" not in rec["profile"] and len(rec["samples"]["tpot_ms"]) == rec["timing"]["reps"] > 0
    assert rec["metrics"]["decode_tokens_per_s"] > 0 and not torch.autograd._profiler_enabled()
    row = load(tmp_path).iloc[0]
    assert row.status == "ok" and np.isfinite(row.tpot_ms_p50)
