"""The history database and `harness history`: a real measured history (30 sweeps, slow) whose step detection
must name the injected commit and no other; idempotent adds that keep raw samples; one transaction per sweep;
missing, empty, corrupted and partial sweeps refused by name with exit status 2."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from history_sweeps import BATCHES, N_COMMITS, SLOWDOWN, real_history  # noqa: F401  (fixture)

from harness import history
from harness.dashboard.data import find_steps, history_frame
from harness.progress import write_sweep_meta
from harness.records import RECORD_NAME, point_key, write_record


def _read(db):
    conn = history.connect(db, create=False)
    try:
        return history.sweeps(conn), history.points(conn)
    finally:
        conn.close()


@pytest.mark.slow
def test_real_history_names_the_injected_commit_and_no_other(real_history):  # noqa: F811
    sweeps, points = _read(real_history.db)
    assert len(sweeps) == N_COMMITS >= 30
    assert list(sweeps["git_sha"]) == real_history.shas  # the records carry the measured checkout's commit
    assert sweeps["report"].map(lambda p: p.endswith("report.html")).all()
    assert points["samples.tpot_ms"].map(len).min() >= 10  # raw samples kept
    data = history_frame(points)
    assert data["series"].nunique() == len(BATCHES)

    steps = find_steps(data)
    good, bad = real_history.shas[real_history.first_slow - 1], real_history.shas[real_history.first_slow]
    shown = steps[["metric", "series_label", "kind", "change", "p_value", "first_bad_sha"]].to_string()
    assert set(steps["first_bad_sha"]) == {bad}, shown
    assert set(steps["last_good_sha"]) == {good}, shown
    assert steps["kind"].eq("regression").all(), shown
    assert set(steps["metric"]) <= {"tpot_ms", "ttft_ms"}, shown
    tpot = steps[steps["metric"].eq("tpot_ms")]
    assert len(tpot) == len(BATCHES), shown  # found in every series
    # the change is at least most of the injected extra work (+200% of every forward; the work also slows the
    # forward itself a little, through the caches it evicts)
    assert tpot["change"].between(SLOWDOWN * 0.75, SLOWDOWN * 2).all(), shown
    assert (tpot["p_value"] < 1e-3).all() and (tpot["n_before"] == real_history.first_slow).all()


def _sweep(directory, synthetic_point, n=2, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    for b in range(n):
        synthetic_point(
            directory / str(b), ttft=list(scale * rng.uniform(5, 6, 10)), tpot=list(scale * rng.uniform(1, 1.1, 10)),
            batch_size=b + 1, seed=0,
        )  # fmt: skip
    return directory


def _counts(db):
    with sqlite3.connect(db) as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sweeps", "points", "gates"))


def test_add_twice_changes_nothing_and_raw_samples_are_kept(tmp_path, synthetic_point, run_harness, capsys):
    sweep = _sweep(tmp_path / "sweep", synthetic_point)
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    out = capsys.readouterr().out
    assert out.startswith("added: sweep ") and "2/2 ok points" in out
    before = _counts(db)
    copy = shutil.copytree(sweep, tmp_path / "elsewhere" / "copy")  # the same sweep from another place
    assert run_harness("history", "add", str(sweep), str(copy), "--db", str(db)) == 0
    assert capsys.readouterr().out.count("unchanged (already stored)") == 2
    assert _counts(db) == before == (1, 2, 0)

    sweeps, points = _read(db)
    rec = json.loads((sweep / "0" / RECORD_NAME).read_text())
    row = points[points["point_key"].eq(rec["point_key"])].iloc[0]
    assert row["samples.tpot_ms"] == rec["samples"]["tpot_ms"] and row["samples.ttft_ms"] == rec["samples"]["ttft_ms"]
    conn = history.connect(db)
    stored = history.record(conn, sweeps["id"][0], "0/record.json")
    conn.close()
    assert stored["samples"] == rec["samples"] and stored["summary"] == rec["summary"]
    assert sweeps["git_sha"][0] == "0123abc" and sweeps["fingerprint"][0] == "env-a"
    assert sweeps["started_at"][0] == "2026-11-23T12:00:00+00:00"


def _corrupt(d, synthetic_point):
    _sweep(d, synthetic_point)
    (d / "1" / RECORD_NAME).write_text('{"schema_version": 1, "status": "ok", "samp')
    return d / "1" / RECORD_NAME


def _partial(d, synthetic_point):
    _sweep(d, synthetic_point, n=1)
    keys = [json.loads((d / "0" / RECORD_NAME).read_text())["point_key"], point_key({"planned": "never measured"})]
    write_sweep_meta(d, {"started_at": "2026-11-23T12:00:00+00:00", "points": [["a=1"], ["a=2"]], "point_keys": keys})
    return "job 1: a=2"


def _no_samples(d, synthetic_point):
    _sweep(d, synthetic_point)
    rec = json.loads((d / "0" / RECORD_NAME).read_text())
    del rec["samples"]
    (d / "0" / RECORD_NAME).write_text(json.dumps(rec))
    return "status ok but no raw samples"


BAD = {
    "missing": (lambda d, sp: "no such directory", "no such directory"),
    "empty": (lambda d, sp: d.mkdir() or "empty", "empty: no record.json found"),
    "corrupted": (_corrupt, "corrupted sweep, nothing stored"),
    "partial": (_partial, "partial sweep, nothing stored: 1 point(s) planned"),
    "no samples": (_no_samples, "corrupted sweep, nothing stored"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_directory_is_one_line_exit_2_and_nothing_stored(kind, tmp_path, synthetic_point, run_harness, capsys):
    make, message = BAD[kind]
    bad = tmp_path / "bad"
    detail = make(bad, synthetic_point)
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", str(bad), "--db", str(db)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"harness history add: error: {bad}: {message}"), err
    assert str(detail) in err
    assert not db.exists()  # nothing was stored, not even an empty database

    good = _sweep(tmp_path / "good", synthetic_point, seed=1)
    assert run_harness("history", "add", str(bad), str(good), "--db", str(db)) == 2  # the good one is still added
    io = capsys.readouterr()
    assert io.err.count("\n") == 1 and "added: sweep" in io.out
    assert _counts(db) == (1, 2, 0)


def test_one_transaction_per_sweep(tmp_path, synthetic_point, monkeypatch):
    sweep = history.read_sweep(_sweep(tmp_path / "sweep", synthetic_point))
    conn = history.connect(tmp_path / "h.sqlite")
    calls = []

    def flaky(record):
        calls.append(1)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return {"point_key": record["point_key"]}

    monkeypatch.setattr(history, "flatten", flaky)
    with pytest.raises(sqlite3.OperationalError):
        history.add(conn, sweep)
    assert conn.execute("SELECT count(*) FROM sweeps").fetchone()[0] == 0  # the first point went too
    assert conn.execute("SELECT count(*) FROM points").fetchone()[0] == 0
    conn.close()


def test_list_and_database_errors(tmp_path, synthetic_point, run_harness, capsys):
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "list", "--db", str(db)) == 2
    assert "no history database" in capsys.readouterr().err
    for i in range(2):
        run_harness("history", "add", str(_sweep(tmp_path / f"s{i}", synthetic_point, seed=i)), "--db", str(db))
    capsys.readouterr()
    assert run_harness("history", "list", "--db", str(db)) == 0
    out = capsys.readouterr().out
    assert "0123abc" in out and out.rstrip().endswith(f"2 sweep(s) in {db}")
    assert run_harness("history", "list", "--db", str(db), "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    single = tmp_path / "single-run"  # no sweep.json: no command; its field is null, never NaN (not JSON)
    synthetic_point(single, ttft=[5.0] * 3, tpot=[1.0] * 3)
    assert run_harness("history", "add", str(single), "--db", str(db)) == 0
    capsys.readouterr()
    assert run_harness("history", "list", "--db", str(db), "--json") == 0

    def no_nan(name):
        raise AssertionError(f"{name} in JSON output")

    listed = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    assert len(listed) == 3 and any(r["command"] is None for r in listed)

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    newer = tmp_path / "newer.sqlite"
    history.connect(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    cases = {garbage: "not a history database", newer: "schema_version 99 is newer", tmp_path: "is a directory"}
    for path, message in cases.items():
        assert run_harness("history", "add", str(tmp_path / "s0"), "--db", str(path)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert run_harness("history", "add", "--db", str(db)) == 2
    assert "give at least one sweep" in capsys.readouterr().err
    assert run_harness("history", "remove") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_gate_verdicts_are_stored(tmp_path, synthetic_point, run_harness, capsys):
    base, cand = _sweep(tmp_path / "base", synthetic_point), _sweep(tmp_path / "cand", synthetic_point, 2, 1, 1.5)
    gate = tmp_path / "gate.json"
    assert run_harness("compare", str(base), str(cand), "--json", str(gate)) == 1
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", str(cand), "--gate", str(gate), "--db", str(db)) == 0
    assert f"added: gate verdicts {gate}" in capsys.readouterr().out
    conn = history.connect(db)
    doc = history.latest_gate(conn)
    conn.close()
    assert doc["verdict"] == "regression" and doc["_source"] == str(gate.resolve())
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert run_harness("history", "add", "--gate", str(bad), "--db", str(db)) == 2
    assert "not the JSON of `harness compare --json`" in capsys.readouterr().err


def _resumable(d, synthetic_point, started="2026-11-23T12:00:00+00:00"):
    """A sweep of two points, batch 1 measured ok and batch 2 failed, with its sweep.json (plan and start)."""
    ok = synthetic_point(d / "0", ttft=[5.0, 5.1, 5.2], tpot=[1.0, 1.1, 1.2], batch_size=1)
    failed = synthetic_point(d / "1", batch_size=2, status="failed", error="boom")
    keys = [ok["point_key"], failed["point_key"]]
    write_sweep_meta(d, {"started_at": started, "points": [["b=1"], ["b=2"]], "point_keys": keys, "total": 2})
    return keys


def _resume(d, synthetic_point, started="2026-11-24T08:00:00+00:00"):
    """What `resume=true` does to it: the failed record rewritten as measured, sweep.json's start rewritten."""
    synthetic_point(d / "1", ttft=[6.0, 6.1, 6.2], tpot=[2.0, 2.1, 2.2], batch_size=2)
    meta = json.loads((d / "sweep.json").read_text())
    write_sweep_meta(d, {**meta, "started_at": started})


def test_a_resumed_sweep_replaces_its_earlier_state_each_record_stored_once(
    tmp_path, synthetic_point, run_harness, capsys
):
    sweep, db = tmp_path / "sweep", tmp_path / "h.sqlite"
    keys = _resumable(sweep, synthetic_point)
    before = shutil.copytree(sweep, tmp_path / "before-resume")
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    old_id = _read(db)[0].id[0]
    capsys.readouterr()

    _resume(sweep, synthetic_point)
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    out = capsys.readouterr().out
    assert f"replaced: sweep {old_id} (from {sweep.resolve()})" in out and "each record is stored once" in out, out
    assert "added: sweep " in out and "2/2 ok points" in out
    assert _counts(db) == (1, 2, 0)
    sweeps, points = _read(db)
    assert sweeps.id[0] != old_id and sweeps.started_at[0] == "2026-11-24T08:00:00+00:00"
    assert sorted(points.point_key) == sorted(keys) and points.status.eq("ok").all()
    data = history_frame(points)
    assert len(data) == 2 and data.groupby("series").size().eq(1).all()  # the unchanged ok record shown once

    # the resumed sweep again, and a copy of its earlier state (added after it): nothing changes
    assert run_harness("history", "add", str(sweep), str(before), "--db", str(db)) == 0
    assert capsys.readouterr().out.count("unchanged (already stored)") == 2
    assert _counts(db) == (1, 2, 0)


def test_a_sweep_is_added_by_a_relative_path_or_through_a_link(tmp_path, synthetic_point, run_harness, capsys,
                                                              monkeypatch):  # fmt: skip
    """`harness history add results/sweeps/*`, as the README writes it: relative, and a symlink to a sweep."""
    _sweep(tmp_path / "real", synthetic_point)
    write_sweep_meta(tmp_path / "real", {"started_at": "2026-11-23T12:00:00+00:00", "total": 2})
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert run_harness("history", "add", "real", "--db", "h.sqlite") == 0
    assert run_harness("history", "add", "link", "--db", "h2.sqlite") == 0
    assert "2/2 ok points" in capsys.readouterr().out
    assert _counts(tmp_path / "h.sqlite")[:2] == _counts(tmp_path / "h2.sqlite")[:2] == (1, 2)


def test_a_resume_that_rewrote_every_record_replaces_only_the_state_it_resumed(
    tmp_path, synthetic_point, run_harness, capsys
):
    """CI measures one folder afresh for each commit and adds it; a retry with resume=true that re-measured every
    point (all had failed) shares no record with what it resumes: it replaces the newest sweep stored from that
    folder before it, not the earlier commits' sweeps."""
    sweep, db = tmp_path / "ci", tmp_path / "h.sqlite"

    def measure(started, status, resume=False):
        for b in (1, 2):
            rec = synthetic_point(sweep / str(b - 1), ttft=[5.0 * b] * 3, tpot=[1.0 * b] * 3, batch_size=b,
                                  status=status, error=None if status == "ok" else "boom")  # fmt: skip
            write_record(sweep / str(b - 1), {**rec, "started_at": started, "config": {"resume": resume}})
        write_sweep_meta(sweep, {"started_at": started, "total": 2})
        assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0

    measure("2026-11-20T12:00:00+00:00", "ok")
    first = _read(db)[0].id.tolist()
    shutil.rmtree(sweep)
    measure("2026-11-21T12:00:00+00:00", "failed")
    failed = [i for i in _read(db)[0].id if i not in first]
    capsys.readouterr()
    measure("2026-11-21T13:00:00+00:00", "ok", resume=True)
    out = capsys.readouterr().out
    assert f"replaced: sweep {failed[0]}" in out and f"replaced: sweep {first[0]}" not in out, out
    sweeps, points = _read(db)
    assert first[0] in sweeps.id.tolist() and len(sweeps) == 2 and len(points) == 4


def test_a_later_state_replaces_only_the_points_it_holds_again(tmp_path, synthetic_point, run_harness, capsys):
    sweep, db = tmp_path / "sweep", tmp_path / "h.sqlite"
    _resumable(sweep, synthetic_point)
    synthetic_point(sweep / "2", ttft=[7.0] * 3, tpot=[3.0] * 3, batch_size=4)  # stored, then gone from the copy
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    later = shutil.copytree(sweep, tmp_path / "later", ignore=shutil.ignore_patterns("2"))
    _resume(later, synthetic_point)
    capsys.readouterr()
    assert run_harness("history", "add", str(later), "--db", str(db)) == 0
    assert "replaced: 2 of the 3 points of sweep" in capsys.readouterr().out
    sweeps, points = _read(db)
    assert points.point_key.nunique() == len(points) == 3  # nothing dropped, nothing twice
    assert sorted(sweeps.n_points) == [1, 2] and points.status.eq("ok").all()


def test_a_directory_measured_again_from_scratch_is_a_new_sweep(tmp_path, synthetic_point, run_harness, capsys):
    """A reused hydra.sweep.dir without resume: the same path, no record in common, both kept (nothing dropped)."""
    sweep, db = tmp_path / "sweep", tmp_path / "h.sqlite"
    _sweep(sweep, synthetic_point, seed=0)
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    shutil.rmtree(sweep)
    _sweep(sweep, synthetic_point, seed=0, scale=1.5)
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    assert "replaced" not in capsys.readouterr().out
    assert _counts(db) == (2, 4, 0)


def test_a_folder_of_sweeps_is_refused_naming_them(tmp_path, synthetic_point, run_harness, capsys):
    parent, db = tmp_path / "sweeps", tmp_path / "h.sqlite"
    for i, name in enumerate(("a", "b")):
        _sweep(parent / name, synthetic_point, seed=i)
        write_sweep_meta(parent / name, {"started_at": f"2026-11-2{i + 3}T12:00:00+00:00"})
    assert run_harness("history", "add", str(parent), "--db", str(db)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"harness history add: error: {parent}: holds 2 sweep(s)"), err
    assert err.rstrip().endswith(f"on its own: harness history add {parent / 'a'} {parent / 'b'}")
    assert not db.exists()
    assert run_harness("history", "add", str(parent / "a"), str(parent / "b"), "--db", str(db)) == 0
    assert _counts(db) == (2, 4, 0)


def _ci_sweep(sweep, synthetic_point, sha, started, meta=None, scale=1.0):
    """What CI writes into its one folder for a commit: every point measured afresh, with resume=true."""
    shutil.rmtree(sweep, ignore_errors=True)
    for b in (1, 2):
        rec = synthetic_point(sweep / str(b - 1), ttft=[5.0 * b * scale] * 3, tpot=[1.0 * b * scale] * 3,
                              batch_size=b)  # fmt: skip
        rec["env"]["git"]["sha"] = sha
        write_record(sweep / str(b - 1), {**rec, "started_at": started, "config": {"resume": True}})
    write_sweep_meta(sweep, {"started_at": started, "total": 2, **(meta or {})})


def test_resume_true_in_ci_never_replaces_another_commits_sweep(tmp_path, synthetic_point, run_harness, capsys):
    """One folder, three commits, each measured afresh with resume=true (nothing to resume): three sweeps."""
    sweep, db = tmp_path / "ci", tmp_path / "h.sqlite"
    for i in range(3):
        _ci_sweep(sweep, synthetic_point, f"{i:040d}", f"2026-11-2{i}T12:00:00+00:00", scale=1 + i / 10)
        assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    assert "replaced" not in capsys.readouterr().out
    sweeps, points = _read(db)
    assert sweeps.git_sha.tolist() == [f"{i:040d}" for i in range(3)] and len(points) == 6


def test_a_true_resume_replaces_the_state_it_resumed_even_without_a_commit(tmp_path, synthetic_point, run_harness,
                                                                           capsys):  # fmt: skip
    """Not a git checkout (no SHA): a resume is known by sweep.json's resumed_at and its unchanged start; a sweep
    measured afresh with resume=true (a new start, no resumed_at) replaces nothing."""
    sweep, db = tmp_path / "ci", tmp_path / "h.sqlite"
    _ci_sweep(sweep, synthetic_point, None, "2026-11-20T12:00:00+00:00")
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    first = _read(db)[0].id.tolist()
    _ci_sweep(sweep, synthetic_point, None, "2026-11-21T12:00:00+00:00", scale=1.2)
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    assert len(_read(db)[0]) == 2 and "replaced" not in capsys.readouterr().out
    second = [i for i in _read(db)[0].id if i not in first]
    resumed = {"resumed_at": "2026-11-21T13:00:00+00:00"}
    _ci_sweep(sweep, synthetic_point, None, "2026-11-21T12:00:00+00:00", resumed, scale=1.3)
    assert run_harness("history", "add", str(sweep), "--db", str(db)) == 0
    out = capsys.readouterr().out
    assert f"replaced: sweep {second[0]}" in out and first[0] not in out
    sweeps = _read(db)[0]
    assert len(sweeps) == 2 and first[0] in sweeps.id.tolist()
