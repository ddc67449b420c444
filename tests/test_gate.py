"""The regression gate on synthetic samples with known distributions (A/A, a 10% shift, heavy tails, small n)
and its per-point rules (environment, representativeness, failures, thresholds); `harness compare` itself is in
test_gate_cli.py."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from gate_points import point_samples, write_side

from harness.gate import (
    IMPROVEMENT,
    NO_CHANGE,
    REGRESSION,
    UNKNOWN,
    compare,
    decide_paired,
    decide_samples,
)  # fmt: skip
from harness.gate_settings import METRICS, GateInputError, Settings, Thresholds, load_thresholds

RNG_SEED = 20261123


def _lognormal(rng, median: float, sigma: float, n: int, outliers: float = 0.0) -> np.ndarray:
    """Latency-like samples: log-normal around ``median``, plus a fraction of 2-4x outliers (preemption)."""
    x = median * np.exp(rng.normal(0.0, sigma, n))
    hit = rng.random(n) < outliers
    return np.where(hit, x * rng.uniform(2, 4, n), x)


NOISE = {  # name -> (sigma of log-normal noise, outlier fraction)
    "quiet": (0.01, 0.0),
    "typical": (0.03, 0.02),
    "noisy": (0.08, 0.05),
    "heavy-tailed": (0.05, 0.15),
}


def _rates(noise: str, shift: float, n: int = 20, trials: int = 1000) -> dict[str, float]:
    rng = np.random.default_rng(RNG_SEED)
    sigma, outliers = NOISE[noise]
    out = {REGRESSION: 0, IMPROVEMENT: 0, NO_CHANGE: 0, UNKNOWN: 0}
    for _ in range(trials):
        median = rng.uniform(1.0, 50.0)
        x = _lognormal(rng, median, sigma, n, outliers)
        y = _lognormal(rng, median * (1 + shift), sigma, n, outliers)
        out[decide_samples(x, y, higher_is_better=False, threshold=0.05, alpha=0.01).verdict] += 1
    return {k: v / trials for k, v in out.items()}


@pytest.mark.parametrize("noise", list(NOISE))
def test_aa_same_distribution_is_almost_never_a_regression(noise):
    """A/A medians that drift beyond the threshold by chance (13% of the noisy trials) are inconclusive, never
    no change and never a regression."""
    rates = _rates(noise, 0.0)
    assert rates[REGRESSION] <= 0.005 and rates[IMPROVEMENT] <= 0.005, rates
    assert rates[NO_CHANGE] + rates[UNKNOWN] >= 0.99
    assert rates[NO_CHANGE] >= (0.99 if noise in ("quiet", "typical") else 0.8), rates


@pytest.mark.parametrize("noise", ["quiet", "typical"])
def test_a_real_10_percent_slowdown_is_caught(noise):
    rates = _rates(noise, 0.10)
    assert rates[REGRESSION] >= 0.95, rates
    assert _rates(noise, -0.10)[IMPROVEMENT] >= 0.95  # and a 10% speed-up is an improvement


@pytest.mark.parametrize("noise", ["noisy", "heavy-tailed"])
def test_under_heavy_noise_more_samples_buy_power_and_nothing_is_guessed(noise):
    """Noise as wide as the change (8% log-normal spread, or 15% of samples 2-4x slower) cannot be resolved
    from 10 samples: the gate then misses the slowdown rather than guessing, never calls it an improvement,
    and catches it more often as samples grow."""
    rates = [_rates(noise, 0.10, n=n, trials=400) for n in (10, 20, 60)]
    power = [r[REGRESSION] for r in rates]
    assert power[0] < power[1] < power[2] and power[0] < 0.5 and power[2] >= 0.85, power
    assert all(r[IMPROVEMENT] == 0.0 for r in rates)


def test_a_significant_change_below_the_threshold_is_no_change():
    rng = np.random.default_rng(1)
    x, y = _lognormal(rng, 10.0, 0.005, 40), _lognormal(rng, 10.3, 0.005, 40)  # +3%, p ~ 1e-14
    v = decide_samples(x, y, higher_is_better=False, threshold=0.05)
    assert v.verdict == NO_CHANGE and v.p_value < 1e-6 and "within ±5.0%" in v.reason
    assert decide_samples(x, y, higher_is_better=False, threshold=0.02).verdict == REGRESSION


def test_overlapping_median_cis_veto_a_regression():
    """Bimodal samples: the U test and the medians say +20%, but each median could sit in either mode."""
    x = np.r_[np.full(10, 10.0), np.full(10, 12.0)] + np.linspace(0, 0.01, 20)
    y = np.r_[np.full(9, 10.0), np.full(11, 12.0)] + np.linspace(0, 0.01, 20) + 0.005
    v = decide_samples(x, y, higher_is_better=False, threshold=0.05, alpha=0.5)
    assert v.change > 0.05 and v.p_value < 0.5 and v.verdict == UNKNOWN and "CIs overlap" in v.reason
    assert v.reason.endswith("inconclusive, needs more samples")


def test_the_u_test_vetoes_a_change_of_medians_the_samples_do_not_bear_out():
    """Medians 10 -> 11 (+10%), CIs apart, but most of BASE lies above most of CAND: the U test says no."""
    x = np.r_[np.linspace(10, 10.01, 28), np.full(12, 100.0)]
    y = np.r_[np.full(12, 1.0), np.linspace(11, 11.01, 28)]
    v = decide_samples(x, y, higher_is_better=False, threshold=0.05)
    assert v.change > 0.05 and v.verdict == UNKNOWN and "U test p=" in v.reason and "inconclusive" in v.reason


def test_each_paired_test_can_veto():
    """Paired by round: a +10.8% median ratio the signed-rank test accepts (p=0.002) but whose CI holds 1, and a
    +22% one whose CI is clear but whose signed-rank p (0.02) is above alpha: neither is a regression,
    nor no change (inconclusive)."""
    x = np.full(20, 2.0)
    ci = decide_paired(x, x * np.exp(np.r_[np.full(6, -0.01), np.linspace(0.1, 0.11, 14)]), False, 0.05)
    assert ci.verdict == UNKNOWN and ci.p_value < 0.01 and "holds 1: inconclusive" in ci.reason
    rank = decide_paired(x, x * np.exp(np.r_[np.full(9, -0.001), np.full(11, 0.2)]), False, 0.05)
    assert rank.verdict == UNKNOWN and rank.change > 0.2 and "signed-rank p=" in rank.reason


def test_too_few_samples_is_unknown_and_direction_is_respected():
    v = decide_samples([1, 1.1, 1.2, 1.0], [2, 2.1, 2.2, 2.0], higher_is_better=False, threshold=0.05)
    assert v.verdict == UNKNOWN and "too few samples (4 vs 4; need 5)" in v.reason
    fast, slow = np.linspace(100, 101, 20), np.linspace(80, 81, 20)
    assert decide_samples(fast, slow, higher_is_better=True, threshold=0.05).verdict == REGRESSION  # tokens/s fell
    assert decide_samples(slow, fast, higher_is_better=True, threshold=0.05).verdict == IMPROVEMENT


def test_sample_counts_no_rank_test_can_reject_at_are_unknown_not_no_change():
    """5 to 7 pairs: the signed-rank test's smallest two-sided p is 2/2**n = 0.0625, 0.031, 0.016, never below
    alpha 0.01, so even a 2x slowdown in every round would read 'no change'; 8 pairs can reach it."""
    rng = np.random.default_rng(0)
    for n in (5, 6, 7):
        x = rng.uniform(1.0, 1.1, n)
        v = decide_paired(x, 2 * x * rng.uniform(0.99, 1.01, n), False, 0.05)
        assert v.verdict == UNKNOWN and f"{n} paired samples cannot reach signed-rank p < 0.01 (it takes 8)" in v.reason
        assert decide_paired(x, x * 1.01, False, 0.05).verdict == NO_CHANGE  # within the threshold it still says so
    x = rng.uniform(1.0, 1.1, 8)
    assert decide_paired(x, 2 * x * rng.uniform(0.99, 1.01, 8), False, 0.05).verdict == REGRESSION
    # the U test: 5 vs 5 reaches p = 2/252 = 0.008, under 0.01 but not under 0.001
    fast, slow = np.linspace(1.0, 1.01, 5), np.linspace(2.0, 2.01, 5)
    assert decide_samples(fast, slow, False, 0.05).verdict == REGRESSION
    v = decide_samples(fast, slow, False, 0.05, alpha=0.001)
    assert v.verdict == UNKNOWN and "5 vs 5 samples cannot reach U test p < 0.001" in v.reason


def test_the_threshold_is_a_ratio_either_way_so_latency_and_throughput_agree():
    """y = 1.051 x: TPOT +5.1% and tokens/s -4.9% are the same change, one verdict at a 5% threshold."""
    x = np.linspace(10.0, 10.2, 20)
    tpot = decide_samples(x, 1.051 * x, higher_is_better=False, threshold=0.05)
    tps = decide_samples(1000 / x, 1000 / (1.051 * x), higher_is_better=True, threshold=0.05)
    assert tpot.verdict == tps.verdict == REGRESSION
    near = decide_samples(x, 1.049 * x, higher_is_better=False, threshold=0.05)
    assert near.verdict == decide_samples(1000 / x, 1000 / (1.049 * x), True, 0.05).verdict == NO_CHANGE
    paired = decide_paired(1000 / x, 1000 / (1.051 * x), True, 0.05)
    assert paired.verdict == REGRESSION and decide_paired(x, 1.051 * x, False, 0.05).verdict == REGRESSION


# --- thresholds ---------------------------------------------------------------------------------------------


def test_thresholds_precedence_and_point_patterns(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_text(
        "threshold: 0.04\n"
        "metrics: {tpot_ms: 0.03, fidelity_top1: 0.005}\n"
        "points:\n"
        "  - match: {variant: 'quant*', batch_size: 1}\n"
        "    thresholds: {tpot_ms: 0.10}\n"
        "  - match: {point_key: abc123}\n"
        "    thresholds: {tpot_ms: 0.20, ttft_ms: 0.30}\n"
    )
    th = load_thresholds(path)
    tpot, ttft, top1, mem = (METRICS[m] for m in ("tpot_ms", "ttft_ms", "fidelity_top1", "peak_memory_mb"))
    row = {"variant": "quantized(scheme=int8)", "batch_size": 1.0, "point_key": "zzz"}
    assert th.get(tpot, row) == 0.10 and th.get(ttft, row) == 0.04  # a float column's 1.0 matches "1"
    assert th.get(tpot, {**row, "batch_size": 4}) == 0.03 and th.get(top1, row) == 0.005
    assert th.get(mem, row) == 0.10  # memory keeps its own default
    assert th.get(tpot, {**row, "point_key": "abc123"}) == 0.20 and th.get(ttft, {"point_key": "abc123"}) == 0.30
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps({"metrics": {"e2e_ms": 0.07}}))
    assert load_thresholds(json_path).get(METRICS["e2e_ms"], {}) == 0.07


@pytest.mark.parametrize(
    "text, message",
    [
        ("metrics: {tpot: 0.1}", "unknown metric 'tpot'"),
        ("metrics: {tpot_ms: fast}", "metrics.tpot_ms: expected a number"),
        ("threshold: -1", "threshold: must be a finite number >= 0"),
        ("points: [{thresholds: {tpot_ms: 0.1}}]", "points[0]: needs a non-empty 'match'"),
        ("limits: 1", "unknown key(s) limits"),
        ("[1, 2", "not valid YAML/JSON"),
    ],
)
def test_bad_thresholds_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GateInputError) as err:
        load_thresholds(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_thresholds_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(GateInputError, match=r"thresholds\.yaml: not a text file \(not UTF-8\)"):
        load_thresholds(path)


# --- compare() on tables ------------------------------------------------------------------------------------


def test_compare_matches_points_and_gives_each_metric_a_verdict(tmp_path, synthetic_point):
    quality = {"top1_agreement": 0.99, "kl": 0.01, "ppl": 10.0}
    base = write_side(tmp_path, "base", synthetic_point, [
        point_samples(2.0, batch_size=1, quality=quality),
        point_samples(2.0, batch_size=2, quality=quality),
        point_samples(2.0, batch_size=4, quality=quality),
        point_samples(2.0, batch_size=8),
        point_samples(2.0, batch_size=16),
    ])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(2.3, batch_size=1, seed_data=1, quality=quality),  # TPOT +15%
        point_samples(2.0, batch_size=2, seed_data=1, quality={**quality, "top1_agreement": 0.95}),  # fidelity drop
        point_samples(1.6, batch_size=4, seed_data=1, quality=quality),  # faster
        point_samples(2.0, batch_size=8, seed_data=1),
        point_samples(2.0, batch_size=32, seed_data=1),  # not in BASE
    ])  # fmt: skip
    result = compare(base, cand, Settings())
    points = result.points.set_index("label")
    assert points.loc["eager · tiny · b1", "verdict"] == REGRESSION
    assert points.loc["eager · tiny · b2", "verdict"] == REGRESSION
    assert points.loc["eager · tiny · b4", "verdict"] == IMPROVEMENT
    assert points.loc["eager · tiny · b8", "verdict"] == NO_CHANGE
    rows = result.rows.set_index(["label", "metric"])
    assert rows.loc[("eager · tiny · b1", "tpot_ms"), "verdict"] == REGRESSION
    assert rows.loc[("eager · tiny · b1", "ttft_ms"), "verdict"] == NO_CHANGE
    assert math.isclose(rows.loc[("eager · tiny · b2", "fidelity_top1"), "change"], -0.04)
    assert ("eager · tiny · b8", "ppl") not in rows.index  # measured on neither side: not gated, but said
    assert any("ppl: not measured in either sweep for 1 point(s)" in n for n in result.notes)
    assert list(result.base_only.label) == ["eager · tiny · b16"] and list(result.cand_only.label) == [
        "eager · tiny · b32"
    ]
    assert result.regressions == 2 and result.counts()[IMPROVEMENT] == 1
    assert rows.iloc[0]["verdict"] == REGRESSION  # most severe first


def test_holm_bounds_the_chance_of_any_false_verdict_over_the_whole_comparison(tmp_path, synthetic_point):
    """Five samples a side, all slower: U test p = 2/252 = 0.008 < alpha 0.01, a regression tested alone. Over
    four rank tests Holm asks the second smallest p for 0.01/3: 0.008 cannot reach it with five a side (unknown);
    twenty a side and the same slowdown still stand."""
    five = {"tpot": [2.0, 2.01, 2.02, 2.03, 2.04], "ttft": [10.0, 10.1, 10.2, 10.3, 10.4]}
    slower = {"tpot": [2.4, 2.41, 2.42, 2.43, 2.44], "ttft": [10.05, 10.15, 10.25, 10.35, 10.45]}
    base = write_side(tmp_path, "base", synthetic_point, [five, point_samples(2.0, batch_size=2)])
    cand = write_side(tmp_path, "cand", synthetic_point, [slower, point_samples(2.4, batch_size=2, seed_data=1)])
    alone = compare(base, cand, Settings()).rows.set_index(["label", "metric"])
    assert alone.loc[("eager · tiny · b1", "tpot_ms"), "verdict"] == REGRESSION
    result = compare(base, cand, Settings(correction="holm"))
    rows = result.rows.set_index(["label", "metric"])
    small = rows.loc[("eager · tiny · b1", "tpot_ms")]
    assert small["verdict"] == UNKNOWN and "is not below Holm's 0.0033 (test 2 of 4)" in small["reason"]
    assert rows.loc[("eager · tiny · b2", "tpot_ms"), "verdict"] == REGRESSION
    assert result.points.set_index("label").loc["eager · tiny · b1", "verdict"] == UNKNOWN
    assert any(n.startswith("Holm-Bonferroni over 4 rank test(s)") for n in result.notes)


def test_wide_tables_are_compared_without_pandas_warnings_on_stderr(tmp_path, synthetic_point):
    """Real tables have hundreds of columns (every engine parameter, model field, statistic)."""
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, seed_data=1)])
    with warnings.catch_warnings():  # column by column, as a table grows: a fragmented frame
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        for df in (base, cand):
            for i in range(150):
                df[f"extra_{i}"] = i
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        assert compare(base, cand, Settings()).regressions == 0


def test_decode_throughput_is_tested_on_tpot_and_reported_as_tokens_per_second(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, batch_size=4)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.5, batch_size=4, seed_data=1)])
    result = compare(base, cand, Settings(metrics=("decode_tokens_per_s", "itl_ms", "e2e_ms", "peak_memory_mb")))
    rows = result.rows.set_index("metric")
    tps = rows.loc["decode_tokens_per_s"]
    assert tps["verdict"] == REGRESSION and 1900 < tps["base"] < 2100 and 1500 < tps["cand"] < 1700
    assert -0.22 < tps["change"] < -0.18  # 2.0 / 2.5 - 1
    # ITL is tested on one median per repetition (20 of them), not on the 60 correlated gaps
    assert rows.loc["itl_ms", "verdict"] == REGRESSION and rows.loc["itl_ms", "n_base"] == 20
    assert rows.loc["e2e_ms", "verdict"] == REGRESSION
    assert rows.loc["peak_memory_mb", "verdict"] == NO_CHANGE and rows.loc["peak_memory_mb", "mode"] == "scalar"


def test_unrepresentative_timings_and_foreign_environments_are_unknown(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [
        point_samples(2.0, batch_size=1, caveat="kernels run by the interpreter"),
        point_samples(2.0, batch_size=2),
        point_samples(2.0, batch_size=4, quality={"top1_agreement": 0.99}),
    ])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        point_samples(4.0, batch_size=1, seed_data=1, caveat="kernels run by the interpreter"),
        point_samples(4.0, batch_size=2, seed_data=1, env_id="env-b"),
        point_samples(4.0, batch_size=4, seed_data=1, env_id="env-b", quality={"top1_agreement": 0.90}),
    ])  # fmt: skip
    rows = compare(base, cand).rows.set_index(["label", "metric"])
    assert rows.loc[("eager · tiny · b1", "tpot_ms"), "verdict"] == UNKNOWN
    assert (
        "timings not representative (kernels run by the interpreter)"
        in rows.loc[("eager · tiny · b1", "tpot_ms"), "reason"]
    )
    assert rows.loc[("eager · tiny · b2", "tpot_ms"), "verdict"] == UNKNOWN
    assert "environments differ (env-a vs env-b)" in rows.loc[("eager · tiny · b2", "tpot_ms"), "reason"]
    # fidelity is measured against the reference on the same machine: still gated across environments
    assert rows.loc[("eager · tiny · b4", "fidelity_top1"), "verdict"] == REGRESSION
    allowed = compare(base, cand, Settings(allow_env_mismatch=True)).rows.set_index(["label", "metric"])
    assert allowed.loc[("eager · tiny · b2", "tpot_ms"), "verdict"] == REGRESSION
    assert "gated because of --allow-env-mismatch" in allowed.loc[("eager · tiny · b2", "tpot_ms"), "reason"]
    assert allowed.loc[("eager · tiny · b1", "tpot_ms"), "verdict"] == UNKNOWN  # never gated, flag or not


def test_failures_in_the_candidate_are_regressions_and_skips_unknown(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [
        point_samples(2.0, batch_size=1), point_samples(2.0, batch_size=2), point_samples(2.0, batch_size=4),
        {"batch_size": 8, "status": "failed", "error": "RuntimeError: boom"},
        {"batch_size": 16, "status": "skipped", "error": "needs CUDA"},
        point_samples(2.0, batch_size=32),
    ])  # fmt: skip
    cand = write_side(tmp_path, "cand", synthetic_point, [
        {"batch_size": 1, "status": "oom", "error": "OutOfMemoryError: CUDA out of memory"},
        {"batch_size": 2, "status": "skipped", "error": "needs CUDA"},
        point_samples(2.0, batch_size=4),
        point_samples(2.0, batch_size=8),
        point_samples(2.0, batch_size=16),
        {"batch_size": 32, "status": "timeout", "error": "PointTimeout: over measure.timeout_s=60"},
    ])  # fmt: skip
    rows = compare(base, cand).rows.set_index("label")
    assert rows.loc["eager · tiny · b1", "verdict"] == REGRESSION
    assert rows.loc["eager · tiny · b1", "reason"] == "ok in BASE, oom in CAND: OutOfMemoryError: CUDA out of memory"
    assert (
        rows.loc["eager · tiny · b2", "verdict"] == UNKNOWN and "needs CUDA" in rows.loc["eager · tiny · b2", "reason"]
    )
    assert rows.loc["eager · tiny · b8", "verdict"] == IMPROVEMENT  # fixed
    assert rows.loc["eager · tiny · b32", "verdict"] == REGRESSION  # a timeout is a failure too
    assert rows.loc["eager · tiny · b32", "reason"].startswith("ok in BASE, timeout in CAND")
    # skipped in BASE (its engine could not run there): nothing was measured to improve on
    assert rows.loc["eager · tiny · b16", "verdict"] == UNKNOWN
    assert rows.loc["eager · tiny · b16", "reason"].startswith("skipped in BASE")


def test_a_point_rule_on_a_column_neither_side_has_is_named(tmp_path, synthetic_point):
    """`match: {varaint: ...}` would match no point and leave the default threshold in force without a word."""
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.4)])
    wide = {"tpot_ms": 0.5}
    rules = Thresholds.from_dict({"points": [{"match": {"varaint": "eager*"}, "thresholds": wide},
                                             {"match": {"variant": "eager*"}, "thresholds": wide}]})  # fmt: skip
    result = compare(base, cand, Settings(metrics=("tpot_ms",), thresholds=rules))
    assert "thresholds: points[0]: no column 'varaint' in BASE or CAND: the rule applies to no point" in result.notes
    assert not any("points[1]" in note for note in result.notes)
    assert result.rows.verdict.tolist() == [NO_CHANGE]  # the second rule's 50% applies


def test_few_samples_and_no_common_point(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [{"tpot": [2.0] * 3, "ttft": [10.0] * 3}])
    cand = write_side(tmp_path, "cand", synthetic_point, [{"tpot": [4.0] * 3, "ttft": [20.0] * 3}])
    assert set(compare(base, cand).rows.verdict) == {UNKNOWN}
    other = write_side(tmp_path, "other", synthetic_point, [point_samples(2.0, batch_size=64)])
    with pytest.raises(GateInputError, match="no point in common"):
        compare(base, other)


def test_match_on_other_columns_compares_two_variants(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0, variant="eager")])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, variant="compiled", seed_data=1)])
    with pytest.raises(GateInputError):
        compare(base, cand)  # different point keys
    result = compare(base, cand, Settings(match=("model", "batch_size", "prompt_len", "gen_len")))
    assert len(result.points) == 1 and result.points.verdict.iloc[0] == NO_CHANGE
    with pytest.raises(GateInputError, match="no column"):
        compare(base, cand, Settings(match=("nonexistent",)))


def test_thresholds_object_defaults():
    th = Thresholds()
    assert th.get(METRICS["tpot_ms"], {}) == 0.05 and th.get(METRICS["fidelity_top1"], {}) == 0.01
    assert th.get(METRICS["ppl"], {}) == 0.02 and Settings().alpha == 0.01


def test_verdict_rows_are_a_dataframe_with_numbers(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, seed_data=1)])
    rows = compare(base, cand).rows
    assert isinstance(rows, pd.DataFrame) and set(rows.metric) == {"tpot_ms", "ttft_ms"}
    for col in ("base", "cand", "change", "p_value", "base_ci_low", "cand_ci_high", "n_base", "threshold"):
        assert np.isfinite(rows[col].astype(float)).all(), col


# --- points timed in turns: paired by round ------------------------------------------------------------------


def _drifting(n: int, seed: int) -> np.ndarray:
    """The machine's speed per round: wanders by a factor of two, as a shared VM's does over seconds."""
    rng = np.random.default_rng(seed)
    return np.exp(np.cumsum(rng.normal(0, 0.15, n))).clip(0.5, 2.0)


def test_paired_rounds_see_through_drift_that_hides_a_slowdown_from_unpaired_tests():
    rng = np.random.default_rng(7)
    speed = _drifting(20, 3)
    base = 2.0 * speed * rng.lognormal(0, 0.02, 20)
    slow = 2.2 * speed * rng.lognormal(0, 0.02, 20)  # 10% slower in every round
    same = 2.0 * speed * rng.lognormal(0, 0.02, 20)
    unpaired = decide_samples(base, slow, higher_is_better=False, threshold=0.05)
    assert unpaired.verdict == UNKNOWN  # drift swamps the slowdown for any test on independent samples
    assert "inconclusive" in unpaired.reason
    v = decide_paired(base, slow, higher_is_better=False, threshold=0.05)
    assert v.verdict == REGRESSION and v.mode == "paired" and 0.08 < v.change < 0.12
    assert "paired by round" in v.reason
    assert decide_paired(base, same, higher_is_better=False, threshold=0.05).verdict == NO_CHANGE
    faster = decide_paired(slow, base, higher_is_better=False, threshold=0.05)
    assert faster.verdict == IMPROVEMENT


def test_paired_aa_false_alarms_stay_under_one_percent_and_small_changes_are_no_change():
    alarms = 0
    for trial in range(300):
        rng = np.random.default_rng(trial)
        speed = _drifting(20, 1000 + trial)
        x, y = (2.0 * speed * rng.lognormal(0, 0.05, 20) for _ in range(2))
        alarms += decide_paired(x, y, higher_is_better=False, threshold=0.05).verdict == REGRESSION
    assert alarms / 300 <= 0.01
    rng = np.random.default_rng(1)
    x = 2.0 * rng.lognormal(0, 0.01, 30)
    v = decide_paired(x, x * 1.02, higher_is_better=False, threshold=0.05)
    assert v.verdict == NO_CHANGE and "within" in v.reason  # significant, but under the minimum change
    assert decide_paired(x[:3], x[:3], False, 0.05).verdict == UNKNOWN


def test_compare_pairs_only_points_timed_in_the_same_rounds(tmp_path, synthetic_point):
    speed = _drifting(20, 5)
    rng = np.random.default_rng(2)
    tpot_a, tpot_c = list(2.0 * speed * rng.lognormal(0, 0.02, 20)), list(2.2 * speed * rng.lognormal(0, 0.02, 20))
    ttft = list(10 * speed)
    match = Settings(match=("model", "batch_size", "prompt_len", "gen_len"))
    for turns, expected, mode in (("t1", REGRESSION, "paired"), (None, UNKNOWN, "samples")):
        base = write_side(tmp_path / str(turns), "a", synthetic_point, [dict(tpot=tpot_a, ttft=ttft, turns_id=turns)])
        cand = write_side(tmp_path / str(turns), "c", synthetic_point,
                     [dict(tpot=tpot_c, ttft=ttft, variant="slowed", turns_id=turns)])  # fmt: skip
        rows = compare(base, cand, match).rows.set_index("metric")
        assert rows.loc["tpot_ms", "verdict"] == expected and rows.loc["tpot_ms", "mode"] == mode


def test_list_valued_match_columns_and_the_latest_of_re_run_points(tmp_path, synthetic_point):
    """Matching on a list-valued engine parameter compares its text; of two records of one point, the latest is
    compared."""
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0), point_samples(2.0, batch_size=2)])
    cand = write_side(
        tmp_path, "cand", synthetic_point, [point_samples(2.0, seed_data=1), point_samples(2.0, batch_size=2)]
    )
    for df in (base, cand):
        df["layers"] = [[0, 1], [0, 1]]
    result = compare(base, cand, Settings(match=("layers", "batch_size")))
    assert sorted(result.points.key) == ["[0, 1] | 1", "[0, 1] | 2"]
    rerun = write_side(
        tmp_path, "rerun", synthetic_point, [point_samples(3.0, seed_data=2), point_samples(3.0, batch_size=2)]
    )
    rerun["layers"] = [[0, 1], [0, 1]]
    dup = pd.concat([rerun.assign(started_at="2099-01-01T00:00:00"), cand], ignore_index=True)
    result = compare(base, dup, Settings(match=("layers", "batch_size")))
    assert len(result.points) == 2 and any("records share 2 match key(s)" in n for n in result.notes)
    assert set(result.points.verdict) == {REGRESSION}  # the latest records (the slower re-run) are compared
