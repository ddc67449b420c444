"""Timer honesty: the harness' median vs torch.utils.benchmark on the same workloads, in the same run.

For each CPU workload, the harness (one timed call per sample, timer cost subtracted) and
``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls, per-call mean per block) are run in
alternation, several rounds each, and the ratio of their medians is printed (target: within 0.95-1.05).
Also printed: the harness' per-sample timer overhead (what it subtracts) and what remains on an empty call.

    python benchmarks/timer_overhead.py [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.utils.benchmark as tub

from engines.generate import greedy
from engines.llama import ModelArgs, Transformer
from harness.timing import HostClock, Policy, measure_callable


def workloads() -> dict[str, callable]:
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    x = torch.randn(64, 1024)
    model = Transformer.build(ModelArgs(), seed=0)
    model.setup_caches(1, 64 + 8)
    prompt = torch.randint(1, 256, (1, 64))

    def decode():
        greedy(model, prompt, 8)

    return {
        "matmul 384x384 fp32": lambda: torch.mm(a, b),
        "softmax 64x1024": lambda: torch.softmax(x, dim=-1),
        "tiny model: prefill 64 + 8 tokens": decode,
    }


def harness_ms(fn, seconds: float) -> tuple[float, float]:
    """(median, mean) of the harness' per-call samples."""
    policy = Policy(
        name="bench", warmup_iters=3, warmup_s=0.2, min_reps=20, max_reps=1_000_000, max_time_s=seconds, target_ci=1e-9
    )
    reps, _ = measure_callable(fn, policy)
    return statistics.median(reps.samples["time_ms"]), statistics.fmean(reps.samples["time_ms"])


def torch_benchmark_median_ms(fn, seconds: float) -> float:
    timer = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per workload (default 5)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per round and tool (default 2)")
    opts = ap.parse_args()

    clock = HostClock()
    empty, _ = measure_callable(
        lambda: None, Policy(name="empty", min_reps=1000, max_reps=20_000, max_time_s=2, target_ci=1e-9, warmup_s=0.1)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"harness timer overhead per sample (subtracted): {clock.overhead_ns / 1e3:.3f} us")
    print(
        f"harness residual on an empty call (median after subtraction): "
        f"{statistics.median(empty.samples['time_ms']) * 1e3:.3f} us"
    )
    print()
    print(f"{'workload':<36} {'harness median':>15} {'harness mean':>13} {'torch.utils.benchmark':>22} {'ratio':>7}")
    ratios = []
    for name, fn in workloads().items():
        medians, means, theirs = [], [], []
        for _ in range(opts.rounds):
            med, mean = harness_ms(fn, opts.seconds)
            medians.append(med)
            means.append(mean)
            theirs.append(torch_benchmark_median_ms(fn, opts.seconds))
        h, t = statistics.median(medians), statistics.median(theirs)
        ratios.append(h / t)
        print(f"{name:<36} {h:>12.4f} ms {statistics.median(means):>10.4f} ms {t:>19.4f} ms {h / t:>7.3f}")
    inside = sum(0.95 <= r <= 1.05 for r in ratios)
    print(f"\nratio (harness median / torch.utils.benchmark median) within 0.95-1.05: {inside} of {len(ratios)}")
    print(
        "note: blocked_autorange's median is a median of per-block means, so a block carries any slow call it\n"
        "contains; the harness times each call, and its median drops those outliers. The two agree where calls\n"
        "are steady; on microsecond workloads with jittery calls compare the block figure with the harness mean."
    )


if __name__ == "__main__":
    main()
