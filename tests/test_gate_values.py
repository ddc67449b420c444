"""Values gated one per point (memory, top-1 agreement, perplexity): thresholds only, and quality that is not a
number (NaN logits, an overflowing perplexity) a regression rather than "not measured"."""

from __future__ import annotations

import math

from gate_points import point_samples, write_side

from harness.gate import IMPROVEMENT, NO_CHANGE, REGRESSION, UNKNOWN, compare, decide_value
from harness.gate_settings import METRICS, Settings


def test_single_values_are_gated_by_threshold_only():
    mem, top1, ppl = METRICS["peak_memory_mb"], METRICS["fidelity_top1"], METRICS["ppl"]
    assert decide_value(100.0, 115.0, mem, 0.10).verdict == REGRESSION
    assert decide_value(100.0, 105.0, mem, 0.10).verdict == NO_CHANGE
    assert decide_value(100.0, 80.0, mem, 0.10).verdict == IMPROVEMENT
    assert decide_value(100.0, math.nan, mem, 0.10).verdict == UNKNOWN
    v = decide_value(0.99, 0.975, top1, 0.01)  # an absolute drop of 0.015 agreement
    assert v.verdict == REGRESSION and math.isclose(v.change, -0.015) and v.mode == "absolute"
    assert decide_value(0.99, 0.985, top1, 0.01).verdict == NO_CHANGE
    assert decide_value(10.0, 10.5, ppl, 0.02).verdict == REGRESSION  # perplexity +5%
    inf = decide_value(10.0, math.inf, ppl, 0.02)  # measured and overflowing: the worst, not "not measured"
    assert inf.verdict == REGRESSION and inf.change == math.inf and "not finite" in inf.reason
    assert decide_value(math.inf, 10.0, ppl, 0.02).verdict == IMPROVEMENT
    assert decide_value(math.inf, math.inf, ppl, 0.02).verdict == NO_CHANGE


def test_nan_logits_and_an_infinite_perplexity_are_regressions_end_to_end(tmp_path, synthetic_point):
    """A record's KL and perplexity are null in JSON both when unmeasured and when not finite; the table's
    fidelity_nonfinite and the NLL tell them apart, so the gate cannot pass a broken engine as unmeasured."""
    good = {"top1_agreement": 0.99, "kl": 0.01, "ppl": 10.0, "nll": math.log(10.0), "nonfinite_fraction": 0.0}
    base = write_side(tmp_path, "base", synthetic_point, [
        point_samples(2.0, batch_size=1, quality=good), point_samples(2.0, batch_size=2, quality=good),
    ])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(2.0, batch_size=1, quality={**good, "kl": None, "ppl": None, "nll": None,
                                                  "nonfinite_fraction": 0.0078}),
        point_samples(2.0, batch_size=2, quality={**good, "kl": 700.0, "ppl": None, "nll": 800.0}),
    ])  # fmt: skip
    assert cand.set_index("batch_size").loc[2, "ppl"] == math.inf
    assert cand.set_index("batch_size").loc[1, "fidelity_nonfinite"] == 0.0078
    rows = compare(base, cand, Settings()).rows.set_index(["label", "metric"])
    assert rows.loc[("eager · tiny · b1", "fidelity_nonfinite"), "verdict"] == REGRESSION
    assert rows.loc[("eager · tiny · b2", "ppl"), "verdict"] == REGRESSION
    assert rows.loc[("eager · tiny · b2", "fidelity_nonfinite"), "verdict"] == NO_CHANGE


def test_quality_scored_on_other_inputs_is_unknown_not_a_regression(tmp_path, synthetic_point):
    """Only quality.n_seqs changed: other held-out windows give another perplexity, which is no regression of the
    engine; the timings are still gated. A side without ``inputs_id`` (an older record) is compared as before."""
    good = {"top1_agreement": 0.99, "ppl": 10.0, "nll": math.log(10.0), "nonfinite_fraction": 0.0}
    base = write_side(tmp_path, "base", synthetic_point, [
        point_samples(2.0, batch_size=1, quality={**good, "inputs_id": "aaaa"}),
        point_samples(2.0, batch_size=2, quality=good),
    ])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(2.0, batch_size=1, quality={**good, "ppl": 11.0, "top1_agreement": 0.9, "inputs_id": "bbbb"}),
        point_samples(2.0, batch_size=2, quality={**good, "ppl": 11.0, "inputs_id": "bbbb"}),
    ])  # fmt: skip
    rows = compare(base, cand, Settings()).rows.set_index(["label", "metric"])
    for metric in ("ppl", "fidelity_top1"):
        v = rows.loc[("eager · tiny · b1", metric)]
        assert v["verdict"] == UNKNOWN and "quality scored on other inputs (aaaa vs bbbb" in v["reason"]
    assert rows.loc[("eager · tiny · b1", "tpot_ms"), "verdict"] == NO_CHANGE
    assert rows.loc[("eager · tiny · b2", "ppl"), "verdict"] == REGRESSION


def test_quality_against_a_reference_with_nonfinite_logits_is_unknown(tmp_path, synthetic_point):
    good = {"top1_agreement": 0.99, "ppl": 10.0, "nll": math.log(10.0), "nonfinite_fraction": 0.0}
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, quality=good)])
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(2.0, quality={**good, "top1_agreement": 0.5, "reference_nonfinite_fraction": 0.25}),
    ])  # fmt: skip
    assert cand["fidelity_reference_nonfinite"].tolist() == [0.25]
    rows = compare(base, cand, Settings()).rows.set_index("metric")
    top1 = rows.loc["fidelity_top1"]
    assert top1["verdict"] == UNKNOWN
    assert "the reference's logits are not finite at 25.0% of scored positions in CAND" in top1["reason"]


def test_an_agreement_drop_must_be_more_than_a_flip_or_two_of_the_positions_scored(tmp_path, synthetic_point):
    """128 decode positions: 0.01 would be 1.3 of them, so two argmax flips at near-ties (benign numerics) would
    fail the gate; the threshold is raised to 3 positions there. Over 2,048 positions 0.01 stands."""
    good = {"top1_agreement": 0.99, "decode_top1_agreement": 1.0, "n_tokens": 2048, "decode_n_tokens": 128,
            "nonfinite_fraction": 0.0}  # fmt: skip
    base = write_side(tmp_path, "base", synthetic_point,
                      [point_samples(2.0, batch_size=b, quality=good) for b in (1, 2)])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(2.0, batch_size=1, quality={**good, "decode_top1_agreement": 126 / 128}),
        point_samples(2.0, batch_size=2, quality={**good, "decode_top1_agreement": 124 / 128,
                                                  "top1_agreement": 0.975}),
    ])  # fmt: skip
    assert cand["fidelity_n_decode"].tolist() == [128, 128] and cand["fidelity_n"].tolist() == [2048, 2048]
    rows = compare(base, cand, Settings()).rows.set_index(["label", "metric"])
    two = rows.loc[("eager · tiny · b1", "fidelity_top1_decode")]
    assert two["verdict"] == NO_CHANGE and math.isclose(two["threshold"], 3 / 128)
    assert "raised to 0.0234: 3 of the 128 positions scored" in two["reason"]
    assert rows.loc[("eager · tiny · b2", "fidelity_top1_decode"), "verdict"] == REGRESSION  # four flips
    full = rows.loc[("eager · tiny · b2", "fidelity_top1")]
    assert full["verdict"] == REGRESSION and full["threshold"] == 0.01 and "raised" not in full["reason"]
