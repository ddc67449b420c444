"""How often a whole comparison fails on noise, with and without ``--correction holm``, and what Holm costs.

A gate over many points runs many tests: the CI job fails when any one is flagged. This simulates comparisons of
``--points`` points x 2 metrics with the gate's own decision functions (``harness.gate.decide_samples``, or
``decide_paired`` for points timed in turns, whose rounds share a drifting machine speed) on log-normal samples
with outliers, and prints, per noise level: the fraction of same-code (A/A) comparisons that flag anything, and
the fraction of tests that catch a ``--slowdown`` applied to every candidate, without correction and with Holm.

    python benchmarks/gate_multiplicity.py [--runs 60] [--samples 20] [--points 48] [--slowdown 0.10]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from harness.gate import REGRESSION, decide_paired, decide_samples, holm

# (log-normal spread, fraction of outliers 2-4x slower)
NOISE = {"typical": (0.03, 0.02), "noisy": (0.08, 0.05), "heavy-tailed": (0.05, 0.15)}


def samples(rng: np.random.Generator, spread: float, outliers: float, n: int) -> np.ndarray:
    x = 10 * np.exp(rng.normal(0, spread, n))
    return np.where(rng.random(n) < outliers, x * rng.uniform(2, 4, n), x)


def drift(rng: np.random.Generator, n: int) -> np.ndarray:
    """The machine's speed from round to round: a random walk of 15% steps, within 0.5x-2x."""
    return np.exp(np.cumsum(rng.normal(0, 0.15, n))).clip(0.5, 2.0)


def comparison(rng, mode: str, noise: str, n: int, tests: int, slow: float) -> tuple[int, int]:
    """Regressions flagged in one simulated comparison of ``tests`` tests: without correction, and with Holm over
    the same samples."""
    spread, outliers = NOISE[noise]
    verdicts = []
    for _ in range(tests):
        if mode == "paired":
            d = drift(rng, n)
            base, cand = d * samples(rng, spread, outliers, n), slow * d * samples(rng, spread, outliers, n)
            verdicts.append(decide_paired(base, cand, False, 0.05))
        else:
            base, cand = samples(rng, spread, outliers, n), slow * samples(rng, spread, outliers, n)
            verdicts.append(decide_samples(base, cand, False, 0.05))
    plain = sum(v.verdict == REGRESSION for v in verdicts)
    holm(verdicts, 0.01)
    return plain, sum(v.verdict == REGRESSION for v in verdicts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60, help="simulated comparisons per cell")
    ap.add_argument("--samples", type=int, default=20, help="samples a side (paired: rounds)")
    ap.add_argument("--points", type=int, default=48, help="points per comparison (2 metrics each)")
    ap.add_argument("--slowdown", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=9)
    opts = ap.parse_args()
    warnings.simplefilter("ignore")  # scipy's notes on ties and small samples
    rng = np.random.default_rng(opts.seed)
    tests = 2 * opts.points
    print(f"{opts.runs} comparisons of {tests} tests each, {opts.samples} samples a side, alpha 0.01, threshold 5%")
    print("| noise | mode | A/A runs failed, none / holm | "
          f"+{opts.slowdown:.0%} tests caught, none / holm |\n|---|---|---|---|")  # fmt: skip
    for mode in ("unpaired", "paired"):
        for noise in NOISE:
            aa = np.array([comparison(rng, mode, noise, opts.samples, tests, 1.0) for _ in range(opts.runs)])
            slow = np.array([comparison(rng, mode, noise, opts.samples, tests, 1 + opts.slowdown)
                             for _ in range(opts.runs)])  # fmt: skip
            failed = dict(zip(("none", "holm"), (aa > 0).mean(0), strict=True))
            caught = dict(zip(("none", "holm"), slow.sum(0) / (tests * opts.runs), strict=True))
            print(f"| {noise} | {mode} | {failed['none']:.1%} / {failed['holm']:.1%} | "
                  f"{caught['none']:.1%} / {caught['holm']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
