"""Sampler overhead: decode TPOT with the utilization sampler on vs off, alternating in one run.

The sampler is a background thread that wakes every ``interval`` seconds to read /proc (and NVML on GPUs); it
must not slow what it watches. For each model the same generation is timed in rounds that alternate sampler
off / on, and the ratio of median TPOTs is printed (target: within 1.02).

    python benchmarks/sampler_overhead.py [--rounds 6] [--seconds 4] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import numpy as np
import torch

from engines.generate import greedy
from engines.llama import ModelArgs, Transformer
from harness.env import enable_huge_pages
from harness.monitor import Sampler
from harness.timing import HostClock, Policy, repeat

SHAPES = {
    "tiny (3M, 4 layers)": ModelArgs(),
    "small-like (dim 768, 12 layers)": ModelArgs(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                                                 intermediate_size=2048, max_seq_len=512),
}  # fmt: skip


def tpot_ms(model: Transformer, seconds: float, sampler: Sampler | None) -> float:
    clock = HostClock()
    model.setup_caches(1, 64 + 32)
    prompt = torch.randint(1, model.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))

    def rep(_: int) -> dict[str, float]:
        greedy(model, prompt, 32, clock)
        return {"tpot_ms": float(np.mean(clock.intervals_ms()[1:]))}

    policy = Policy(name="bench", warmup_iters=2, warmup_s=0.2, min_reps=5, max_reps=10**6, max_time_s=seconds,
                    target_ci=1e-9)  # fmt: skip
    res = repeat(rep, policy, ("tpot_ms",), timed_window=lambda: sampler or nullcontext())
    return statistics.median(res.samples["tpot_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per round and setting")
    ap.add_argument("--interval", type=float, default=0.05, help="sampler interval (s)")
    opts = ap.parse_args()
    enable_huge_pages()  # as `harness run` does, before any model is built
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sampler interval {opts.interval} s")
    print(f"{'model':<34} {'TPOT off ms':>12} {'TPOT on ms':>11} {'on/off':>7} {'samples/round':>14}")
    for name, args in SHAPES.items():
        model = Transformer.build(args, seed=0)
        off, on, n = [], [], []
        for _ in range(opts.rounds):
            off.append(tpot_ms(model, opts.seconds, None))
            sampler = Sampler(torch.device("cpu"), opts.interval)
            on.append(tpot_ms(model, opts.seconds, sampler))
            n.append(sampler.result(tokens=1)["n_samples"])
        a, b = statistics.median(off), statistics.median(on)
        print(f"{name:<34} {a:>12.4f} {b:>11.4f} {b / a:>7.3f} {statistics.median(n):>14.0f}")


if __name__ == "__main__":
    main()
