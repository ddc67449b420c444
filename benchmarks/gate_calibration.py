"""Calibration of the CI gate on this machine: its false-alarm rate on two independent measurements of the same
code (A/A) and its detection rate for a real 10% slowdown. Prints both rates and the slowdown as measured.

48 distinct points of the random-weight `tiny` (batch 1/2/4 x prompt 8/16/24/32 x seed 0-3; 40 to 60 is
"many points"), each measured three times by the `slowed-test` engine (tests/conftest.py): twice with
``engine.slowdown=0`` (A and B: the same code) and once with ``engine.slowdown=0.1`` (C: 10% more measured
work in every forward). The gate runs with its defaults (TTFT and TPOT; U test at alpha 0.01, 5% minimum
change, non-overlapping 95% CIs of the medians; for sides timed in turns, their paired versions: signed-rank
test on per-round ratios, the median ratio's CI excluding 1): A/A compares A with B, the slowdown compares A with C
(matched on the workload, since the variant differs). Targets: A/A flags at most 1% of points, the slowdown at
least 95%.

How the three sides are measured (``--mode``), from the least to the most exposed to drift of the machine:

* ``turns`` (default): one sweep under ``hydra/launcher=interleaved``; A, B and C of a workload are timed in
  turns, one repetition each per round, so drift over seconds lands on all three alike;
* ``points``: one sweep with the basic launcher; A, C and B of a workload run back to back, each in its own
  timing window (seconds apart);
* ``sweeps``: three whole sweeps one after the other, as a gate against a stored baseline sees them.

    python benchmarks/gate_calibration.py [--reps 20] [--max-reps 60] [--gen-len 8] [--mode turns|points|sweeps]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
POINTS = ("workload.batch_size=1,2,4", "workload.prompt_len=8,16,24,32", "seed=0,1,2,3")
N_POINTS = 48
WORKLOAD = ("model", "batch_size", "prompt_len", "gen_len", "decoding", "num_beams", "device", "dtype", "seed")
SLOWDOWN = 0.10
MODES = ("turns", "points", "sweeps")


def fixed_overrides(reps: int, gen_len: int, max_reps: int | None = None) -> list[str]:
    """At least ``reps`` repetitions a point; up to ``max_reps`` while a median's 95% CI is wider than +-2% (the
    harness's adaptive policy: a burst of noise on the machine buys more rounds, not a guess)."""
    max_reps = max(reps, max_reps or reps)
    target = "0.02" if max_reps > reps else "1e-9"
    return [
        "engine.name=slowed-test", "model=tiny", "model.weights=random", "quality.enabled=false",
        f"workload.gen_len={gen_len}", "measure=quick", f"measure.min_reps={reps}", f"measure.max_reps={max_reps}",
        "measure.max_time_s=120", f"measure.target_ci={target}",
    ]  # fmt: skip


@dataclass
class Calibration:
    aa: object  # harness.gate.GateResult of A vs B
    slow: object  # harness.gate.GateResult of A vs C
    tpot_ratio: pd.Series  # C over A, TPOT medians, per point
    ttft_ratio: pd.Series
    aa_tpot_ratio: pd.Series  # B over A
    seconds: float
    sides: tuple = ()  # the A, B and C tables, for re-gating with other settings

    @staticmethod
    def rate(result, verdict: str = "regression") -> float:
        return float(result.points["verdict"].eq(verdict).mean())

    def summary(self) -> str:
        def spread(s: pd.Series) -> str:
            return f"x{np.median(s):.3f} [{s.min():.3f}, {s.max():.3f}]"

        return (
            f"gate calibration, {len(self.aa.points)} points: A/A flagged {self.rate(self.aa):.1%} as regressions "
            f"({self.rate(self.aa, 'improvement'):.1%} as improvements); the {SLOWDOWN:.0%} slowdown flagged "
            f"{self.rate(self.slow):.1%}\n"
            f"  slowdown as measured (C/A medians, median [min, max] over points): TPOT {spread(self.tpot_ratio)}, "
            f"TTFT {spread(self.ttft_ratio)}; A/A TPOT B/A {spread(self.aa_tpot_ratio)}; {self.seconds:.0f} s"
        )


Runner = Callable[..., int]


def _split_interleaved(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A, B and C from one sweep whose jobs are A, C, B per point (A and B share a point key)."""
    df = df.sort_values("job")
    slow = df["engine.slowdown"].astype(float) > 0
    base = df[~slow]
    first = ~base.duplicated("point_key", keep="first")
    return base[first], base[~first], df[slow]


def calibrate(
    run: Runner, out: Path, reps: int = 20, gen_len: int = 8, mode: str = "turns", max_reps: int = 60
) -> Calibration:
    """Measure the three sides with ``run`` (``harness.cli.main``-like: a list of arguments, an exit code)
    and gate them."""
    from harness.export import read_points
    from harness.gate import compare
    from harness.gate_settings import Settings

    fixed = fixed_overrides(reps, gen_len, max_reps)
    t0 = time.perf_counter()

    def sweep(directory: Path, extra: Sequence[str]) -> pd.DataFrame:
        code = run(["run", "-m", *fixed, *POINTS, *extra, f"hydra.sweep.dir={directory}"])
        if code != 0:
            raise RuntimeError(f"calibration sweep failed with exit code {code}: {directory}")
        df = read_points(directory)
        if not df["status"].eq("ok").all():
            raise RuntimeError(f"calibration sweep has failed points: {directory}")
        return df

    if mode not in MODES:
        raise ValueError(f"mode: '{mode}' is not one of {', '.join(MODES)}")
    if mode == "sweeps":
        a = sweep(out / "a", ["+engine.slowdown=0.0"])
        b = sweep(out / "b", ["+engine.slowdown=0.0"])
        c = sweep(out / "c", [f"+engine.slowdown={SLOWDOWN}"])
    else:
        launcher = ["hydra/launcher=interleaved"] if mode == "turns" else []
        a, b, c = _split_interleaved(sweep(out / "abc", [f"+engine.slowdown=0.0,{SLOWDOWN},0.0", *launcher]))
    seconds = time.perf_counter() - t0
    assert len(a) == len(b) == len(c) == N_POINTS, (len(a), len(b), len(c))
    aa = compare(a, b, Settings())
    slow = compare(a, c, Settings(match=WORKLOAD))
    ac = a.merge(c, on=list(WORKLOAD), suffixes=("_a", "_c"))
    ab = a.merge(b, on="point_key", suffixes=("_a", "_b"))
    return Calibration(
        aa, slow, ac.tpot_ms_p50_c / ac.tpot_ms_p50_a, ac.ttft_ms_p50_c / ac.ttft_ms_p50_a,
        ab.tpot_ms_p50_b / ab.tpot_ms_p50_a, seconds, (a, b, c),
    )  # fmt: skip


def register_test_engines() -> None:
    """The `slowed-test` engine lives with the tests (it is not a product engine)."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  (registers failing-test, unranked-test, slowed-test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="least repetitions per point (default 20)")
    ap.add_argument("--max-reps", type=int, default=60, help="most, while a CI is wider than +-2%% (default 60)")
    ap.add_argument("--gen-len", type=int, default=8, help="generated tokens per repetition (default 8)")
    ap.add_argument("--mode", choices=MODES, default="turns", help="how the sides are measured (default: turns)")
    ap.add_argument("--keep", type=Path, help="write the sweeps here (default: a temporary directory)")
    opts = ap.parse_args()
    register_test_engines()
    from harness.cli import main as harness_main

    with tempfile.TemporaryDirectory() as tmp:
        out = opts.keep or Path(tmp)
        quiet = lambda args: _quietly(harness_main, args)
        cal = calibrate(quiet, out, opts.reps, opts.gen_len, opts.mode, opts.max_reps)
    print(f"mode: {opts.mode}")
    print(cal.summary())
    print(noise_floor(cal))
    print(details(cal))


def noise_floor(cal: Calibration, target: float = 0.01) -> str:
    """The smallest minimum-change threshold that keeps this machine's A/A false alarms at ``target``, and the
    detection rate of the slowdown at that threshold: what the gate can promise here, in one line.

    A gate only sees the samples of each side; drift of the machine between the two measurements (seconds
    apart) is invisible to any test on them, so on a machine that drifts the threshold must cover the drift.
    """
    from harness.gate import compare
    from harness.gate_settings import Settings, Thresholds

    a, b, c = cal.sides
    for threshold in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0):
        settings = Settings(thresholds=Thresholds(default=threshold))
        if Calibration.rate(compare(a, b, settings)) <= target:
            hit = Calibration.rate(compare(a, c, Settings(thresholds=Thresholds(default=threshold), match=WORKLOAD)))
            return (
                f"  noise floor: A/A stays at or under {target:.0%} false alarms from a {threshold:.0%} minimum change "
                f"(--threshold {threshold}); at that threshold the {SLOWDOWN:.0%} slowdown is flagged {hit:.1%}"
            )
    return f"  noise floor: A/A false alarms stay above {target:.0%} even at a 100% minimum change"


def details(cal: Calibration, limit: int = 10) -> str:
    """The A/A false alarms and the slowed points the gate missed, with the gate's reasons."""
    false_alarms = cal.aa.rows[cal.aa.rows.verdict == "regression"]
    missed_keys = cal.slow.points.loc[cal.slow.points.verdict != "regression", "key"]
    missed = cal.slow.rows[cal.slow.rows.key.isin(missed_keys)]
    lines = [f"  A/A false alarm: {r.label} {r.metric}: {r.reason}" for r in false_alarms.head(limit).itertuples()]
    lines += [
        f"  slowdown missed: {r.label} {r.metric}: {r.verdict}: {r.reason}" for r in missed.head(limit).itertuples()
    ]
    return "\n".join(lines)


def _quietly(fn: Callable[[list[str]], int], args: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(args)


if __name__ == "__main__":
    main()
