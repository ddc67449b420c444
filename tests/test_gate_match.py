"""Which points the gate compares: a point whose key changed but whose readable identity did not is paired and
gated (never silently dropped), distinct points that share a --match key are refused, labels tell apart thread
counts and model shapes, and re-runs collapse to the latest by time, not by text."""

from __future__ import annotations

import pandas as pd
import pytest
from gate_points import point_samples, rekey, write_side

from harness.export import read_points
from harness.gate import NO_CHANGE, REGRESSION, compare
from harness.gate_match import point_labels
from harness.gate_settings import GateInputError, Settings

WORKLOAD = ("model", "batch_size", "prompt_len", "gen_len")


def test_a_point_whose_key_changed_is_paired_by_identity_and_gated(run_harness, tmp_path, synthetic_point, capsys):
    """CAND's engine gained a parameter at its default (the variant label is unchanged, the key is not), and that
    point is 30% slower: a regression with a note, not "only in BASE" + "only in CAND" and exit 0."""
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0), point_samples(2.0, batch_size=2)])
    write_side(tmp_path, "cand", synthetic_point,
               [point_samples(2.6, seed_data=1), point_samples(2.0, batch_size=2, seed_data=1)])  # fmt: skip
    old = read_points(tmp_path / "cand").set_index("batch_size").loc[1, "point_key"]
    new = rekey(tmp_path / "cand" / "0", engine_params={"new_knob": None})["point_key"]
    assert new != old
    result = compare(read_points(tmp_path / "base"), read_points(tmp_path / "cand"))
    assert result.base_only.empty and result.cand_only.empty
    rows = result.rows.set_index(["label", "metric"])
    tpot = rows.loc[("eager · tiny · b1", "tpot_ms")]
    assert tpot["verdict"] == REGRESSION and 0.25 < tpot["change"] < 0.35
    assert tpot["reason"].endswith(f"; point key changed ({old[:8]} -> {new[:8]})")
    assert f"point key changed: eager · tiny · b1 ({old[:8]} in BASE, {new[:8]} in CAND)" in result.notes[0]
    assert run_harness("compare", str(tmp_path / "base"), str(tmp_path / "cand")) == 1
    assert "point key changed" in capsys.readouterr().out


def test_twins_that_cannot_be_paired_soundly_are_refused(tmp_path, synthetic_point):
    """Two BASE points that differ only where the label cannot show it, both re-keyed in CAND: exit 2 naming them."""
    write_side(tmp_path, "base", synthetic_point, [point_samples(2.0), point_samples(2.0)])
    rekey(tmp_path / "base" / "1", engine_params={"hidden": 1})
    write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0), point_samples(2.0)])
    rekey(tmp_path / "cand" / "0", engine_params={"hidden": 2})
    rekey(tmp_path / "cand" / "1", engine_params={"hidden": 3})
    base, cand = read_points(tmp_path / "base"), read_points(tmp_path / "cand")
    with pytest.raises(GateInputError, match=r"point key changed for eager · tiny · b1 · [0-9a-f]{8}: 2 BASE and 2 "
                                             "CAND point"):  # fmt: skip
        compare(base, cand)


def test_distinct_points_sharing_a_match_key_are_refused(tmp_path, synthetic_point):
    """--match on the workload with eager and quantized on both sides: comparing "the latest" of each side would
    gate eager against quantized."""
    side = [point_samples(2.0, variant="eager"), point_samples(2.0, variant="quantized(scheme=int8)")]
    base = write_side(tmp_path, "base", synthetic_point, side)
    cand = write_side(tmp_path, "cand", synthetic_point, side)
    with pytest.raises(GateInputError) as err:
        compare(base, cand, Settings(match=WORKLOAD))
    message = str(err.value)
    assert message.startswith("BASE: distinct points share the match key 'tiny | 1 | 16 | 4' of --match model,")
    assert "eager · tiny · b1, quantized(scheme=int8) · tiny · b1" in message and "(e.g. variant)" in message
    assert len(compare(base, cand, Settings(match=(*WORKLOAD, "variant"))).points) == 2


def test_two_variants_compared_on_purpose_are_labelled_base_to_cand(tmp_path, synthetic_point):
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    cand = write_side(tmp_path, "cand", synthetic_point, [point_samples(2.0, variant="compiled", seed_data=1)])
    result = compare(base, cand, Settings(match=WORKLOAD))
    assert result.points.label.tolist() == ["eager · tiny · b1 → compiled · tiny · b1"]
    assert result.points.verdict.tolist() == [NO_CHANGE]


def test_re_runs_collapse_to_the_latest_by_time_not_text(tmp_path, synthetic_point):
    """12:00+00:00 is later than 13:00+02:00 (11:00 UTC), though it sorts first as text."""
    base = write_side(tmp_path, "base", synthetic_point, [point_samples(2.0)])
    slow = write_side(tmp_path, "slow", synthetic_point, [point_samples(3.0, seed_data=2)])
    fast = write_side(tmp_path, "fast", synthetic_point, [point_samples(2.0, seed_data=1)])
    cand = pd.concat([slow.assign(started_at="2026-11-23T12:00:00+00:00"),
                      fast.assign(started_at="2026-11-23T13:00:00+02:00")], ignore_index=True)  # fmt: skip
    result = compare(base, cand)
    assert result.points.verdict.tolist() == [REGRESSION]  # the slow one is the latest
    assert any("re-runs of one point" in n for n in result.notes)


def test_labels_name_thread_counts_and_model_shapes_and_fall_back_to_the_key(tmp_path, synthetic_point):
    pts = [point_samples(2.0) for _ in range(4)]
    df = write_side(tmp_path, "s", synthetic_point, pts)
    rekey(tmp_path / "s" / "1", env={"torch_threads": 2}, threads=2)
    rekey(tmp_path / "s" / "0", env={"torch_threads": 1}, threads=1)
    rekey(tmp_path / "s" / "2", env={"torch_threads": 1}, threads=1, model_args={"dim": 128})
    rekey(tmp_path / "s" / "3", env={"torch_threads": 1}, threads=1, engine_params={"hidden": 1})
    df = read_points(tmp_path / "s").sort_values("record_path").reset_index(drop=True)
    labels = point_labels(df).tolist()
    keys = df["point_key"].str[:8].tolist()
    assert labels[1] == "eager · tiny · b1 · 2 threads · dim 64"
    assert labels[2] == "eager · tiny · b1 · 1 thread · dim 128"
    # 0 and 3 differ only in a parameter no label shows: their keys tell them apart
    assert labels[0] == f"eager · tiny · b1 · 1 thread · dim 64 · {keys[0]}"
    assert labels[3] == f"eager · tiny · b1 · 1 thread · dim 64 · {keys[3]}"
    assert len(set(labels)) == 4
