"""Points timed in turns: the rotation of ``repeat_in_turns`` and the ``interleaved`` Hydra launcher end to end."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import QUICK

from harness.isolation import PointTimeout
from harness.records import load
from harness.timing import Policy, Repetitions, repeat_in_turns


def _policy(**kw) -> Policy:
    base = dict(min_reps=3, max_reps=6, max_time_s=60.0, target_ci=1e-9, disable_gc=False)
    return Policy(**{**base, **kw})


def _fns(calls: list[str], names: str, fail: dict[str, int] | None = None):
    def make(name: str):
        def rep(i: int) -> dict[str, float]:
            if fail and name in fail and i >= fail[name]:
                raise RuntimeError(f"{name} broke at repetition {i}")
            calls.append(name)
            return {"t": 1.0 + 0.01 * (i % 3)}

        return rep

    return [make(n) for n in names]


def test_rounds_take_one_repetition_each_in_balanced_orders():
    calls: list[str] = []
    out = repeat_in_turns(_fns(calls, "abc"), _policy(), ("t",), [Repetitions() for _ in range(3)])
    assert [r.reps for r in out] == [6, 6, 6]  # every point the same number of rounds (max_reps)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "acb", "bac"]
    assert all(r.stop_reason == "max_reps" and not r.converged for r in out)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_every_point_runs_right_after_every_other_equally_often(n):
    """A rotation (abc, bca, cab) keeps the cyclic order: a follows c twice as often as b. The Williams design
    balances who runs first and who runs after whom."""
    from collections import Counter

    from harness.timing import balanced_orders

    orders = balanced_orders(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    after = Counter((o[i - 1], o[i]) for o in orders for i in range(1, n))
    assert len(after) == n * (n - 1) and len(set(after.values())) <= 1
    assert all(len({o[pos] for o in orders}) == n for pos in range(n))  # every point in every position


def test_group_stops_when_every_point_converges():
    calls: list[str] = []
    out = repeat_in_turns(
        _fns(calls, "ab"), _policy(target_ci=10.0, max_reps=50), ("t",), [Repetitions(), Repetitions()]
    )
    # min_reps=3, but below 7 samples the median's CI does not reach the stop test's 97.5% coverage: the group
    # goes on until it does
    assert [r.reps for r in out] == [7, 7] and all(r.converged and r.stop_reason == "converged" for r in out)


def test_a_failing_point_leaves_the_rotation_and_the_others_go_on():
    calls: list[str] = []
    warmed = [Repetitions() for _ in range(3)]
    out = repeat_in_turns(_fns(calls, "abc", fail={"b": 2}), _policy(), ("t",), warmed)
    assert isinstance(out[1], RuntimeError) and "repetition 2" in str(out[1])
    assert out[0].reps == out[2].reps == 6
    assert calls.count("b") == 2 and warmed[1].reps == 2 and len(warmed[1].samples["t"]) == 2  # its samples stay


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _entry(timeout_s, spent_s=0.0, rep=None):
    from harness.interleave import Job, _Entry

    spec = SimpleNamespace(policy=_policy(timeout_s=timeout_s))
    return _Entry(Job(spec, Path("."), {}), {}, 0.0, point=SimpleNamespace(rep=rep), spent_s=spent_s)  # type: ignore


def test_timeout_covers_all_phases_of_a_point_together():
    """measure.timeout_s is one budget for the point: each phase gets what the earlier ones left."""
    from harness.interleave import _budget

    entry = _entry(timeout_s=0.3)
    with _budget(entry):
        _busy(0.2)  # prepare: within the budget
    done = []
    with pytest.raises(PointTimeout, match=r"^point exceeded measure\.timeout_s=0\.3 s$"):
        with _budget(entry):
            _busy(5.0)  # warm-up: only what is left, not a fresh 0.3 s
            done.append(True)
    assert not done and entry.spent_s < 5.0
    with pytest.raises(PointTimeout, match=r"measure\.timeout_s=0\.3"):
        with _budget(entry):
            done.append(True)  # nothing left: the next phase does not even start
    assert not done


def test_in_turns_each_point_spends_its_own_budget_not_the_groups():
    """The rounds limit each point by what its prepare and warm-up left of its own budget; the time a point
    waits while the others run their repetitions is not its own."""
    from harness.interleave import _budgeted_rep, _Expired

    calls: list[str] = []

    def rep(name: str, seconds: float):
        def run(i: int) -> dict[str, float]:
            calls.append(name)
            _busy(seconds)
            return {"t": 1.0 + 0.01 * (i % 3)}

        return run

    # a: 0.4 s left; its 20 reps take about 0.08 s (5x headroom for a loaded machine's preemptions)
    fast = _entry(timeout_s=1.0, spent_s=0.6, rep=rep("a", 0.004))
    slow = _entry(timeout_s=1.0, spent_s=0.5, rep=rep("b", 0.1))  # 0.5 s left: about five reps
    policy = _policy(max_reps=20)
    t0 = time.perf_counter()
    out = repeat_in_turns([_budgeted_rep(fast), _budgeted_rep(slow)], policy, ("t",), [Repetitions(), Repetitions()])
    wall = time.perf_counter() - t0
    assert isinstance(out[1], _Expired) and isinstance(out[1].timeout, PointTimeout)
    assert "measure.timeout_s=1" in str(out[1].timeout) and calls.count("b") <= 6
    assert isinstance(out[0], Repetitions) and out[0].reps == 20 and out[0].stop_reason == "max_reps"
    assert wall > 1.0 - 0.6 > fast.spent_s - 0.6  # the rounds outlasted a's budget; a's own reps did not
    assert _budgeted_rep(_entry(timeout_s=None, rep=fast.point.rep)) is fast.point.rep  # no limit: the bare rep


def test_interleaved_launcher_times_each_workload_in_turns(run_harness, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = run_harness(
        "run", "-m", "engine.name=eager,unranked-test,failing-test", "model=tiny", "model.weights=random",
        "workload.batch_size=1,2", *QUICK, "hydra/launcher=interleaved", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    df = load(sweep)
    assert len(df) == 6 and sorted(df.job) == list(range(6))  # one record per job, in its own job directory
    ok = df[df.status == "ok"]
    assert len(ok) == 4 and ok.timed_in_turns.eq(2).all()  # the failing engine's point left each group
    failed = df[df.status == "failed"]
    assert len(failed) == 2 and failed.error.str.contains("injected failure").all()
    for batch in (1, 2):
        group = ok[ok.batch_size == batch]
        assert group.n_reps.nunique() == 1  # timed in the same rounds
        records = [json.loads((sweep / str(j) / "record.json").read_text()) for j in group.job]
        keys = [set(r["timing"]["interleaved"]["group"]) for r in records]
        assert keys[0] == keys[1] == set(group.point_key)
        assert all("shared by the 2 points" in r["metrics"]["peak_memory_method"] for r in records)
        assert all(r["monitor"]["energy_j_per_token"] is None and r["monitor"]["shared"] for r in records)
        other = next(r for r in records if r["identity"]["engine"] != "eager")
        eager = next(r for r in records if r["identity"]["engine"] == "eager")
        vs = other["timing"]["interleaved"]["vs_eager"]
        assert vs["point_key"] == eager["point_key"] and "vs_eager" not in eager["timing"]["interleaved"]
        assert vs["tpot_ms"]["ci_low"] <= vs["tpot_ms"]["median"] <= vs["tpot_ms"]["ci_high"]
        assert vs["tpot_ms"]["n"] == other["timing"]["reps"]
    unranked = ok[ok.engine == "unranked-test"]
    assert unranked.paired_speedup_tpot.notna().all()  # recorded, though never ranked (not representative)
    assert "TPOT x eager 95% CI" not in out  # the only other engine here is not representative


def test_interleaved_launcher_resumes_and_refuses_isolation(run_harness, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "engine.name=eager", "model=tiny", "model.weights=random", "workload.batch_size=1",
            *QUICK, "hydra/launcher=interleaved", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert run_harness(*args) == 0
    first = load(sweep).started_at.tolist()
    began = json.loads((sweep / "sweep.json").read_text())["started_at"]
    assert run_harness(*args, "resume=true") == 0
    assert load(sweep).started_at.tolist() == first  # measured ok already: not measured again
    meta = json.loads((sweep / "sweep.json").read_text())
    assert meta["started_at"] == began and meta["resumed_at"] > began  # the sweep is dated by its first start
    capsys.readouterr()
    assert run_harness(*args[:-1], f"hydra.sweep.dir={tmp_path / 'isolated'}", "isolate=true") == 2
    assert "isolate: true cannot be combined with hydra/launcher=interleaved" in capsys.readouterr().err
    assert not (tmp_path / "isolated").exists()  # refused before the sweep folder plans points nothing runs


def _interrupt_in_round(monkeypatch, stop) -> None:
    """The timed repetitions of the interleaved launcher call ``stop()`` in the third round (both points of the
    first group have two samples each by then)."""
    from harness import interleave

    real, calls = interleave._budgeted_rep, []

    def counted(entry):
        rep = real(entry)

        def within(i: int):
            calls.append(i)
            if len(calls) == 5:
                stop()
            return rep(i)

        return within

    monkeypatch.setattr(interleave, "_budgeted_rep", counted)


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("stop", "code", "reason", "said"),
    [
        (_raise_keyboard_interrupt, 130, "interrupted (KeyboardInterrupt)", "harness: interrupted; "),
        (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "interrupted (SIGTERM)", "harness: terminated (SIGTERM); "),
    ],
)
def test_an_interrupted_group_records_each_of_its_points(run_harness, tmp_path, capsys, monkeypatch, stop, code,
                                                         reason, said):  # fmt: skip
    """Ctrl-C or SIGTERM while a group is timed in turns: every point of the group gets its failed record with
    the samples it took; the group not started has none (resume=true runs it)."""
    _interrupt_in_round(monkeypatch, stop)
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "engine.name=eager,unranked-test", "model=tiny", "model.weights=random", "model.n_layers=1",
            "workload.batch_size=1,2", *QUICK, "measure.max_time_s=0.3", "hydra/launcher=interleaved",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    before = signal.getsignal(signal.SIGTERM)
    assert run_harness(*args) == code
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handler is gone once it returns
    err = capsys.readouterr().err
    assert f"{said}records so far in {sweep.resolve()} (add resume=true" in err, err[-2000:]
    df = load(sweep)
    assert sorted(df.job) == [0, 2] and (df.batch_size == 1).all()  # the first group's points, in their folders
    assert df.status.eq("failed").all() and df.error.eq(reason).all(), df.error.tolist()
    for job in (0, 2):
        rec = json.loads((sweep / str(job) / "record.json").read_text())
        assert rec["timing"]["partial"] and len(rec["samples"]["tpot_ms"]) == 2  # two rounds before the stop


def test_a_group_stopped_while_preparing_records_the_points_not_set_up(tmp_path, compose_cfg, monkeypatch):
    """An interruption while the group's engines are built: the points not set up yet are recorded as
    interrupted too, and a point already settled (here skipped) keeps its own record."""
    from harness import interleave
    from harness.config import validate

    spec = validate(compose_cfg(*QUICK))
    jobs = [interleave.Job(spec, tmp_path / str(j), {"job": j}) for j in range(3)]

    def prepare(job):
        if job.sweep["job"] == 1:
            raise KeyboardInterrupt("SIGTERM")  # as the CLI's SIGTERM handler raises it
        entry = interleave._Entry(job, interleave.new_record(job.spec, job.sweep), time.time())
        entry.record["status"], entry.record["error"] = "skipped", "not on this device"
        return entry

    monkeypatch.setattr(interleave, "_prepare", prepare)
    with pytest.raises(KeyboardInterrupt):
        interleave.run_group(jobs)
    records = [json.loads((tmp_path / str(j) / "record.json").read_text()) for j in range(3)]
    assert [(r["status"], r["error"]) for r in records] == [
        ("skipped", "not on this device"), ("failed", "interrupted (SIGTERM)"), ("failed", "interrupted (SIGTERM)")
    ]


def test_jobs_that_share_a_folder_cannot_be_timed_in_turns(tmp_path, compose_cfg):
    """The launcher keeps one record per job folder (``RESULTS``): two jobs there would lose one's record."""
    from harness.config import ConfigError, validate
    from harness.interleave import Job, check

    spec = validate(compose_cfg(*QUICK))
    jobs = [Job(spec, tmp_path / "x", {"job": j}) for j in (0, 1)]
    with pytest.raises(ConfigError, match=r"^hydra\.sweep\.subdir: points 1 and 2 both resolve to .*hydra\.job\.num"):
        check(jobs)
    check([jobs[0], Job(spec, tmp_path / "y", {"job": 1})])


def test_paired_speedups_are_medians_of_per_round_ratios_and_lead_the_report():
    import numpy as np
    import pandas as pd

    from harness.interleave import paired_speedups
    from harness.report.data import prepare

    drift = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0])  # the machine's speed per round
    eager = Repetitions(samples={"tpot_ms": list(3.0 * drift), "ttft_ms": list(10.0 * drift)})
    fast = Repetitions(samples={"tpot_ms": list(2.0 * drift), "ttft_ms": list(5.0 * drift)})
    out = paired_speedups(eager, fast, 0.95)
    assert out["tpot_ms"]["median"] == pytest.approx(1.5) and out["ttft_ms"]["median"] == pytest.approx(2.0)
    assert out["tpot_ms"]["ci_low"] == pytest.approx(1.5) == out["tpot_ms"]["ci_high"]  # drift cancelled
    # rounds pair up by index: with a point that varies against the drift, the median of per-round ratios is not
    # the ratio of any re-ordering (sorted samples would pair the slow rounds of one with the fast of the other)
    uneven = np.array([1.0, 1.4, 1.1, 1.8, 1.2, 2.0, 1.05, 1.6, 1.3])
    wobble = np.array([1.2, 1.0, 1.2, 1.0, 1.2, 1.0, 1.2, 1.0, 1.2])
    base = Repetitions(samples={"tpot_ms": list(3.0 * uneven), "ttft_ms": list(10.0 * uneven)})
    odd = Repetitions(samples={"tpot_ms": list(2.0 * uneven * wobble), "ttft_ms": list(5.0 * uneven)})
    paired = paired_speedups(base, odd, 0.95)["tpot_ms"]["median"]
    assert paired == pytest.approx(1.25)  # 1.5 / 1.2 in five of the nine rounds
    e, o = np.array(base.samples["tpot_ms"]), np.array(odd.samples["tpot_ms"])
    assert np.median(np.sort(e) / np.sort(o)) == pytest.approx(1.346, abs=1e-3)  # what unpaired samples give
    row = dict(status="ok", engine="eager", variant="eager", model="tiny", batch_size=1, prompt_len=8, gen_len=4,
               decoding="greedy", num_beams=1, device="cpu", dtype="fp32", timing_representative=True,
               tpot_ms_p50=4.0, ttft_ms_p50=10.0, tpot_ms_ci_low=3.9, tpot_ms_ci_high=4.1, decode_tokens_per_s=250.0,
               paired_speedup_tpot=float("nan"), paired_speedup_ttft=float("nan"))  # fmt: skip
    other = {**row, "engine": "x", "variant": "x", "tpot_ms_p50": 2.0, "paired_speedup_tpot": 1.5,
             "paired_speedup_ttft": 2.0}  # fmt: skip
    view = prepare(pd.DataFrame([row, other])).set_index("variant")
    assert view.loc["x", "speedup_tpot"] == 1.5  # the paired median, not 4.0 / 2.0 from medians timed apart
    assert view.loc["eager", "speedup_tpot"] == 1.0
