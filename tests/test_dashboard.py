"""`harness dashboard`: the site over a history (trends with CI bands, steps naming the commit, links to every
sweep's report, self-contained), also over the real measured one (slow), series split by environment, gate
verdicts, and bad input."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
from atomic_files import old_file, replaced_not_rewritten
from history_sweeps import BATCHES, SYNTHETIC_STEP, real_history, synthetic_history  # noqa: F401  (fixture)

from harness import history
from harness.records import write_record

FIGURE = re.compile(
    r'<script type="application/json" class="figure-data" data-target="(plot-\d+)">(.*?)</script>', re.S
)


def figures(text: str) -> dict[str, dict]:
    """Section id -> the figure drawn in it."""
    head = r'<section id="([^"]+)"><h2>[^<]*</h2>(?:<p[^>]*>[^<]*</p>)?<div class="plot" id="(plot-\d+)"'
    where = dict(re.findall(head, text))
    by_plot = {plot: json.loads(body) for plot, body in FIGURE.findall(text)}
    return {sid: by_plot[plot] for sid, plot in where.items()}


def lines(fig: dict) -> list[dict]:
    return [t for t in fig["data"] if t.get("mode") == "lines+markers"]


def _check_site(site, shas: list[str], first_bad: int, n_steps_metrics: set[str]) -> None:
    """The folder site of a history with two series (batch 1 and 2) and one regression at ``first_bad``."""
    text = (site / "index.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)  # self-contained: nothing fetched
    figs = figures(text)
    assert {"trend-tpot", "trend-ttft", "trend-throughput", "trend-memory", "latest"} <= set(figs)
    tpot = figs["trend-tpot"]
    assert len(lines(tpot)) == len(BATCHES) and all(len(t["x"]) == len(shas) for t in lines(tpot))
    assert tpot["layout"]["yaxis"]["type"] == "log" and tpot["layout"]["meta"]["kind"] == "trend"
    bands = [t for t in tpot["data"] if t.get("fill") == "toself"]
    assert len(bands) == len(BATCHES)  # the CI band of every series
    assert all(b["mode"] == "lines" for b in bands)  # a shaded area: no markers in the default colours
    marks = [t for t in tpot["data"] if t["name"].endswith(": steps")]
    assert len(marks) == len(BATCHES) and all(m["marker"]["color"] == ["#c62828"] for m in marks)

    bad, good = shas[first_bad][:10], shas[first_bad - 1][:10]
    steps = text[text.index('<section id="steps">') : text.index('<section id="gate">')]
    assert steps.count('<tr class="regression"') == len(BATCHES) * len(n_steps_metrics) and 'improvement"' not in steps
    assert steps.count(f">{bad} (") == steps.count(f">{good} (") == len(BATCHES) * len(n_steps_metrics)
    # every point links to its sweep's report, placed in the site (hard-linked) so the folder publishes as-is
    sweep_ids = {t for line in lines(tpot) for t in np.array(line["customdata"])[:, 1]}
    assert len(sweep_ids) == len(shas)
    urls = {u for line in lines(tpot) for u in np.array(line["customdata"])[:, 3]}
    assert urls == {f"reports/{s}.html" for s in sweep_ids}
    assert all((site / u).is_file() for u in urls)
    assert text.count('<a href="reports/') >= len(shas)


def test_dashboard_of_a_history(tmp_path, synthetic_point, run_harness, capsys):
    db = tmp_path / "h.sqlite"
    shas = synthetic_history(tmp_path / "sweeps", synthetic_point, db)
    site = tmp_path / "site"
    assert run_harness("dashboard", "--db", str(db), "-o", str(site)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{2 * len(BATCHES)} regression(s), 0 improvement(s) found", f"Dashboard: {site / 'index.html'}"]
    _check_site(site, shas, SYNTHETIC_STEP, {"tpot_ms", "ttft_ms"})
    fidelity = figures((site / "index.html").read_text()).get("trend-fidelity")
    assert fidelity is None  # no record carries quality


@pytest.mark.slow
def test_dashboard_of_the_real_history(real_history, run_harness, tmp_path, capsys):  # noqa: F811
    site = tmp_path / "site"
    assert run_harness("dashboard", "--db", str(real_history.db), "-o", str(site)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Dashboard: {site / 'index.html'}"
    _check_site(site, real_history.shas, real_history.first_slow, {"tpot_ms", "ttft_ms"})
    text = (site / "index.html").read_text()
    assert "trend-mbu" in figures(text)  # the real records carry the roofline
    assert "Not measured in any stored sweep." in text  # quality was disabled


def _sweep(directory, synthetic_point, env_id: str, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    ttft, tpot = scale * rng.uniform(5, 6, 10), scale * rng.uniform(1, 1.1, 10)
    synthetic_point(directory / "0", ttft=list(ttft), tpot=list(tpot), env_id=env_id)
    return directory


def test_environments_are_never_joined_and_gate_verdicts_are_shown(tmp_path, synthetic_point, run_harness, capsys):
    db = tmp_path / "h.sqlite"
    dirs = [_sweep(tmp_path / f"s{i}", synthetic_point, env, seed=i) for i, env in enumerate(["env-a", "env-b"] * 3)]
    assert run_harness("history", "add", *map(str, dirs), "--db", str(db)) == 0
    gate = tmp_path / "gate.json"
    slow = _sweep(tmp_path / "slow", synthetic_point, "env-a", scale=1.5, seed=9)
    assert run_harness("compare", str(dirs[0]), str(slow), "--json", str(gate)) == 1
    capsys.readouterr()

    page = tmp_path / "one.html"
    assert run_harness("dashboard", "--db", str(db), "-o", str(page)) == 0
    text = page.read_text()
    tpot = lines(figures(text)["trend-tpot"])
    assert len(tpot) == 2 and all(len(t["x"]) == 3 for t in tpot)  # one line per environment, never one line
    assert sorted(t["meta"]["series"].split("@")[1] for t in tpot) == ["env-a", "env-b"]
    assert all(" · env env-" in t["name"] for t in tpot)
    assert "No gate verdicts stored" in text

    assert run_harness("dashboard", "--db", str(db), "-o", str(page), "--gate", str(gate)) == 0
    text = page.read_text()
    gate_html = text[text.index('<section id="gate">') : text.index('<section id="trend-tpot">')]
    assert "REGRESSION: 1 of 1 points regressed" in gate_html and '<tr class="regression">' in gate_html
    assert "tpot_ms" in gate_html and "ttft_ms" in gate_html
    assert f"(from {gate}, given with --gate)" in gate_html and "stored )" not in gate_html
    # a hand-edited file whose sides are null (history add checks headline and rows only): shown, not a crash
    doc = json.loads(gate.read_text())
    gate.write_text(json.dumps({**doc, "base": None, "cand": None}))
    assert run_harness("dashboard", "--db", str(db), "-o", str(page), "--gate", str(gate)) == 0
    assert "BASE ? vs CAND ?" in page.read_text()


def test_dashboard_page_is_replaced_atomically(tmp_path, synthetic_point, run_harness, capsys):
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", str(_sweep(tmp_path / "s0", synthetic_point, "env-a")), "--db", str(db)) == 0
    page = tmp_path / "site" / "one.html"
    before = old_file(page, tmp_path / "before")
    assert run_harness("dashboard", "--db", str(db), "-o", str(page)) == 0
    replaced_not_rewritten(page, before)
    assert "trend-tpot" in page.read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, run_harness, capsys):
    empty = tmp_path / "empty.sqlite"
    history.connect(empty).close()
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--db", str(tmp_path / "none.sqlite")], "no history database"),
        (["--db", str(empty)], "no sweep stored"),
        (["--db", str(empty), "-o", str(afile)], "is a file"),
        (["--db", str(empty), "--gate", str(afile)], "no sweep stored"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]
    for args, message in cases:
        assert run_harness("dashboard", *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("harness dashboard: error: ") and message in err, err


def test_a_newest_sweep_without_measured_points_is_named(tmp_path, synthetic_point, run_harness, capsys):
    """The "newest sweep" chart can only draw ok points: a later sweep whose points all failed is named under it
    rather than passed over in silence."""
    db = tmp_path / "h.sqlite"
    synthetic_point(tmp_path / "ok" / "0", ttft=[5.0] * 6, tpot=[1.0] * 6)
    failed = synthetic_point(tmp_path / "failed" / "0", batch_size=2, status="failed", error="boom")
    write_record(tmp_path / "failed" / "0", {**failed, "started_at": "2026-11-24T12:00:00+00:00"})
    assert run_harness("history", "add", str(tmp_path / "ok"), str(tmp_path / "failed"), "--db", str(db)) == 0
    out = tmp_path / "site"
    assert run_harness("dashboard", "--db", str(db), "-o", str(out)) == 0
    page = (out / "index.html").read_text()
    assert "Newest sweep with measured points" in page
    assert re.search(r"The 1 sweep\(s\) stored after \w+ have no measured \(ok\) point: \w+\.", page)


def test_only_failed_points_is_a_clear_error(tmp_path, synthetic_point, run_harness, capsys):
    synthetic_point(tmp_path / "s" / "0", status="failed", error="boom")
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", str(tmp_path / "s"), "--db", str(db)) == 0
    assert run_harness("dashboard", "--db", str(db), "-o", str(tmp_path / "site")) == 2
    assert "no measured (ok) point in 1 stored sweep(s)" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM points").fetchone()[0] == "failed"


def test_dashboard_over_a_results_root_stores_its_sweeps_first(tmp_path, synthetic_point, run_harness, capsys):
    """`harness dashboard ROOT`: every sweep (and single run) below ROOT goes into --db as `history add` would
    store it, then the site is built; a sweep that cannot be stored is named and left out."""
    root, db, site = tmp_path / "results", tmp_path / "h.sqlite", tmp_path / "site"
    for i in range(2):
        _sweep(root / "sweeps" / f"s{i}", synthetic_point, "env-a", seed=i)
    assert run_harness("dashboard", str(root), "--db", str(db), "-o", str(site)) == 0
    out = capsys.readouterr().out
    assert f"History {db}: 2 sweep(s) added, 0 already stored, 0 not stored" in out and (site / "index.html").is_file()
    broken = root / "sweeps" / "s9" / "0"
    broken.mkdir(parents=True)
    (broken / "record.json").write_text("{cut")
    assert run_harness("dashboard", str(root), "--db", str(db), "-o", str(site)) == 0
    io = capsys.readouterr()
    assert "1 sweep(s) added" not in io.out and "0 sweep(s) added, 2 already stored, 1 not stored" in io.out
    assert "harness dashboard: warning: not stored: " in io.err and "s9" in io.err
    assert run_harness("dashboard", str(tmp_path / "nope"), "--db", str(db)) == 2
    assert capsys.readouterr().err.strip().endswith("nope: no such directory")
