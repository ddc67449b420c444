"""The report in a real browser: Playwright drives Debian's chromium headless (Playwright's own browser download
is not used). Skipped with the reason when chromium or Playwright is absent, except in CI (CI=true) where their
absence fails the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from report_records import EVIL, synthetic_sweep

from harness.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ALL_PLOTS_DRAWN = "() => [...document.querySelectorAll('.plot')].every(d => d.querySelector('.main-svg'))"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required in CI: .ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def open_report(browser, path: Path):
    """Open ``path`` from disk; returns the page, console/page errors and the URLs it requested."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_function(ALL_PLOTS_DRAWN, timeout=30_000)
    return page, errors, requests


def _plots(page) -> dict[str, int]:
    """Figure containers per section id, and how many hold a drawn plot."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.plot')].map(d => [d.closest('section').id,
              d.querySelectorAll('.main-svg').length > 0 && d.querySelectorAll('.trace, .hm, .bars').length > 0])"""
    )


def test_real_sweep_report_in_the_browser(report_sweep, browser, tmp_path):
    report = report_sweep.dir / "report.html"
    page, errors, requests = open_report(browser, report)
    assert errors == []
    assert requests == [report.as_uri()]  # self-contained: nothing else is fetched
    plots = _plots(page)
    assert len(plots) == page.locator("script.figure-data").count() >= 5
    assert all(drawn for _, drawn in plots), plots
    assert {"speedup", "ttft", "tpot", "throughput", "memory"} <= {sid for sid, _ in plots}

    failed = page.locator("#failed tbody tr")
    assert failed.count() == 2
    for i in range(2):
        cells = failed.nth(i).locator("td").all_inner_texts()
        assert cells[0] == "failed" and cells[1] == "failing-test"
        assert cells[4] == "RuntimeError: injected failure <in prepare>"
    best = page.locator("#summary tbody tr td:nth-child(3)").all_inner_texts()
    assert best == ["eager", "eager"]  # the unranked engine is listed beside, never chosen
    assert "unranked-test" in page.locator("#summary tbody").inner_text()

    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert report_sweep.malicious in page.locator("header").inner_text()  # shown literally, not executed

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    page.close()


def test_every_section_renders_when_the_records_carry_it(browser, tmp_path):
    report = write_report(synthetic_sweep(tmp_path / "sweep"))
    page, errors, _ = open_report(browser, report)
    assert errors == []
    plots = _plots(page)
    sections = [sid for sid, _ in plots]
    assert sections == [
        "speedup",
        "ttft",
        "tpot",
        "throughput",
        "memory",
        "weights",
        "quality",
        "utilization",
        "roofline",
        "profile",
    ]
    assert all(drawn for _, drawn in plots), plots
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert EVIL in page.locator("#failed").inner_text()
    # the Pareto front is drawn and its legend names it
    assert "Pareto front · tiny" in page.locator("#quality").inner_text()
    page.close()
