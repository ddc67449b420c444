"""What the gate may call a pass: inconclusive tests are unknown (never "no change"), a comparison where nothing
could be gated exits 3, the JSON verdict follows the exit status and is strict JSON, and unpaired comparisons
say that drift between runs is not in their tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gate_points import point_samples, write_side

from harness.gate import NO_CHANGE, UNKNOWN, compare, decide_intervals, decide_paired
from harness.gate_report import EXIT_UNGATED
from harness.gate_settings import Settings
from harness.records import RECORD_NAME


def _strict(text: str) -> dict:
    """Parse as a strict (RFC 8259) parser does: NaN and Infinity are errors."""

    def reject(name):
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=reject)


def test_a_change_the_tests_do_not_confirm_is_inconclusive_in_every_path():
    """+10% medians whose CIs overlap (table path), and a paired change the signed-rank test does not confirm:
    unknown, saying it needs more samples; within the threshold is still no change."""
    v = decide_intervals((10.0, 9.0, 11.0), (11.0, 10.0, 12.0), higher_is_better=False, threshold=0.05)
    assert v.verdict == UNKNOWN and math.isclose(v.change, 0.1)
    assert "CIs overlap" in v.reason and "inconclusive, needs more samples" in v.reason
    assert decide_intervals((10.0, 9.0, 11.0), (10.2, 9.2, 11.2), False, 0.05).verdict == NO_CHANGE
    x = np.full(20, 2.0)  # 9 rounds 0.1% faster, 11 rounds 22% slower: signed-rank p = 0.02 >= 0.01
    v = decide_paired(x, x * np.exp(np.r_[np.full(9, -0.001), np.full(11, 0.2)]), False, 0.05)
    assert v.verdict == UNKNOWN and v.change > 0.2 and v.reason.endswith("inconclusive, needs more samples")


def test_zero_differences_count_against_what_the_signed_rank_test_can_reach():
    """10 pairs, 5 of them identical: the signed-rank test drops the zeros and 5 pairs cannot reach p < 0.01."""
    x = np.linspace(1.0, 1.1, 10)
    v = decide_paired(x, x * np.r_[np.ones(5), np.full(5, 2.0)], False, 0.05)
    assert v.verdict == UNKNOWN and "5 paired samples (5 tied at zero) cannot reach signed-rank p < 0.01" in v.reason


@pytest.fixture()
def wide(tmp_path, synthetic_point):
    """TPOT 12% slower in CAND, but each side's samples spread from 1 to 3 ms: the U test cannot confirm it."""
    spread = list(np.linspace(1.0, 3.0, 20))
    base = [{"tpot": spread, "ttft": list(np.linspace(10, 10.2, 20))}]
    cand = [{"tpot": [1.12 * t for t in spread], "ttft": list(np.linspace(10, 10.2, 20))}]
    write_side(tmp_path, "base", synthetic_point, base)
    write_side(tmp_path, "cand", synthetic_point, cand)
    return tmp_path / "base", tmp_path / "cand"


def test_inconclusive_rows_are_shown_unfolded_and_the_headline_warns(run_harness, wide, tmp_path, capsys):
    base, cand = wide
    md = tmp_path / "gate.md"
    assert run_harness("compare", str(base), str(cand), "--markdown", str(md), "--json", str(tmp_path / "g.json")) == 0
    text = md.read_text()
    assert text.startswith("## ⚠️ LLM inference gate: no regression (0 improvement, 1 unknown, 0 no change")
    shown = text.split("<details>")[0]  # above the folded no-change rows
    assert "| ❔ unknown | eager · tiny · b1 | tpot_ms |" in shown and "+12.0% but U test p=" in shown
    assert "inconclusive, needs more samples" in shown
    doc = _strict((tmp_path / "g.json").read_text())
    row = next(r for r in doc["rows"] if r["metric"] == "tpot_ms")
    assert row["verdict"] == "unknown" and 0.11 < row["change"] < 0.13 and row["p_value"] > 0.01
    assert doc["verdict"] == "pass" and doc["gated"] is True  # TTFT was gated: no change


def test_nothing_gated_exits_3_unless_allowed(run_harness, tmp_path, synthetic_point, capsys):
    """CAND is 30% slower on every point, but ran in another environment: every timing is unknown. That is not a
    pass: exit 3 and a ⚠️ "nothing gated" headline; --allow-ungated restores exit 0 (still ⚠️)."""
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, batch_size=b) for b in (1, 2)])
    write_side(tmp_path, "cand", synthetic_point,
               [point_samples(2.6, batch_size=b, seed_data=1, env_id="env-b") for b in (1, 2)])  # fmt: skip
    base, cand, md, js = (str(tmp_path / n) for n in ("base", "cand", "gate.md", "gate.json"))
    assert run_harness("compare", base, cand, "--markdown", md, "--json", js) == EXIT_UNGATED == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("nothing gated: no tpot_ms, ttft_ms verdict for any of the 2 matched points")
    assert out[-1] == "nothing gated: no gated metric of any matched point got a verdict (exit status 3)"
    assert (tmp_path / "gate.md").read_text().startswith("## ⚠️ LLM inference gate: nothing gated")
    doc = _strict((tmp_path / "gate.json").read_text())
    assert (doc["verdict"], doc["exit_code"], doc["gated"]) == ("ungated", 3, False)
    assert run_harness("compare", base, cand, "--json", js, "--allow-ungated") == 0
    doc = _strict((tmp_path / "gate.json").read_text())
    assert (doc["verdict"], doc["exit_code"], doc["gated"]) == ("pass", 0, False)
    assert doc["headline"].startswith("nothing gated") and doc["settings"]["allow_ungated"] is True


def test_a_regression_still_fails_when_the_rest_is_ungated(tmp_path, synthetic_point):
    """A point that ran out of memory in CAND is a regression (exit 1) even when no timing could be gated."""
    from harness.gate_report import Sources, exit_code

    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0), point_samples(2.0, batch_size=2)])
    cand = write_side(tmp_path, "cand", synthetic_point, [
        {"status": "oom", "error": "OutOfMemoryError"}, point_samples(2.0, batch_size=2, env_id="env-b"),
    ])  # fmt: skip
    result = compare(base, cand)
    assert result.decisive == 0 and exit_code(result, Sources("b", "c")) == 1


def test_skipped_in_cand_on_the_same_environment_became_unavailable(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0), point_samples(2.0, batch_size=2)])
    cand = write_side(tmp_path, "cand", synthetic_point, [
        {"status": "skipped", "error": "needs CUDA"}, point_samples(2.0, batch_size=2, seed_data=1),
    ])  # fmt: skip
    rows = compare(base, cand).rows.set_index("label")
    assert rows.loc["eager · tiny · b1", "verdict"] == UNKNOWN
    assert rows.loc["eager · tiny · b1", "reason"].startswith("became unavailable: ok in BASE, skipped in CAND")


def test_the_json_verdict_says_incomplete_when_a_record_was_unreadable(run_harness, tmp_path, synthetic_point,
                                                                       capsys):  # fmt: skip
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, batch_size=b) for b in (1, 2)])
    write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, batch_size=b, seed_data=1) for b in (1, 2)])
    bad = tmp_path / "cand" / "1" / RECORD_NAME
    bad.write_text(bad.read_text()[:100])
    js = tmp_path / "gate.json"
    assert run_harness("compare", str(tmp_path / "base"), str(tmp_path / "cand"), "--json", str(js)) == 2
    doc = _strict(js.read_text())
    assert (doc["verdict"], doc["exit_code"]) == ("incomplete", 2)
    assert doc["headline"].endswith("; incomplete: 1 record(s) could not be read")


def test_compare_json_is_strict_json_with_infinities_as_strings(run_harness, tmp_path, synthetic_point, capsys):
    """An overflowing perplexity (the worst regression) must not break JavaScript's or Go's JSON parser."""
    good = {"top1_agreement": 0.99, "ppl": 10.0, "nll": math.log(10.0), "nonfinite_fraction": 0.0}
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, quality=good)])
    write_side(tmp_path, "cand", synthetic_point,
               [point_samples(2.0, seed_data=1, quality={**good, "ppl": None, "nll": 800.0})])  # fmt: skip
    code = run_harness("compare", str(tmp_path / "base"), str(tmp_path / "cand"), "--json", "-", "--metric", "ppl")
    assert code == 1
    doc = _strict(capsys.readouterr().out)
    row = doc["rows"][0]
    assert (row["verdict"], row["base"], row["cand"], row["change"]) == ("regression", 10.0, "inf", "inf")
    import pandas as pd

    from harness.gate_report import verdict_table

    assert verdict_table(pd.DataFrame(doc["rows"]))[0][3:6] == ["10", "inf", "+inf"]  # as the dashboard shows it


def test_unpaired_comparisons_say_so_and_paired_ones_do_not(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, seed_data=1)])
    result = compare(base, cand, Settings(metrics=("tpot_ms", "ttft_ms")))
    assert result.unpaired == 2
    note = next(n for n in result.notes if n.startswith("2 timed verdict(s) compare samples from separate runs"))
    assert "18.8% of A/A points" in note and "--history" in note
    from harness.gate_report import Sources, render_markdown

    assert "⚠️ **Unpaired:** BASE and CAND were timed in separate runs" in render_markdown(result, Sources("b", "c"))
    turns = [dict(point_samples(2.0), turns_id="t1")]
    a = write_side(tmp_path / "t", "a", synthetic_point, turns)
    c = write_side(tmp_path / "t", "c", synthetic_point, [dict(point_samples(2.0), variant="other", turns_id="t1")])
    paired = compare(a, c, Settings(match=("model", "batch_size", "prompt_len", "gen_len")))
    assert set(paired.rows["mode"]) == {"paired"} and paired.unpaired == 0
    assert not any("separate runs" in n for n in paired.notes)


def test_the_settings_line_names_the_tests_the_rows_used(tmp_path, synthetic_point):
    from harness.gate_report import settings_line

    base = write_side(tmp_path, "base", synthetic_point, [dict(point_samples(2.0), turns_id="t1")])
    cand = write_side(tmp_path, "cand", synthetic_point, [dict(point_samples(2.0), variant="x", turns_id="t1")])
    match = ("model", "batch_size", "prompt_len", "gen_len")
    line = settings_line(compare(base, cand, Settings(match=match, correction="holm", metrics=(
        "tpot_ms", "peak_memory_mb", "fidelity_top1"))))  # fmt: skip
    assert "signed-rank test on the per-round ratios (p < 0.01 (Holm-corrected over all rank tests))" in line
    assert "U test" not in line
    assert "tpot_ms 5.0%, peak_memory_mb 10.0%, fidelity_top1 0.01 absolute" in line
    unpaired = settings_line(compare(base, cand.assign(turns_id=None), Settings(match=match)))
    assert "the U test on the raw samples (p < 0.01)" in unpaired and "signed-rank" not in unpaired
    assert "ppl 2.0%" in unpaired and "fidelity_top1_decode 0.01 absolute" in unpaired
