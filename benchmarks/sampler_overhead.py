"""Sampler overhead: decode TPOT with the utilization sampler on vs off, in turns in one run.

The sampler is a background thread that wakes every ``interval`` seconds to read /proc (and NVML on GPUs); it
must not slow what it watches (target: within 1.02). For each model the workload of `harness run` (prompt 128,
32 new tokens, batch 1) is timed in rounds, each with the sampler off and on in alternating order, so a machine
whose speed drifts does not favour either setting. Printed per model: the median TPOT of each setting, the median
of the per-round on/off ratios with its interquartile range, and the samples taken per round.

    python benchmarks/sampler_overhead.py [--model tiny small] [--structured 0.5] [--threads 2]
                                          [--rounds 8] [--seconds 4] [--interval 0.05]

``--structured S`` adds, for each model, its structurally pruned shape at sparsity S (``first_of_width``): a
shorter step with the same ops, where a fixed cost per wake weighs more.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import numpy as np
import torch

from engines.generate import greedy
from engines.llama import Transformer
from engines.surgery import first_of_width
from harness.env import enable_huge_pages
from harness.monitor import Sampler
from harness.paths import model_shape
from harness.timing import HostClock, Policy, repeat

PROMPT_LEN, GEN_LEN = 128, 32  # configs/workload/default.yaml


def tpot_ms(model: Transformer, seconds: float, sampler: Sampler | None) -> float:
    """Median TPOT of greedy generations repeated for ``seconds``, with ``sampler`` running over them."""
    clock = HostClock()
    prompt = torch.randint(1, model.args.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))

    def rep(_: int) -> dict[str, float]:
        greedy(model, prompt, GEN_LEN, clock)
        return {"tpot_ms": float(np.mean(clock.intervals_ms()[1:]))}

    policy = Policy(name="bench", warmup_iters=1, warmup_s=0.2, min_reps=3, max_reps=10**6, max_time_s=seconds,
                    target_ci=1e-9)  # fmt: skip
    res = repeat(rep, policy, ("tpot_ms",), timed_window=lambda: sampler or nullcontext())
    return statistics.median(res.samples["tpot_ms"])


def models(names: list[str], structured: float | None) -> dict[str, Transformer]:
    out = {}
    for name in names:
        model = Transformer.build(model_shape(name), seed=0)
        out[name] = model
        if structured is not None:
            out[f"{name} structured {structured:g}"] = first_of_width(model, 1 - structured)
    for model in out.values():
        model.setup_caches(1, PROMPT_LEN + GEN_LEN)
    return out


def compare(model: Transformer, rounds: int, seconds: float, interval: float) -> dict[str, float]:
    """Per round, TPOT off and on (off first in even rounds); the medians and the per-round on/off ratios."""
    off, on, ratios, samples = [], [], [], []
    for r in range(rounds):
        row = {}
        for sampling in (False, True) if r % 2 == 0 else (True, False):
            sampler = Sampler(torch.device("cpu"), interval) if sampling else None
            row[sampling] = tpot_ms(model, seconds, sampler)
            if sampler is not None:
                samples.append(sampler.result(tokens=1)["n_samples"])
        off.append(row[False])
        on.append(row[True])
        ratios.append(row[True] / row[False])
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"off": statistics.median(off), "on": statistics.median(on), "ratio": statistics.median(ratios),
            "q1": float(q1), "q3": float(q3), "samples": statistics.median(samples)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["tiny", "small"], help="named shapes (configs/model)")
    ap.add_argument("--structured", type=float, help="also time each model structurally pruned at this sparsity")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per round and setting")
    ap.add_argument("--interval", type=float, default=0.05, help="sampler interval (s)")
    opts = ap.parse_args(argv)
    enable_huge_pages()  # as `harness run` does, before any model is built
    if opts.threads:
        torch.set_num_threads(opts.threads)
    built = models(opts.model, opts.structured)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sampler interval {opts.interval} s, "
          f"{opts.rounds} rounds of {opts.seconds:g} s per setting")  # fmt: skip
    print(f"{'model':<26} {'TPOT off ms':>12} {'TPOT on ms':>11} {'on/off':>7} {'IQR':>13} {'samples/round':>14}")
    for name, model in built.items():
        c = compare(model, opts.rounds, opts.seconds, opts.interval)
        print(f"{name:<26} {c['off']:>12.4f} {c['on']:>11.4f} {c['ratio']:>7.3f} "
              f"{c['q1']:>6.3f}-{c['q3']:<6.3f} {c['samples']:>14.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
