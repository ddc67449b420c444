"""What the dashboard's trend traces claim: CI bands are shaded areas only, titles promise a CI only where one is
drawn, "timing not representative" marks timings only, intervals of few samples say their coverage, and a
failed sweep does not rename the measured series."""

from __future__ import annotations

import json

import numpy as np
from test_dashboard import figures, lines

from harness.records import write_record
from harness.report.figures import NOT_REPR


def _history(tmp_path, synthetic_point, run_harness, n_sweeps=3, **point):
    """``n_sweeps`` sweeps of one point, a day apart, added to a history; returns its database."""
    dirs = []
    for i in range(n_sweeps):
        d = tmp_path / f"s{i}"
        rng = np.random.default_rng(i)
        rec = synthetic_point(d / "0", ttft=list(rng.uniform(5, 6, 3)), tpot=list(rng.uniform(1, 1.1, 3)), **point)
        write_record(d / "0", {**rec, "started_at": f"2026-11-{20 + i}T12:00:00+00:00"})
        dirs.append(d)
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", *map(str, dirs), "--db", str(db)) == 0
    return db


def _page(tmp_path, db, run_harness) -> str:
    out = tmp_path / "site.html"
    assert run_harness("dashboard", "--db", str(db), "-o", str(out)) == 0
    return out.read_text()


def test_ci_bands_are_areas_without_markers_and_name_their_coverage(tmp_path, synthetic_point, run_harness, capsys):
    figs = figures(_page(tmp_path, _history(tmp_path, synthetic_point, run_harness), run_harness))
    for sid in ("trend-tpot", "trend-ttft", "trend-throughput"):
        bands = [t for t in figs[sid]["data"] if t.get("fill") == "toself"]
        assert len(bands) == 1 and bands[0]["mode"] == "lines", sid  # plotly's default would add markers
    (line,) = lines(figs["trend-tpot"])
    ci_text = [row[2] for row in line["customdata"]]
    # 3 samples: the interval is their range, which holds the median with probability 75%, not 95%
    assert all(t.endswith("(75% CI: the range of n=3)") for t in ci_text), ci_text
    assert "<br>CI %{customdata[2]}<br>" in line["hovertemplate"]


def test_titles_and_suffixes_claim_only_what_the_chart_shows(tmp_path, synthetic_point, run_harness, capsys):
    """Memory and fidelity have no band, and an engine's unrepresentative timing says nothing of its memory."""
    quality = {"top1_agreement": 0.99, "kl": 0.01}
    db = _history(tmp_path, synthetic_point, run_harness, caveat="interpreted kernels", quality=quality)
    page = _page(tmp_path, db, run_harness)
    figs = figures(page)
    for sid in ("trend-memory", "trend-fidelity"):
        assert "CI" not in figs[sid]["layout"]["title"]["text"], sid
        assert all(NOT_REPR not in t["name"] for t in figs[sid]["data"]), sid
    assert "95% CI of the median" in figs["trend-tpot"]["layout"]["title"]["text"]
    assert all(t["name"].endswith(f"({NOT_REPR})") for t in lines(figs["trend-tpot"]))
    assert "peak memory (MiB)" == figs["trend-memory"]["layout"]["yaxis"]["title"]["text"]
    memory = page[page.index('<section id="trend-memory">') :]
    memory = memory[: memory.index("</section>")]
    assert "whole-process peak RSS" in memory and "torch.cuda.max_memory_allocated" in memory


def test_a_failed_sweep_does_not_rename_the_measured_series(tmp_path, synthetic_point, run_harness, capsys):
    """A later sweep whose points failed on another workload (gen 8) adds no 'gen 4' tag to the measured ones."""
    db = tmp_path / "h.sqlite"
    synthetic_point(tmp_path / "ok" / "0", ttft=[5.0] * 6, tpot=[1.0] * 6)
    failed = synthetic_point(tmp_path / "failed" / "0", status="failed", error="boom", gaps_per_rep=7)
    write_record(tmp_path / "failed" / "0", {**failed, "started_at": "2026-11-24T12:00:00+00:00"})
    assert run_harness("history", "add", str(tmp_path / "ok"), str(tmp_path / "failed"), "--db", str(db)) == 0
    figs = figures(_page(tmp_path, db, run_harness))
    assert [t["name"] for t in lines(figs["trend-tpot"])] == ["eager · tiny · b1"]
    assert json.dumps(figs["latest"]).count("gen 4") == 0
