"""`harness compare --history DB`: between separate runs, a timed change must exceed 3x the point's run-to-run
spread of medians over its stored sweeps (same point key and environment), as well as the threshold."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from gate_points import noisy_samples, point_samples, write_side

from harness.gate import NO_CHANGE, REGRESSION, compare
from harness.gate_noise import Noise, load_noise, spread_of
from harness.gate_settings import Settings

LEVELS = (1.0, 1.06, 0.95, 1.03, 0.97)  # one point's median over five stored sweeps: log sd 0.044


def _history(tmp_path, synthetic_point, run_harness):
    db = tmp_path / "history.sqlite"
    for i, level in enumerate(LEVELS):
        d = tmp_path / "history" / f"sweep-{i}"
        synthetic_point(d / "0", tpot=noisy_samples(2.0 * level, seed=i), ttft=noisy_samples(10.0 * level, seed=i))
        assert run_harness("history", "add", str(d), "--db", str(db)) == 0
    return db


def test_the_spread_of_stored_medians_raises_the_threshold_of_unpaired_timings(tmp_path, synthetic_point,
                                                                               run_harness, capsys):  # fmt: skip
    db = _history(tmp_path, synthetic_point, run_harness)
    noise = load_noise(db)
    sigma, n = next(iter(v for k, v in noise.spread.items() if k[2] == "tpot_ms"))
    assert n == 5 and math.isclose(sigma, np.std(np.log(LEVELS), ddof=1), rel_tol=0.05)  # 0.044
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.2, seed_data=1)])  # +10%, CIs apart
    metrics = Settings(metrics=("tpot_ms",))
    assert compare(base, cand, metrics).rows.verdict.tolist() == [REGRESSION]  # within-run noise only
    held = Settings(metrics=("tpot_ms",), history=str(db))
    row = compare(base, cand, held, noise).rows.iloc[0]
    floor = math.expm1(3 * sigma)  # 14%: run-to-run drift of this point covers a 10% change
    assert row["verdict"] == NO_CHANGE and math.isclose(row["threshold"], floor) and 0.12 < floor < 0.16
    assert f"threshold 5.0% raised to {floor:.1%}: 3x the run-to-run spread of medians" in row["reason"]
    assert "over 5 stored sweeps" in row["reason"]
    slow = write_side(tmp_path, "slow", synthetic_point, [point_samples(2.6, seed_data=1)])  # +30%: beyond it
    assert compare(base, slow, held, noise).rows.verdict.tolist() == [REGRESSION]
    capsys.readouterr()
    assert run_harness("compare", str(tmp_path / "base"), str(tmp_path / "cand"), "--history", str(db)) == 0
    assert run_harness("compare", str(tmp_path / "base"), str(tmp_path / "cand")) == 1


def test_points_timed_in_turns_and_short_histories_keep_the_threshold(tmp_path, synthetic_point):
    """Paired rounds cancel drift between runs: the history does not apply; nor with under 3 stored sweeps."""
    key = ("k", "env-a", "tpot_ms")
    noise = Noise({key: (0.2, 5)})
    base = write_side(tmp_path, "a", synthetic_point, [dict(point_samples(2.0), turns_id="t1")])
    cand = write_side(tmp_path, "c", synthetic_point, [dict(point_samples(2.4), variant="x", turns_id="t1")])
    base["point_key"] = "k"
    match = ("model", "batch_size", "prompt_len", "gen_len")
    row = compare(base, cand, Settings(metrics=("tpot_ms",), match=match), noise).rows.iloc[0]
    assert row["mode"] == "paired" and row["threshold"] == 0.05 and row["verdict"] == REGRESSION
    two = pd.DataFrame({"status": "ok", "timing_representative": True, "point_key": "k", "fingerprint": "env-a",
                        "sweep_started_at": ["a", "b"], "samples.tpot_ms": [[1.0], [1.2]]})  # fmt: skip
    assert spread_of(two) == {}


def test_a_missing_history_is_one_line_exit_2(tmp_path, synthetic_point, run_harness, capsys):
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    assert run_harness("compare", str(tmp_path / "base"), str(tmp_path / "base"), "--history",
                       str(tmp_path / "none.sqlite")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("harness compare: error: --history: ") and "no history database" in err
