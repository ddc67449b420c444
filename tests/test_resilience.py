"""Fault isolation, timeouts, process-isolating launchers, resume, and launcher presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_POINT

from harness.records import RECORD_NAME, load

TESTS = Path(__file__).resolve().parent
QUICK = [*FAST_POINT, "roofline.enabled=false"]


@pytest.fixture()
def fault_env(subprocess_env) -> dict[str, str]:
    """A shell environment whose harness (and its launchers' workers) knows the test-only fault engine."""
    env = dict(subprocess_env, HARNESS_ENGINES="fault_engines", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def harness(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "run", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)  # fmt: skip


def test_timeout_oom_and_exceptions_in_process(run_harness, tmp_path, monkeypatch):
    import fault_engines  # noqa: F401  (registers fault-test in this process)

    elapsed = {}
    for fault in ("raise", "oom", "hang"):  # raise first: an ordinary point's cost, to compare the hang with
        # only the hang under a deadline: the first point of a process pays one-off costs a 1.5 s limit would cut
        limit = ["measure.timeout_s=1.5"] if fault == "hang" else []
        t0 = time.perf_counter()
        code = run_harness("run", "engine.name=fault-test", f"+engine.fault={fault}", *limit, *QUICK,
                           f"hydra.run.dir={tmp_path / fault}")  # fmt: skip
        elapsed[fault] = time.perf_counter() - t0
        assert code == 1  # the only point failed
        rec = json.loads((tmp_path / fault / RECORD_NAME).read_text())
        expected = {"hang": "timeout", "oom": "oom", "raise": "failed"}[fault]
        assert rec["status"] == expected, rec["error"]
        if fault == "hang":  # waited for the deadline, then went on: about a failing point plus 1.5 s, not forever
            assert "measure.timeout_s=1.5" in rec["error"]
            assert 1.5 <= elapsed["hang"] < 2 * (elapsed["raise"] + 1.5), elapsed
        if fault == "oom":
            assert "can't allocate memory" in rec["error"]


def test_isolated_hang_is_killed_at_its_timeout(run_harness, fault_env, tmp_path, monkeypatch):
    """isolate=true: the parent kills a child that hangs past measure.timeout_s, counted from its start-up."""
    import fault_engines  # noqa: F401  (registers fault-test in this process)

    for name in ("HARNESS_ENGINES", "PYTHONPATH"):  # the spawned child imports the fault engine too
        monkeypatch.setenv(name, fault_env[name])
    code = run_harness("run", "isolate=true", "measure.timeout_s=5", "engine.name=fault-test", "+engine.fault=hang",
                       *QUICK, f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert code == 1
    rec = json.loads((tmp_path / RECORD_NAME).read_text())
    assert rec["status"] == "timeout" and "measure.timeout_s=5" in rec["error"] and "killed" in rec["error"]
    iso = rec["isolation"]
    assert iso["timed_out"] and not iso["startup_hung"] and iso["process_exitcode"] == -9
    waited = rec["duration_s"] - iso["startup_s"]  # from the child's start-up to its kill
    assert 5 <= waited < 2 * 5, rec["duration_s"]


def test_an_isolated_child_ends_with_its_killed_parent_and_records_why(fault_env, tmp_path):
    """A parent killed outright (a CI job's timeout, ``docker stop`` escalating to SIGKILL) takes its deadline with
    it: the child is sent SIGTERM at its death, records itself as interrupted and ends, instead of hanging on."""
    import psutil

    counter, run_dir = tmp_path / "prepares", tmp_path / "run"
    args = [sys.executable, "-m", "harness", "run", "isolate=true", "measure.timeout_s=600", "engine.name=fault-test",
            "+engine.fault=hang", f"+engine.counter={counter}", *QUICK, f"hydra.run.dir={run_dir}"]  # fmt: skip
    parent = subprocess.Popen(args, env=fault_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (counter.exists() and counter.read_text().strip()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent ended before its child hung"
            time.sleep(0.2)
        child = psutil.Process(int(counter.read_text().split()[0]))  # the child, hanging in prepare()
        parent.kill()
        parent.wait()
        child.wait(timeout=30)  # psutil.TimeoutExpired here: the child outlived its parent
    finally:
        parent.kill()
        if child is not None and child.is_running():  # a failure leaves no orphan measuring on
            child.kill()
    rec = json.loads((run_dir / RECORD_NAME).read_text())
    assert rec["status"] == "failed" and rec["error"] == "interrupted (SIGTERM)"


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_isolated_child_stuck_at_start_up_is_killed(compose_cfg, tmp_path, monkeypatch, timeout_s):
    """A child not ready when the start-up limit ends is killed and recorded as such, with or without a
    measure.timeout_s (whose deadline never began)."""
    from harness import isolation
    from harness.config import validate

    spec = validate(compose_cfg(*QUICK))
    monkeypatch.setattr(isolation, "STARTUP_LIMIT_S", 0.2)  # shorter than a spawned interpreter's imports
    rec = isolation.run_isolated(spec, tmp_path, {}, timeout_s)
    assert rec["status"] == "failed", rec["error"]
    assert "did not start within 0.2 s" in rec["error"] and "timeout_s" not in rec["error"]
    assert rec["isolation"]["startup_hung"] and not rec["isolation"]["timed_out"]
    assert rec["isolation"]["process_exitcode"] == -9


def test_isolated_child_with_an_unreadable_record(compose_cfg, fault_env, tmp_path, monkeypatch):
    import fault_engines  # noqa: F401  (registers fault-test in this process)

    from harness import isolation
    from harness.config import validate
    from harness.records import RecordError

    for name in ("HARNESS_ENGINES", "PYTHONPATH"):
        monkeypatch.setenv(name, fault_env[name])
    spec = validate(compose_cfg("engine.name=fault-test", "+engine.fault=raise", *QUICK))
    real, calls = isolation.read_record, []

    def unreadable_once(path):  # the child's record, as if something had garbled it; the parent's own reads fine
        calls.append(path)
        if len(calls) == 1:
            raise RecordError(f"{path}: unreadable record (JSONDecodeError: Expecting value)")
        return real(path)

    monkeypatch.setattr(isolation, "read_record", unreadable_once)
    rec = isolation.run_isolated(spec, tmp_path, {}, None)
    assert rec["status"] == "failed" and rec["isolation"]["process_exitcode"] == 0
    assert f"its record is unreadable: {tmp_path / RECORD_NAME}: unreadable record" in rec["error"]
    assert "without writing its record" not in rec["error"]


@pytest.mark.parametrize(
    ("sweep_arg", "expected", "point"),
    [
        ("engine=eager,nonexistent", "engine: unknown option 'nonexistent'; allowed: compiled, distilled, eager",
         "2/2: engine=nonexistent"),
        ("workload.bogus=1,2", "workload.bogus: unknown field; allowed: batch_size", "1/2: workload.bogus=1"),
    ],
)  # fmt: skip
def test_preflight_refuses_a_bad_sweep_point_in_one_line(run_harness, tmp_path, capsys, sweep_arg, expected, point):
    import warnings

    sweep = tmp_path / "sweep"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_harness("run", "-m", sweep_arg, *QUICK, f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness run: error: "), err
    assert expected in lines[0] and f"(sweep point {point} " in lines[0], lines[0]
    assert not [w for w in caught if "on_multirun_start" in str(w.message)]  # not Hydra's multi-line warning
    assert not list(sweep.rglob(RECORD_NAME))  # refused before any work


def test_fault_injection_sweep_under_submitit_local(fault_env, tmp_path, capsys):
    """Every point in its own process (isolate=true), under a launcher that runs them as separate jobs: the
    healthy points are ok, each faulty one has a record saying what happened, and nothing else is lost."""
    sweep = tmp_path / "sweep"
    # hang has its own test with a short timeout (test_isolated_hang_is_killed_at_its_timeout): here it would
    # cost the whole timeout_s, which must stay well above what a healthy point takes when all run at once
    # one point per fault (a batch-size axis doubled the processes starting at once on a 2-core runner, and
    # tested nothing the faults do not)
    proc = harness(["-m", "hydra/launcher=submitit_local", "isolate=true", "measure.timeout_s=60",
                    "engine.name=fault-test", "+engine.fault=none,raise,oom,kill", *QUICK, f"hydra.sweep.dir={sweep}"],
                   fault_env, tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(sweep)
    assert len(df) == 4 and df.point_key.nunique() == 4
    status = {r["engine.fault"]: (r.status, r.error) for _, r in df.iterrows()}
    assert status["none"][0] == "ok"
    assert status["raise"] == ("failed", "RuntimeError: injected failure")
    assert status["oom"][0] == "oom" and "can't allocate memory" in status["oom"][1]
    assert status["kill"][0] == "failed" and "killed by signal SIGKILL" in status["kill"][1]
    counts = df.status.value_counts().to_dict()
    with capsys.disabled():
        print(f"\nsubmitit_local fault injection, 4 points: {counts}")
    assert counts == {"failed": 2, "ok": 1, "oom": 1}
    assert "timings interfere" in proc.stdout + proc.stderr  # the launcher runs points at once: warned


def test_crashed_point_under_joblib_and_the_others_finish(fault_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = harness(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "isolate=true", "engine.name=fault-test",
                    "+engine.fault=none,kill", "workload.batch_size=1,2", *QUICK, f"hydra.sweep.dir={sweep}"],
                   fault_env, tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(sweep)
    assert sorted(df.status) == ["failed", "failed", "ok", "ok"]
    assert df[df.status == "failed"].error.str.contains("SIGKILL").all()


def test_a_launcher_that_gives_up_mid_sweep_still_leaves_records_summary_and_report(fault_env, tmp_path):
    """Without isolate=true a point that kills its process makes submitit's launcher raise: the harness records
    the points left without a record, prints the summary and writes the report, then says why it stopped."""
    sweep = tmp_path / "sweep"
    proc = harness(["-m", "hydra/launcher=submitit_local", "engine.name=fault-test", "+engine.fault=none,kill",
                    *QUICK, f"hydra.sweep.dir={sweep}"], fault_env, tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "the launcher stopped the sweep" in proc.stderr, proc.stderr[-3000:]
    assert "Report: " in proc.stdout and (sweep / "report.html").is_file()
    df = load(sweep)
    assert len(df) == 2 and sorted(df.status) == ["failed", "ok"]


def test_resume_reruns_only_the_missing_points(fault_env, tmp_path):
    """A sweep killed half way (its own process dies at the third point), then resumed into the same directory:
    only the third and fourth points run again, and the good records are left as they were."""
    sweep, counter = tmp_path / "sweep", tmp_path / "runs.txt"
    # four seeds: four references, so the engine is prepared (and counted) once per point
    args = ["-m", "engine.name=fault-test", "+engine.fault=kill", "+engine.on_run=3", f"+engine.counter={counter}",
            "seed=1,2,3,4", *QUICK, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    first = harness(args, fault_env, tmp_path)
    assert first.returncode == -9  # the whole sweep process was killed at its third point
    assert len(counter.read_text().splitlines()) == 3
    good = {p: p.stat().st_mtime_ns for p in sweep.rglob(RECORD_NAME)}
    assert len(good) == 2
    second = harness([*args, "resume=true"], fault_env, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(counter.read_text().splitlines()) == 5  # two runs: the killed point and the one never reached
    assert second.stdout.count("skipped (resume=true)") == 2
    assert all(p.stat().st_mtime_ns == t for p, t in good.items())  # never overwritten
    df = load(sweep)
    assert len(df) == 4 and (df.status == "ok").all() and sorted(df.seed) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def three_points(tmp_path_factory) -> Path:
    """One real in-process sweep of three points (batch 1, 2, 3), run once for the tests that delete a record
    from it: each takes its own copy (`_sweep_copy`)."""
    import torch
    from conftest import _reset_process_state, _run_in_process

    sweep = tmp_path_factory.mktemp("three-points") / "sweep"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "1")
        code = _run_in_process("run", "-m", "workload.batch_size=1,2,3", *QUICK, f"hydra.sweep.dir={sweep}")
    _reset_process_state(threads)
    assert code == 0
    return sweep


def _sweep_copy(sweep: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(sweep, tmp_path / "sweep"))


def test_points_without_a_record_are_recorded_as_missing(three_points, tmp_path):
    from harness.progress import missing_points

    sweep = _sweep_copy(three_points, tmp_path)
    assert missing_points(sweep) == []
    (sweep / "1" / RECORD_NAME).unlink()  # as if point 2's process had died before writing
    missing = missing_points(sweep)
    assert [m["job"] for m in missing] == [1] and "workload.batch_size=2" in missing[0]["overrides"]


def test_slurm_preset_and_parallel_warnings(run_harness, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from harness import preflight
    from harness.preflight import parallel_warning

    monkeypatch.setattr(preflight, "usable_cpus", lambda: 4)

    code = run_harness(
        "run",
        "--cfg",
        "hydra",
        "--package",
        "hydra.launcher",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=perf",
        "hydra.launcher.timeout_min=90",
    )
    assert code == 0
    launcher = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out), resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["gpus_per_node"] == 1
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "perf", 90)
    assert launcher["tasks_per_node"] == 1

    def config(device: str, **launcher_fields) -> OmegaConf:
        return OmegaConf.create({"device": device, "hydra": {"launcher": launcher_fields}})

    assert parallel_warning(config("cuda", **launcher), 4) is None  # one GPU per job: nothing shared
    assert "no GPU" in parallel_warning(config("cuda", **{**launcher, "gpus_per_node": 0}), 4)
    assert "share" in parallel_warning(config("cuda", **{**launcher, "tasks_per_node": 2}), 4)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert "runs up to 4 points at once on this machine (n_jobs=-1: one per core)" in parallel_warning(
        config("cpu", _target_=joblib, n_jobs=-1), 4
    )
    assert parallel_warning(config("cpu", _target_=joblib, n_jobs=1), 4) is None
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert "every point at once" in parallel_warning(config("cpu", _target_=local), 4)
    assert (
        parallel_warning(config("cpu", _target_="hydra._internal.core_plugins.basic_launcher.BasicLauncher"), 4) is None
    )


def test_report_of_a_stopped_sweep_lists_its_missing_points(run_harness, three_points, tmp_path, capsys):
    """A sweep whose process was killed never reached its end: `harness report` still names what is missing."""
    sweep = _sweep_copy(three_points, tmp_path)
    (sweep / "2" / RECORD_NAME).unlink()
    capsys.readouterr()
    assert run_harness("report", str(sweep), "-o", str(tmp_path / "r.html")) == 0
    html = (tmp_path / "r.html").read_text()
    failed = html[html.index('<section id="failed">') :]  # the inlined plotly.js says "missing" too
    failed = failed[: failed.index("</section>")]
    assert "missing" in failed and "workload.batch_size=3" in failed and "job 2" in failed


def test_nested_deadlines_keep_the_outer_one():
    """A deadline inside another (a point's budget around one repetition) must not disarm the outer one."""
    import signal

    from harness.isolation import PointTimeout, deadline

    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(PointTimeout):
        with deadline(0.3):
            with deadline(5.0):
                time.sleep(0.05)
            time.sleep(2.0)  # the outer deadline ends this long before it finishes
    assert time.perf_counter() - t0 < 1.5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == before



def _sigterm_on_generation(monkeypatch, batch_size: int = 1) -> None:
    """SIGTERM (a CI timeout, `docker stop`) arrives at the third generation the harness times for the point of
    ``batch_size``."""
    import signal

    from harness import point

    real, calls = point.generate, []

    def generate(model, prompt, *args, **kwargs):
        calls.append(prompt.shape[0])
        if calls.count(batch_size) == 3 and prompt.shape[0] == batch_size:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(point, "generate", generate)


def test_sigterm_records_the_running_point_as_interrupted(run_harness, tmp_path, capsys, monkeypatch):
    """SIGTERM is taken as Ctrl-C: the running point's record says interrupted (SIGTERM), the process exits with
    143 and says where the record is; the CLI's handler is gone once it returns."""
    import signal

    _sigterm_on_generation(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    assert run_harness("run", *QUICK, f"hydra.run.dir={run}") == 143
    assert signal.getsignal(signal.SIGTERM) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"harness: terminated (SIGTERM); the point's record is in {run.resolve()}", err[-3:]
    rec = json.loads((run / RECORD_NAME).read_text())
    assert rec["status"] == "failed" and rec["error"] == "interrupted (SIGTERM)"


def test_sigterm_mid_sweep_keeps_what_was_measured_and_says_how_to_resume(run_harness, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    _sigterm_on_generation(monkeypatch, batch_size=2)
    sweep = tmp_path / "sweep"
    assert run_harness("run", "-m", "workload.batch_size=1,2,3", *QUICK, f"hydra.sweep.dir={sweep}") == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"harness: terminated (SIGTERM); records so far in {sweep.resolve()} (add resume=true to the "
                       "same command to continue the sweep)"), err[-3:]  # fmt: skip
    status = {r.job: (r.status, r.error) for r in load(sweep).itertuples()}
    assert status[0][0] == "ok" and status[1] == ("failed", "interrupted (SIGTERM)") and 2 not in status
