"""What the dashboard's trend charts mark besides the measured values: fidelity scored on other inputs is a new
line and never a step, points that were not measured (failed, oom, …) are marked where they fell, a new
environment is marked on the time axis, the CI of a lone point is an error bar, commit text is escaped, and a
timing an engine marks unrepresentative is marked (and left unjudged) in its own sweep only."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from test_dashboard import figures, lines

from harness.dashboard.data import quality_segments
from harness.records import write_record
from harness.report.figures import NOT_REPR


def _history(tmp_path, synthetic_point, run_harness, n_sweeps: int, per_sweep=lambda i: {}, edit=lambda i, r: r):
    """``n_sweeps`` sweeps of one point, a day and a commit apart (``per_sweep(i)``: point arguments, samples too,
    ``edit(i, record)``: the record as stored); returns the database."""
    dirs = []
    for i in range(n_sweeps):
        d = tmp_path / f"s{i:02d}"
        rng = np.random.default_rng(i)
        point = {"ttft": list(rng.uniform(5, 6, 8)), "tpot": list(rng.uniform(1, 1.1, 8)), **per_sweep(i)}
        rec = synthetic_point(d / "0", **point)
        rec = {**rec, "started_at": f"2026-11-{1 + i:02d}T12:00:00+00:00"}
        rec["env"]["git"]["sha"] = f"{i:02d}" + "ab" * 19
        write_record(d / "0", edit(i, rec))
        dirs.append(d)
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", *map(str, dirs), "--db", str(db)) == 0
    return db


def _page(tmp_path, db, run_harness, capsys) -> tuple[str, str]:
    """The one-file dashboard of ``db`` and what `harness dashboard` printed."""
    capsys.readouterr()
    out = tmp_path / "site.html"
    assert run_harness("dashboard", "--db", str(db), "-o", str(out)) == 0
    return out.read_text(), capsys.readouterr().out


def _fidelity_history(tmp_path, synthetic_point, run_harness, other_inputs: bool):
    """12 sweeps whose top-1 agreement drops from 0.99 to 0.90 at sweep 6, where (with ``other_inputs``) the
    quality was scored on other inputs from then on."""
    noise = np.random.default_rng(3).normal(0, 0.002, 12)

    def quality(i):
        return {"quality": {"top1_agreement": float((0.99 if i < 6 else 0.90) + noise[i]), "kl": 0.01}}

    def inputs(i, rec):
        rec["quality"]["inputs_id"] = "inputs-b" if other_inputs and i >= 6 else "inputs-a"
        return rec

    return _history(tmp_path, synthetic_point, run_harness, 12, quality, inputs)


def test_fidelity_scored_on_other_inputs_is_a_new_line_and_no_step(tmp_path, synthetic_point, run_harness, capsys):
    same = _fidelity_history(tmp_path / "same", synthetic_point, run_harness, other_inputs=False)
    text, out = _page(tmp_path / "same", same, run_harness, capsys)
    assert out.startswith("1 regression(s)")  # the same drop on the same inputs is a step
    assert len(lines(figures(text)["trend-fidelity"])) == 1

    other = _fidelity_history(tmp_path / "other", synthetic_point, run_harness, other_inputs=True)
    text, out = _page(tmp_path / "other", other, run_harness, capsys)
    assert out.startswith("0 regression(s), 0 improvement(s)")  # another settings' figure is no regression
    before, after = lines(figures(text)["trend-fidelity"])
    assert len(before["x"]) == len(after["x"]) == 6 and after["x"][0] == "2026-11-07T12:00:00"
    assert before["legendgroup"] == after["legendgroup"] and after["showlegend"] is False  # one series
    assert "quality scored on other inputs from here" in after["text"][0]
    assert len(lines(figures(text)["trend-tpot"])) == 1  # timings do not depend on the quality inputs


def test_a_record_without_quality_inputs_continues_its_segment():
    data = pd.DataFrame({"series": ["a"] * 5 + ["b"] * 2,
                         "quality_inputs": ["x", None, "x", "y", np.nan, "z", "w"]})  # fmt: skip
    assert quality_segments(data).tolist() == [0, 0, 0, 1, 1, 0, 1]


def test_points_not_measured_are_marked_on_their_line(tmp_path, synthetic_point, run_harness, capsys):
    def status(i):
        return {"status": "oom", "error": "CUDA out of memory <tried 2 GiB>"} if i == 3 else {}

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 6, status), run_harness, capsys)
    figs = figures(text)
    for sid in ("trend-tpot", "trend-memory"):
        (line,) = lines(figs[sid])
        (mark,) = [t for t in figs[sid]["data"] if t["name"].endswith(": not measured")]
        assert mark["x"] == ["2026-11-04T12:00:00"] and mark["meta"] == line["meta"]  # the filters hide it too
        assert mark["x"][0] not in line["x"]
        (custom,) = mark["customdata"]
        assert custom[2] == "oom" and custom[4] == "CUDA out of memory &lt;tried 2 GiB&gt;"
        assert custom[3].endswith(".html") is False  # no report.html in these sweeps: nothing to open
        assert "%{customdata[2]}" in mark["hovertemplate"] and mark["marker"]["symbol"] == "x"


def test_a_new_environment_is_marked_on_the_time_axis(tmp_path, synthetic_point, run_harness, capsys):
    def env(i):
        return {"env_id": "env-a" if i < 3 else "env-b"}

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 6, env), run_harness, capsys)
    layout = figures(text)["trend-tpot"]["layout"]
    (shape,) = layout["shapes"]
    assert shape["x0"] == shape["x1"] == "2026-11-04T12:00:00" and shape["yref"] == "paper"
    assert [a["text"] for a in layout["annotations"]] == ["env env-b"]

    one = tmp_path / "one"
    text, _ = _page(one, _history(one, synthetic_point, run_harness, 3), run_harness, capsys)
    assert "shapes" not in figures(text)["trend-tpot"]["layout"]  # one environment: nothing to mark


def test_where_the_commit_changes_is_marked_on_the_time_axis(tmp_path, synthetic_point, run_harness, capsys):
    """Six sweeps of three commits (the third one's SHA with markup in it): a tick at the first sweep of each run
    of one commit, its SHA escaped in the hover; one commit throughout marks nothing."""
    shas = ["a" * 40, "a" * 40, "b" * 40, "b" * 40, "b" * 40, "<b>c" + "c" * 36]

    def sha(i, rec):
        rec["env"]["git"]["sha"] = shas[i]
        return rec

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 6, edit=sha), run_harness, capsys)
    figs = figures(text)
    for sid in ("trend-tpot", "trend-memory"):
        (ticks,) = [t for t in figs[sid]["data"] if t["name"] == "commits"]
        assert ticks["x"] == ["2026-11-01T12:00:00", "2026-11-03T12:00:00", "2026-11-06T12:00:00"]
        assert ticks["yaxis"] == "y2" and "meta" not in ticks  # on its own hidden axis, never filtered out
        assert [t.split("<br>")[0] for t in ticks["text"]] == ["commit aaaaaaaaaa from here",
                                                             "commit bbbbbbbbbb from here",
                                                             "commit &lt;b&gt;ccccccc from here"]  # fmt: skip
        assert [t.split(" · ")[1] for t in ticks["text"]] == ["2 sweeps of it in a row", "3 sweeps of it in a row",
                                                            "1 sweep of it in a row"]  # fmt: skip
        axis = figs[sid]["layout"]["yaxis2"]
        assert axis["visible"] is False and axis["type"] == "linear" and axis["range"] == [0, 1]  # never log
    one = tmp_path / "one"
    text, _ = _page(one, _history(one, synthetic_point, run_harness, 3, edit=lambda i, r: sha(0, r)), run_harness,
                    capsys)  # fmt: skip
    assert not [t for t in figures(text)["trend-tpot"]["data"] if t["name"] == "commits"]


def test_the_ci_of_a_lone_point_is_an_error_bar(tmp_path, synthetic_point, run_harness, capsys):
    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 1), run_harness, capsys)
    figs = figures(text)
    (line,) = lines(figs["trend-tpot"])
    assert not [t for t in figs["trend-tpot"]["data"] if t.get("fill") == "toself"]  # one point makes no band
    err = line["error_y"]
    plus, minus = (np.frombuffer(__import__("base64").b64decode(err[k]["bdata"])) if isinstance(err[k], dict)
                   else np.asarray(err[k]) for k in ("array", "arrayminus"))  # fmt: skip
    assert plus[0] > 0 and minus[0] > 0  # the stored CI of the median around it
    assert "error_y" not in lines(figs["trend-memory"])[0]  # memory stores no interval


def test_commit_text_is_escaped_in_the_hover(tmp_path, synthetic_point, run_harness, capsys):
    def sha(i, rec):
        rec["env"]["git"]["sha"] = "<img src=x onerror=alert(1)>"
        return rec

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 2, edit=sha), run_harness, capsys)
    (line,) = lines(figures(text)["trend-tpot"])
    assert [row[0] for row in line["customdata"]] == ["&lt;img src=x"] * 2  # short_sha keeps 10 characters


INTERPRETED = "Triton kernels ran in the interpreter <slow>"


def _timed(i: int, level: float, caveat: str | None = None) -> dict:
    """Sweep ``i``'s samples at ``level`` (2% log-normal noise from sweep to sweep and sample to sample, as
    history_sweeps.synthetic_history), with the engine's ``caveat`` when its timing is not representative."""
    rng = np.random.default_rng(100 + i)
    level *= float(np.exp(rng.normal(0, 0.02)))
    tpot = level * np.exp(rng.normal(0, 0.02, 10))
    return {"ttft": list(5 * level * np.exp(rng.normal(0, 0.02, 10))), "tpot": list(tpot), "caveat": caveat}


def _day(i: int) -> str:
    return f"2026-11-{1 + i:02d}T12:00:00"


def test_one_unrepresentative_sweep_is_marked_alone(tmp_path, synthetic_point, run_harness, capsys):
    def sweep(i):
        return _timed(i, 10.0, INTERPRETED) if i == 3 else _timed(i, 1.0)

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 8, sweep), run_harness, capsys)
    figs = figures(text)
    for sid in ("trend-tpot", "trend-ttft", "trend-throughput"):
        line, odd = lines(figs[sid])
        assert line["x"] == [_day(i) for i in range(8) if i != 3], sid  # the others keep their solid line
        assert line["line"]["dash"] == "solid" and line["marker"]["symbol"] == "circle" and line["showlegend"]
        assert NOT_REPR not in line["name"]
        assert odd["x"] == [_day(3)] and odd["marker"]["symbol"] == "circle-open" and odd["line"]["dash"] == "dot"
        assert odd["name"] == f"{line['name']}: {NOT_REPR}" and odd["showlegend"] is False
        assert odd["legendgroup"] == line["legendgroup"] and odd["meta"] == line["meta"]  # the filters hide it too
        assert odd["text"][0].startswith(f"<br>{NOT_REPR}: Triton kernels ran in the interpreter &lt;slow&gt;")
        assert not any(NOT_REPR in t for t in line["text"])
        bands = [t for t in figs[sid]["data"] if t.get("fill") == "toself"]
        assert len(bands) == 1 and _day(3) not in bands[0]["x"]  # the band is the line's
    assert [len(t["x"]) for t in lines(figs["trend-memory"])] == [8]  # its memory was measured as ever
    assert lines(figs["trend-memory"])[0]["line"]["dash"] == "solid"


def test_steps_are_judged_on_the_representative_sweeps(tmp_path, synthetic_point, run_harness, capsys):
    def stepped(i):  # 30% slower from sweep 5 on; sweep 3 (before it) and sweep 9 (after it) interpreted
        return _timed(i, 10.0, INTERPRETED) if i in (3, 9) else _timed(i, 1.3 if i >= 5 else 1.0)

    db = _history(tmp_path / "a", synthetic_point, run_harness, 14, stepped)
    text, out = _page(tmp_path / "a", db, run_harness, capsys)
    assert out.startswith("2 regression(s), 0 improvement(s)")  # TPOT and TTFT: judged despite sweeps 3 and 9
    (marks,) = [t for t in figures(text)["trend-tpot"]["data"] if t["name"].endswith(": steps")]
    assert marks["x"] == [_day(5)]
    steps = text[text.index('<section id="steps">') : text.index('<section id="gate">')]
    assert steps.count(">04abababab (") == steps.count(">05abababab (") == 2  # last good, first bad
    before, after = map(float, re.search(r"\(([\d.]+) → ([\d.]+)\)", marks["text"][0]).groups())
    assert 0.9 < before < 1.1 and 1.2 < after < 1.4  # the levels: the interpreted sweeps are in neither

    def outlier(i):  # three interpreted sweeps, 3x as slow: no step in either direction
        return _timed(i, 3.0, INTERPRETED) if i in (5, 6, 7) else _timed(i, 1.0)

    db = _history(tmp_path / "b", synthetic_point, run_harness, 12, outlier)
    text, out = _page(tmp_path / "b", db, run_harness, capsys)
    assert out.startswith("0 regression(s), 0 improvement(s)")
    line, odd = lines(figures(text)["trend-tpot"])
    assert len(line["x"]) == 9 and odd["x"] == [_day(i) for i in (5, 6, 7)]  # one dotted run of three


def test_sweeps_started_within_one_second_keep_their_own_positions(tmp_path, synthetic_point, run_harness, capsys):
    def same_second(i, rec):  # three sweeps 0.25 s apart (run folders are named to the microsecond)
        return {**rec, "started_at": f"2026-11-01T12:00:0{i // 4}.{250000 * (i % 4):06d}+00:00"}

    text, _ = _page(tmp_path, _history(tmp_path, synthetic_point, run_harness, 3, edit=same_second), run_harness,
                    capsys)  # fmt: skip
    (line,) = lines(figures(text)["trend-tpot"])
    assert line["x"] == ["2026-11-01T12:00:00", "2026-11-01T12:00:00.250000", "2026-11-01T12:00:00.500000"]
    assert [row[0][:2] for row in line["customdata"]] == ["00", "01", "02"]  # each sweep's own commit, in order


def test_a_point_no_sweep_measured_is_listed_as_never_measured(tmp_path, synthetic_point, run_harness, capsys):
    """Batch 2 failed in each of three sweeps (it has no line to mark a ✕ on): it is listed with its latest error
    and the number of sweeps that tried it; batch 1, measured, is not."""
    dirs = []
    for i in range(3):
        d = tmp_path / f"s{i}"
        rng = np.random.default_rng(i)
        for b, status in ((1, {}), (2, {"status": "failed", "error": f"RuntimeError: <boom {i}>"})):
            rec = synthetic_point(d / str(b), ttft=list(rng.uniform(5, 6, 8)), tpot=list(rng.uniform(1, 1.1, 8)),
                                  batch_size=b, **status)  # fmt: skip
            write_record(d / str(b), {**rec, "started_at": f"2026-11-{1 + i:02d}T12:00:00+00:00"})
        dirs.append(d)
    db = tmp_path / "h.sqlite"
    assert run_harness("history", "add", *map(str, dirs), "--db", str(db)) == 0
    text, _ = _page(tmp_path, db, run_harness, capsys)
    section = re.search(r'<section id="never">(.*?)</section>', text, re.S).group(1)
    assert "Never measured (1 point)" in section
    (row,) = re.findall(r"<tr data-series=[^>]*>(.*?)</tr>", section)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert "b2" in cells[0] and "b1" not in cells[0]
    assert cells[1:4] == ["failed", "RuntimeError: &lt;boom 2&gt;", "3"] and cells[4] == "2026-11-03 12:00"
    assert 'data-batch="2"' in section and 'data-model="tiny"' in section  # the filters hide it too

    measured = tmp_path / "measured"
    text, _ = _page(measured, _history(measured, synthetic_point, run_harness, 2), run_harness, capsys)
    assert 'id="never"' not in text
