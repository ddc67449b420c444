"""What a multirun settles before its first point and after its launcher gives up: glob/range sweeps validated,
empty and reused sweeps refused (and reused single-run folders), points sharing a job folder refused, launchers
that never started, missing points under --config-dir and a custom hydra.sweep.subdir, and the parallel
launchers' warning repeated in the final summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import FAST_POINT
from report_records import make_record

from harness.progress import SWEEP_META
from harness.records import RECORD_NAME, find_records, load, write_record

QUICK = [*FAST_POINT, "roofline.enabled=false"]


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness run: error: "), err
    return lines[0]


def _jobs_raise(monkeypatch, message: str = "lost the job's process") -> None:
    """Every job's task raises past the point's own guard, as a launcher that loses a job does to the sweep."""
    from harness import app

    def lost(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(app, "run_point", lost)
    monkeypatch.setattr(app, "run_isolated", lost)


def test_a_glob_sweep_is_validated_point_by_point(run_harness, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = run_harness(
        "run", "-m", "engine=glob(eag*)", "workload.batch_size=1,abc", *QUICK, f"hydra.sweep.dir={sweep}"
    )
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert "workload.batch_size" in line and "(sweep point 2/2: engine=eager workload.batch_size=abc" in line, line
    assert not sweep.exists()  # refused before any work


@pytest.mark.parametrize(
    ("sweep_arg", "expected"),
    [
        ("engine=glob(quantized/*)", "engine=glob(quantized/*): matches no option of engine; allowed: compiled,"),
        ("workload.batch_size=range(1,1)", "workload.batch_size=range(1,1): expands to no value"),
    ],
)
def test_a_sweep_of_no_points_is_refused(run_harness, tmp_path, capsys, sweep_arg, expected):
    sweep = tmp_path / "sweep"
    code = run_harness("run", "-m", sweep_arg, *QUICK, f"hydra.sweep.dir={sweep}")
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and expected in line and "the sweep has no points" in line, line
    assert not sweep.exists()


def test_an_unexpected_error_while_planning_the_sweep_is_one_line(run_harness, tmp_path, capsys, monkeypatch):
    import warnings

    from harness import callbacks

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'get'")

    monkeypatch.setattr(callbacks, "launcher_warning", broken)
    sweep = tmp_path / "sweep"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_harness("run", "-m", "workload.batch_size=1,2", *QUICK, f"hydra.sweep.dir={sweep}")
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and "AttributeError: 'NoneType' object has no attribute 'get'" in line, line
    assert not [w for w in caught if "on_multirun_start" in str(w.message)]  # not Hydra's warning, then the sweep
    assert not sweep.exists()


def test_a_launcher_that_never_started_a_job_writes_no_record(run_harness, tmp_path, capsys):
    """hydra/launcher=slurm without SLURM: one line naming the launcher and its error, nothing a gate would read
    as crashed points."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    code = run_harness("run", "-m", "workload.batch_size=1,2", *QUICK, "hydra/launcher=slurm",
                       f"hydra.sweep.dir={sweep}")  # fmt: skip
    out = capsys.readouterr()
    line = _one_line_error(out.err)
    assert code == 2
    assert line.startswith("harness run: error: hydra/launcher=slurm: no job started: RuntimeError: "), line
    assert "srun" in line and "isolate=true" not in line
    assert not find_records(sweep) and "Report: " not in out.out


def test_missing_points_keep_the_user_config_dir_and_the_sweep_subdir(run_harness, tmp_path, capsys, monkeypatch):
    """A launcher that gives up after its jobs began: the points without a record are recorded from the configs
    validated before the sweep (a --config-dir model), in the job folders hydra.sweep.subdir names, with the
    launcher's error; duplicate points are named in a warning."""
    user = tmp_path / "ucfg"
    (user / "model").mkdir(parents=True)
    tiny = (Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny.yaml").read_text()
    (user / "model" / "mini.yaml").write_text(tiny.replace("name: tiny", "name: mini").replace("dim: 256", "dim: 64"))
    _jobs_raise(monkeypatch)
    sweep = tmp_path / "sweep"
    code = run_harness("run", "--config-dir", str(user), "-m", "model=mini", "workload.batch_size=1,2,1", *QUICK,
                       "hydra.sweep.subdir=b${hydra.job.num}", f"hydra.sweep.dir={sweep}")  # fmt: skip
    out = capsys.readouterr()
    assert code == 1, out.err[-3000:]
    assert "Traceback" not in out.err and "the launcher stopped the sweep" in out.err, out.err[-3000:]
    assert (
        "sweep points 1/3 and 3/3 are the same point (equal point keys), measured twice: workload.batch_size=1 | "
        "workload.batch_size=1" in out.err + out.out
    )
    meta = json.loads((sweep / SWEEP_META).read_text())
    assert meta["subdirs"] == ["b0", "b1", "b2"]
    for job in (0, 1):
        rec = json.loads((sweep / f"b{job}" / RECORD_NAME).read_text())
        assert rec["missing"] and rec["status"] == "failed" and rec["config"]["model"]["dim"] == 64
        assert f"its log, if any: {sweep / f'b{job}'}/harness.log" in rec["error"]
        assert "RuntimeError: lost the job's process" in rec["error"]
    assert not (sweep / "0").exists()
    assert "(isolate=true keeps a crashed point from stopping the others)" in out.err


def test_the_isolate_hint_only_where_points_ran_without_it(run_harness, tmp_path, capsys, monkeypatch):
    from harness import callbacks

    _jobs_raise(monkeypatch)
    sweep = tmp_path / "sweep"
    code = run_harness("run", "-m", "workload.batch_size=1,2", "isolate=true", *QUICK, f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err
    assert code == 1 and callbacks.LAST_RESULT["isolated"] is True
    line = next(x for x in err.splitlines() if x.startswith("harness run: error: "))
    assert line == "harness run: error: the launcher stopped the sweep: RuntimeError: lost the job's process", line
    assert sorted(load(sweep).status) == ["failed", "failed"]


def test_a_reused_sweep_dir_without_resume_is_refused(run_harness, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_record(sweep / "0", make_record("eager", "tiny", 2, 0))  # an earlier sweep's point
    before = (sweep / "0" / RECORD_NAME).read_text()
    code = run_harness("run", "-m", "workload.batch_size=4", *QUICK, f"hydra.sweep.dir={sweep}")
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert f"hydra.sweep.dir: {sweep} already holds 1 record of an earlier sweep" in line, line
    assert "resume=true" in line and "fresh hydra.sweep.dir" in line
    assert (sweep / "0" / RECORD_NAME).read_text() == before and len(find_records(sweep)) == 1
    assert not (sweep / SWEEP_META).exists()


def test_a_reused_run_dir_without_resume_is_refused(run_harness, tmp_path, capsys):
    """A single run into a folder that holds an earlier run's record (a hydra.run.dir chosen twice): refused like a
    reused sweep folder; resume=true keeps it."""
    run = tmp_path / "run"
    write_record(run, make_record("eager", "tiny", 2, 0))  # an earlier run's point
    before = (run / RECORD_NAME).read_text()
    assert run_harness("run", "workload.batch_size=4", *QUICK, f"hydra.run.dir={run}") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"harness run: error: hydra.run.dir: {run} already holds the record of an earlier run"), line
    assert "resume=true" in line and "another hydra.run.dir" in line
    assert (run / RECORD_NAME).read_text() == before
    # a point that fails in prepare (no timing): the other record is kept, this one is written beside it (exit 0)
    assert run_harness("run", "engine.name=failing-test", *QUICK, "resume=true", f"hydra.run.dir={run}") == 0
    assert (run / RECORD_NAME).read_text() == before
    assert sorted(load(run).status) == ["failed", "ok"]


@pytest.mark.parametrize("launcher", ["basic", "interleaved"])
def test_points_that_share_a_job_folder_are_refused(run_harness, tmp_path, capsys, launcher):
    """A hydra.sweep.subdir that resolves alike for two points: one record would replace the other, and the point
    left without one would be reported as a crash. Refused before any work, under either launcher."""
    sweep = tmp_path / "sweep"
    code = run_harness("run", "-m", "engine=eager,quantized/int8_dynamic", "workload.batch_size=1,2", *QUICK,
                       "hydra.sweep.subdir=${engine.name}", f"hydra/launcher={launcher}",
                       f"hydra.sweep.dir={sweep}")  # fmt: skip
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert "hydra.sweep.subdir: points 1/4 and 2/4 both resolve to 'eager'" in line, line
    assert "${hydra.job.num}" in line
    assert not sweep.exists()


def test_parallel_launchers_repeat_their_warning_in_the_summary(tmp_path, capsys, monkeypatch):
    from harness import callbacks
    from harness.progress import write_sweep_meta

    monkeypatch.setattr("harness.report.write_report", lambda d: d / "report.html")
    for job, variant in enumerate(("eager", "quantized(scheme=int8)")):
        write_record(tmp_path / str(job), make_record(variant, "tiny", 1, job))
    callbacks._print_summary(tmp_path)
    assert "points timed one after another" in capsys.readouterr().out  # the basic launcher's sweep
    warning = "the joblib launcher runs up to 2 points at once on this machine: their timings interfere"
    write_sweep_meta(tmp_path, {"parallel_warning": warning, "concurrent": True})
    callbacks._print_summary(tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    text = "\n".join(lines)
    assert "one after another" not in text and "points ran at the same time" in text
    assert f"Warning: {warning}" in lines[-3], lines[-4:]  # right above the results and report lines
    assert len(load(tmp_path)) == 2


def test_joblib_warning_counts_the_workers_of_a_negative_n_jobs(monkeypatch):
    from omegaconf import OmegaConf

    from harness import preflight

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    monkeypatch.setattr(preflight, "usable_cpus", lambda: 8)

    def warning(n_jobs, n_points=4):
        return preflight.parallel_warning(
            OmegaConf.create({"device": "cpu", "hydra": {"launcher": {"_target_": joblib, "n_jobs": n_jobs}}}),
            n_points,
        )

    assert "runs up to 8 points at once on this machine (n_jobs=-1: one per core)" in warning(-1, 16)
    assert "runs up to 4 points at once" in warning(-1)  # no more than the sweep has
    assert "runs up to 7 points at once on this machine (n_jobs=-2: all cores but 1)" in warning(-2, 16)
    assert "runs up to 3 points at once on this machine:" in warning(3)
    assert warning(-8) is None and warning(1) is None and warning(-1, 1) is None  # one worker: one after another
    assert "-1 points" not in warning(-1)


def test_duplicate_points_are_named_by_what_varies():
    from harness.preflight import duplicate_points

    points = [["engine=pruned", "workload.batch_size=1"], ["engine=eager", "workload.batch_size=1"],
              ["engine=pruned/magnitude", "workload.batch_size=1"]]  # fmt: skip
    assert duplicate_points(points, ["k1", "k2", "k1"]) == [
        "sweep points 1/3 and 3/3 are the same point (equal point keys), measured twice: engine=pruned | "
        "engine=pruned/magnitude"
    ]
    assert duplicate_points(points, ["k1", "k2", "k3"]) == []
    same = [["workload.batch_size=1"], ["workload.batch_size=1"]]  # nothing varies: the whole override lists
    assert duplicate_points(same, ["k", "k"])[0].endswith("workload.batch_size=1 | workload.batch_size=1")


def test_shared_job_folders_are_named_by_their_points():
    from harness.preflight import shared_job_dir

    assert shared_job_dir(["0", "1", "2"], [0, 1, 2], 3) is None
    assert shared_job_dir(["a/b", "x", "a/./b"], [0, 1, 2], 3).startswith(
        "hydra.sweep.subdir: points 1/3 and 3/3 both resolve to 'a/./b'"
    )
    assert shared_job_dir(["/s/x", "/s/x"], [4, 7]).startswith("hydra.sweep.subdir: points 5 and 8 both resolve to")


def test_the_job_folder_of_each_planned_point_is_where_the_launcher_puts_it(tmp_path):
    from harness.progress import missing_points, write_sweep_meta

    write_sweep_meta(tmp_path, {"points": [["a=1"], ["a=2"]], "point_keys": ["k1", "k2"], "subdirs": ["x/0", "y"]})
    assert [m["job_dir"] for m in missing_points(tmp_path)] == [str(tmp_path / "x/0"), str(tmp_path / "y")]
    write_sweep_meta(tmp_path, {"points": [["a=1"]], "point_keys": ["k1"]})  # a sweep.json of before
    assert [m["job_dir"] for m in missing_points(tmp_path)] == [str(tmp_path / "0")]


def test_default_output_folders_tell_apart_runs_started_in_one_second(run_harness, capsys):
    """Two runs launched together (one per GPU, from a script) must not share results/runs/<second>: each record
    would replace the other's, since neither exists yet when the other checks. The default names hold microseconds."""
    assert run_harness("run", "--cfg", "hydra", "--resolve") == 0
    dirs = re.findall(r"^    dir: (results/(?:runs|sweeps)/\S+)$", capsys.readouterr().out, flags=re.M)
    assert len(dirs) == 2
    for d in dirs:
        assert re.fullmatch(r"results/(runs|sweeps)/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", d), d
