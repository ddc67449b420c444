"""The dashboard in a real browser (Playwright and Debian's chromium, as the report's browser test), over a
32-sweep history and over the real measured one (slow): no console errors, every chart drawn, a filter changes
what is shown, every sweep's report is linked; screenshots are saved in the test's temporary directory."""

from __future__ import annotations

import pytest
from history_sweeps import BATCHES, real_history, synthetic_history  # noqa: F401  (fixture)
from test_report_browser import browser, open_report  # noqa: F401  (fixture)

from harness.dashboard import write_dashboard

VISIBLE_LINES = """id => document.getElementById(id).querySelector('.plot').data
    .filter(t => t.mode === 'lines+markers' && t.visible !== false).map(t => t.meta.batch)"""
DRAWN_TRACES = "id => document.getElementById(id).querySelectorAll('.scatterlayer .trace').length"


def check_in_browser(browser, out, steps, n_sweeps: int, tmp_path) -> None:  # noqa: F811
    page, errors, requests = open_report(browser, out)
    assert errors == []
    assert requests == [out.as_uri()]  # self-contained: nothing else is fetched
    drawn = page.evaluate(
        "() => [...document.querySelectorAll('.plot')].map(d => [d.closest('section').id, "
        "d.querySelectorAll('.main-svg').length > 0 && d.querySelectorAll('.trace').length > 0])"
    )
    assert all(ok for _, ok in drawn) and len(drawn) >= 5, drawn
    trends = [sid for sid, _ in drawn if sid.startswith("trend-")]
    assert {"trend-tpot", "trend-ttft", "trend-throughput", "trend-memory"} <= set(trends)
    for sid in trends:
        assert sorted(page.evaluate(VISIBLE_LINES, sid)) == sorted(map(str, BATCHES))
    before = page.evaluate(DRAWN_TRACES, "trend-tpot")
    rows = page.locator("#steps tbody tr")
    assert rows.count() == len(steps) >= len(BATCHES)
    assert page.locator("#filter-count").inner_text() == f"{len(BATCHES)} of {len(BATCHES)} series shown"
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)

    page.select_option("#filter-batch", "2")  # one batch size: the other series leave every chart and table
    assert page.evaluate(VISIBLE_LINES, "trend-tpot") == ["2"]
    assert page.evaluate(VISIBLE_LINES, "trend-memory") == ["2"]
    assert page.evaluate(DRAWN_TRACES, "trend-tpot") < before
    assert page.locator("#filter-count").inner_text() == f"1 of {len(BATCHES)} series shown"
    visible = [rows.nth(i).is_visible() for i in range(rows.count())]
    assert 0 < sum(visible) < len(visible)
    assert all("b2" in rows.nth(i).inner_text() for i, v in enumerate(visible) if v)
    page.select_option("#filter-batch", "")
    assert page.evaluate(DRAWN_TRACES, "trend-tpot") == before

    links = page.locator("#sweeps a[href^='reports/']")
    assert links.count() == n_sweeps
    assert (out.parent / links.first.get_attribute("href")).is_file()
    assert errors == []
    filtered = tmp_path / "dashboard-filtered.png"
    page.select_option("#filter-batch", "1")
    page.screenshot(path=str(filtered), full_page=True)
    for png in (shot, filtered):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    page.close()


def test_dashboard_in_the_browser(browser, synthetic_point, tmp_path):  # noqa: F811
    shas = synthetic_history(tmp_path / "sweeps", synthetic_point, tmp_path / "h.sqlite")
    out, steps = write_dashboard(tmp_path / "h.sqlite", tmp_path / "site")
    check_in_browser(browser, out, steps, len(shas), tmp_path)


@pytest.mark.slow
def test_real_history_dashboard_in_the_browser(real_history, browser, tmp_path):  # noqa: F811
    out, steps = write_dashboard(real_history.db, tmp_path / "site")
    check_in_browser(browser, out, steps, len(real_history.shas), tmp_path)


def test_regressions_are_coloured_in_the_verdict_and_step_columns(browser, synthetic_point, run_harness, tmp_path):  # noqa: F811
    """The steps table's second column is the step kind, the gate table's first is the verdict: each table colours
    its own, not the point named beside it."""
    from test_dashboard import _sweep

    shas = synthetic_history(tmp_path / "sweeps", synthetic_point, tmp_path / "h.sqlite")
    gate = tmp_path / "gate.json"
    base, slow = _sweep(tmp_path / "base", synthetic_point, "env-a"), _sweep(tmp_path / "slow", synthetic_point,
                                                                             "env-a", scale=1.5, seed=9)  # fmt: skip
    assert run_harness("compare", str(base), str(slow), "--json", str(gate)) == 1
    out, _ = write_dashboard(tmp_path / "h.sqlite", tmp_path / "site", gate=gate)
    page, errors, _ = open_report(browser, out)
    color = "(sel) => getComputedStyle(document.querySelector(sel)).color"
    red = "rgb(198, 40, 40)"
    assert page.evaluate(color, "#gate tr.regression td:nth-child(1)") == red
    assert page.evaluate(color, "#gate tr.regression td:nth-child(2)") != red
    assert page.evaluate(color, "#steps tr.regression td:nth-child(2)") == red
    assert page.evaluate(color, "#steps tr.regression td:nth-child(1)") != red
    assert errors == [] and len(shas) > 0
    page.close()


def test_marks_of_failures_environments_and_quality_inputs_draw(browser, synthetic_point, run_harness, tmp_path):  # noqa: F811
    """A history with an oom sweep, a second environment, a lone point and fidelity on other inputs: every chart
    draws without console errors, with the ✕ of the oom sweep and the new environment's line and label."""
    from test_dashboard_marks import _history

    def point(i):
        env = {"env_id": "env-a" if i < 4 else "env-b", "quality": {"top1_agreement": 0.99, "kl": 0.01}}
        return {**env, "status": "oom", "error": "out of memory"} if i == 2 else env

    def inputs(i, rec):
        if rec["status"] == "ok":
            rec["quality"]["inputs_id"] = "inputs-a" if i < 3 else "inputs-b"
        return rec

    db = _history(tmp_path, synthetic_point, run_harness, 5, point, inputs)  # env-b: one sweep, a lone point
    out, _ = write_dashboard(db, tmp_path / "site")
    page, errors, _ = open_report(browser, out)
    assert errors == []
    traces = "id => [...document.getElementById(id).querySelector('.plot').data].map(t => t.name)"
    names = page.evaluate(traces, "trend-tpot")
    assert sum(n.endswith(": not measured") for n in names) == 1
    assert page.locator("#trend-tpot .errorbar").count() >= 1  # the lone env-b point's CI
    assert page.locator("#trend-tpot .shapelayer path").count() >= 1
    fidelity = page.evaluate(traces, "trend-fidelity")  # env-a scored other inputs from sweep 3: two lines
    assert fidelity.count("eager · tiny · b1 · env env-a") == 2 and page.evaluate(traces, "trend-tpot").count(
        "eager · tiny · b1 · env env-a") == 1  # fmt: skip
    assert "env env-b" in page.locator("#trend-tpot .annotation").all_text_contents()
    assert errors == []
    page.close()
