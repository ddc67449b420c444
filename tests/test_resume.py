"""resume=true: never overwrite a good record, whatever order the resumed sweep runs its points in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST_POINT

from harness.records import RECORD_NAME, forget_ok_index, load, measured_ok, write_record

QUICK = [*FAST_POINT, "roofline.enabled=false"]
FAILING_POINT = ["engine.name=failing-test", *QUICK]  # fails in prepare: a point costs a tiny model build, no timing


def _mark_ok(path: Path) -> None:
    """Turn a failed record into a good one (same point key), as if the point had been measured."""
    rec = json.loads(path.read_text())
    rec.update(status="ok", error=None, traceback=None)
    write_record(path.parent, rec)


@pytest.mark.parametrize("launcher", ["basic", "interleaved"])
def test_resume_in_another_order_keeps_every_good_record(run_harness, tmp_path, capsys, launcher):
    sweep, FAILING = tmp_path / "sweep", [*FAILING_POINT, f"hydra/launcher={launcher}"]
    assert run_harness("run", "-m", "workload.batch_size=1,2,4", *FAILING, f"hydra.sweep.dir={sweep}") == 1
    for job in (0, 1):  # batch 1 and 2 are good records; batch 4's failed attempt stays in 2/
        _mark_ok(sweep / str(job) / RECORD_NAME)
    good = {p: p.read_bytes() for p in (sweep / "0" / RECORD_NAME, sweep / "1" / RECORD_NAME)}
    capsys.readouterr()
    # job 0 (batch 8) finds batch 1's record in its folder, job 1 (batch 4) finds batch 2's
    code = run_harness("run", "-m", "workload.batch_size=8,4,1,2", "resume=true", *FAILING, f"hydra.sweep.dir={sweep}")
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text[-3000:]
    assert all(p.read_bytes() == data for p, data in good.items())  # never overwritten
    df = load(sweep)
    assert len(df) == 4 and df.point_key.nunique() == 4, df[["batch_size", "status", "record_path"]]
    status = dict(zip(df.batch_size, df.status, strict=True))
    assert status == {1: "ok", 2: "ok", 4: "failed", 8: "failed"}
    assert not df.error.fillna("").str.contains("no record was written").any()  # nothing taken for a crash
    rel = [Path(p).relative_to(sweep.resolve()).parent.as_posix() for p in df.record_path]
    where = dict(zip(df.batch_size, rel, strict=True))
    assert where[1] == "0" and where[2] == "1"
    assert where[4] == "2"  # its earlier attempt replaced: one record per point
    assert where[8] == f"points/{df.set_index('batch_size').point_key[8]}"
    for job in (0, 1):
        assert f"already measured ok in {(sweep / str(job) / RECORD_NAME).resolve()}, skipped" in text


def test_resume_with_a_plan_that_leaves_out_earlier_points_is_refused(run_harness, tmp_path, capsys):
    """resume=true continues the sweep planned in the folder: a plan without some of its points would mix their
    records into this sweep's summary and report. A plan that keeps them (in any order) and adds more is fine."""
    sweep = tmp_path / "sweep"
    assert run_harness("run", "-m", "workload.batch_size=1,2", *FAILING_POINT, f"hydra.sweep.dir={sweep}") == 1
    meta = (sweep / "sweep.json").read_text()
    capsys.readouterr()
    resumed = ["resume=true", *FAILING_POINT, f"hydra.sweep.dir={sweep}"]
    code = run_harness("run", "-m", "workload.batch_size=2,4", *resumed)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"harness run: error: hydra.sweep.dir: resume=true continues the sweep planned in "
                             f"{sweep}, but this plan leaves out 1 of its 2 points (e.g. workload.batch_size=1")
    assert (sweep / "sweep.json").read_text() == meta and len(load(sweep)) == 2  # refused before any work
    assert run_harness("run", "-m", "workload.batch_size=4,2,1", *resumed) == 1
    assert sorted(load(sweep).batch_size) == [1, 2, 4]


def test_a_resumed_point_the_interleaved_launcher_measures_again_is_reported_measured(run_harness, tmp_path, capsys):
    """The launcher re-measures a point whose earlier record failed and writes it ok before the job's task runs:
    the task reports that measurement, it does not take its own fresh record for an earlier one to skip."""
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "engine=eager", "workload.batch_size=1", *QUICK, "hydra/launcher=interleaved",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert run_harness(*args) == 0
    path = sweep / "0" / RECORD_NAME
    rec = json.loads(path.read_text())
    rec.update(status="failed", error="RuntimeError: boom")
    write_record(path.parent, rec)
    capsys.readouterr()
    assert run_harness(*args, "resume=true") == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "already measured ok" not in text and "  ok: TTFT p50" in text, text[-3000:]
    assert load(sweep).status.tolist() == ["ok"]


def test_resume_with_job_chdir_and_a_relative_sweep_dir(run_harness, tmp_path, capsys, monkeypatch):
    """hydra.job.chdir=true moves each job into its folder: a relative hydra.sweep.dir is still the sweep's."""
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "engine=eager", "workload.batch_size=1,2", *QUICK, "hydra.job.chdir=true",
            "hydra.sweep.dir=rel"]  # fmt: skip
    assert run_harness(*args) == 0
    assert {Path(d) for d in load(tmp_path / "rel").sweep_dir} == {(tmp_path / "rel").resolve()}
    capsys.readouterr()
    assert run_harness(*args, "resume=true") == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("already measured ok") == 2


def test_job_chdir_keeps_relative_input_paths_relative_to_the_launch_dir(run_harness, tmp_path, capsys, monkeypatch):
    """corpus.path and cache_dir typed relative mean the directory `harness run` started in, in the preflight and
    in each job alike (a job's cwd is its own folder under hydra.job.chdir=true)."""
    from harness.corpus import load_corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corp.txt").write_bytes(load_corpus().train[: 20 * 4096])
    args = ["run", "-m", "engine=eager", "workload.batch_size=1,2", *QUICK, "hydra.job.chdir=true",
            "hydra.sweep.dir=rel", "corpus.path=corp.txt", "cache_dir=relcache"]  # fmt: skip
    assert run_harness(*args) == 0, capsys.readouterr().err
    df = load(tmp_path / "rel")
    assert list(df.status) == ["ok", "ok"]
    assert (tmp_path / "relcache").is_dir() and not list((tmp_path / "rel").glob("*/relcache"))


def test_measured_ok_rechecks_the_record_it_indexed(tmp_path, synthetic_point):
    forget_ok_index()
    one = synthetic_point(tmp_path / "0", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=1)
    assert measured_ok(tmp_path, one["point_key"]) == (tmp_path / "0" / RECORD_NAME).resolve()
    # another point's record replaces the indexed file; batch 1's now lies elsewhere
    synthetic_point(tmp_path / "0", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=4)
    synthetic_point(tmp_path / "elsewhere", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=1)
    assert measured_ok(tmp_path, one["point_key"]) == (tmp_path / "elsewhere" / RECORD_NAME).resolve()
    synthetic_point(tmp_path / "elsewhere", batch_size=1, status="failed", error="boom")
    assert measured_ok(tmp_path, one["point_key"]) is None  # not ok any more: measure it again
    forget_ok_index()


def test_one_index_serves_skips_and_replacements(tmp_path, synthetic_point):
    """Resume asks one index two things: is the point measured ok (skip it), and where is its earlier attempt (its
    new record replaces that one). Records written after the index was built are this run's own: not hits."""
    from harness.app import record_dir

    forget_ok_index()
    one = synthetic_point(tmp_path / "0", batch_size=1, status="failed", error="boom")
    synthetic_point(tmp_path / "1", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=1)  # batch 1 again, ok
    two = synthetic_point(tmp_path / "2", batch_size=2, status="failed", error="boom")
    assert measured_ok(tmp_path, one["point_key"]) == (tmp_path / "1" / RECORD_NAME).resolve()
    assert measured_ok(tmp_path, two["point_key"]) is None
    # batch 2 runs again from job folder 3 (another order): it replaces its failed attempt in 2/
    assert record_dir(tmp_path, tmp_path / "3", two["point_key"]) == (tmp_path / "2").resolve()
    four = synthetic_point(tmp_path / "4", ttft=[5.0] * 3, tpot=[1.0] * 3, batch_size=4)  # written by this run
    assert measured_ok(tmp_path, four["point_key"]) is None
    assert record_dir(tmp_path, tmp_path / "5", four["point_key"]) == tmp_path / "5"
    forget_ok_index()  # the next run indexes what this one wrote
    assert measured_ok(tmp_path, four["point_key"]) == (tmp_path / "4" / RECORD_NAME).resolve()
    forget_ok_index()
    # a record cut short in the job folder: whose it was no one can tell; moved aside, the folder takes the point
    cut = tmp_path / "6" / RECORD_NAME
    cut.parent.mkdir()
    cut.write_text('{"schema_version": 1, "point_key": "ab')
    assert record_dir(tmp_path, tmp_path / "6", "k" * 16) == tmp_path / "6"
    assert not cut.exists() and (tmp_path / "6" / (RECORD_NAME + ".corrupt")).read_text().startswith('{"schema')
    forget_ok_index()


def test_a_missing_point_names_the_log_of_its_own_job(tmp_path, synthetic_point):
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from harness.callbacks import record_missing
    from harness.config import validate
    from harness.paths import config_dir
    from harness.point import identity
    from harness.progress import missing_points, write_sweep_meta
    from harness.records import point_key

    threads = torch.get_num_threads()
    sweep, overrides = tmp_path / "sweep", ["workload.batch_size=8", "threads=1", *QUICK]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        key = point_key(identity(validate(compose(config_name="config", overrides=overrides))))
        write_sweep_meta(sweep, {"points": [overrides], "point_keys": [key]})
        other = synthetic_point(sweep / "0", ttft=[5.0] * 3, tpot=[1.0] * 3)  # a resumed sweep's other point
        assert record_missing(OmegaConf.create({"hydra": {"job": {"config_name": "config"}}}), sweep) == 1
    GlobalHydra.instance().clear()
    assert json.loads((sweep / "0" / RECORD_NAME).read_text())["point_key"] == other["point_key"]  # kept
    rec = json.loads((sweep / "missing" / key / RECORD_NAME).read_text())
    assert rec["missing"] and rec["point_key"] == key
    assert rec["env"]["torch_threads"] == 1  # the point's thread count, so its fingerprint is the point's own
    torch.set_num_threads(threads)
    assert rec["error"].endswith(f"its log, if any: {sweep / '0'}/harness.log")
    assert missing_points(sweep) == []


def _config_record(tmp_path, synthetic_point, config, quality=None, env_id="env-a", sha="0123abc"):
    rec = synthetic_point(tmp_path, ttft=[5.0] * 3, tpot=[1.0] * 3, env_id=env_id, quality=quality)
    rec.update(config=config)
    rec["env"]["git"]["sha"] = sha
    write_record(tmp_path, rec)
    return rec["point_key"]


def test_resume_reuses_a_record_only_when_it_was_measured_the_same_way(tmp_path, synthetic_point, caplog):
    """Same point key, but another policy, quality setting, environment or code version: measured again, with one
    line naming what differs. Fields that cannot change the numbers (note, resume, isolate, cache_dir, the
    timeout) do not count, and a record without quality never stands for a point that measures it."""
    import logging

    config = {"measure": {"name": "quick", "min_reps": 3, "timeout_s": None}, "quality": {"enabled": False},
              "note": "first", "resume": False, "isolate": False, "cache_dir": "/a"}  # fmt: skip
    env = {"id": "env-a", "git": {"sha": "0123abc", "dirty": False}}
    forget_ok_index()
    key = _config_record(tmp_path / "0", synthetic_point, config)
    ok = (tmp_path / "0" / RECORD_NAME).resolve()
    same = {**config, "note": "again", "resume": True, "isolate": True, "cache_dir": "/b",
            "measure": {**config["measure"], "timeout_s": 60}}  # fmt: skip
    assert measured_ok(tmp_path, key, same, env) == ok
    assert measured_ok(tmp_path, key) == ok  # no config to compare: the key alone, as before
    with caplog.at_level(logging.INFO, logger="harness.records"):
        assert measured_ok(tmp_path, key, {**config, "measure": {**config["measure"], "min_reps": 6}}, env) is None
        assert measured_ok(tmp_path, key, config, {**env, "id": "env-b"}) is None
        assert measured_ok(tmp_path, key, config, {**env, "git": {"sha": "fedcba9"}}) is None
        assert measured_ok(tmp_path, key, {**config, "quality": {"enabled": True}}, env) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(f"{ok} was measured with another " in line for line in lines), lines
    assert [line.split("another ")[1].split(":")[0] for line in lines] == [
        "measure.min_reps", "env.id", "env.git.sha", "quality.enabled, quality (the record has none)"
    ]
    # a record whose config says quality was on, but that holds no quality section, does not stand for it either
    forget_ok_index()
    on = {**config, "quality": {"enabled": True}}
    key = _config_record(tmp_path / "1", synthetic_point, on)
    assert measured_ok(tmp_path / "1", key, on, env) is None
    key = _config_record(tmp_path / "2", synthetic_point, on, quality={"top1_agreement": 1.0})
    assert measured_ok(tmp_path / "2", key, on, env) == (tmp_path / "2" / RECORD_NAME).resolve()
    forget_ok_index()


def test_a_resumed_sweep_measures_again_what_was_measured_without_quality(run_harness, tmp_path, capsys):
    """The first sweep ran with quality off, the resumed one asks for quality: its point is
    measured again (its record then holds fidelity), and a third run with the same config skips it."""
    sweep = tmp_path / "sweep"
    base = ["run", "-m", "engine=eager", *QUICK, f"hydra.sweep.dir={sweep}",
            f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    quality = ["quality.n_seqs=2", "quality.seq_len=32", "quality.greedy_prompts=1", "quality.greedy_prompt_len=8",
               "quality.greedy_len=4", "quality.decode_positions=4"]  # fmt: skip
    assert run_harness(*base, "quality.enabled=false", *quality) == 0
    assert load(sweep).fidelity_top1.isna().all()
    capsys.readouterr()
    assert run_harness(*base, "quality.enabled=true", *quality, "resume=true") == 0
    text = "".join(capsys.readouterr())
    expected = "was measured with another quality.enabled, quality (the record has none): measured again"
    assert expected in text, text[-3000:]
    assert "already measured ok" not in text
    df = load(sweep)
    assert len(df) == 1 and df.status.tolist() == ["ok"] and df.fidelity_top1.notna().all()
    assert run_harness(*base, "quality.enabled=true", *quality, "resume=true", "+note=third") == 0
    assert "already measured ok" in "".join(capsys.readouterr())


def test_an_isolated_point_under_job_chdir_reads_a_relative_corpus_path(run_harness, tmp_path, monkeypatch):
    """The child validates the config again from the job's folder: corpus.path is written back resolved, so it
    reads the file the parent checked (it used to fail: "corpus.path: '<job dir>/corp.txt' is not a readable file")."""
    from harness.corpus import load_corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corp.txt").write_bytes(load_corpus().train[: 20 * 4096])
    code = run_harness("run", "-m", "engine=eager", *QUICK, "isolate=true", "hydra.job.chdir=true",
                       "corpus.path=corp.txt", f"cache_dir={tmp_path / 'cache'}", "hydra.sweep.dir=rel")  # fmt: skip
    rec = json.loads((tmp_path / "rel" / "0" / RECORD_NAME).read_text())
    assert code == 0 and rec["status"] == "ok", rec.get("error")
    assert rec["config"]["corpus"]["path"] == str(tmp_path / "corp.txt")
