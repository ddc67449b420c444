"""Where a decode step's time goes: the linear layers, and the work between them, for eager and for a structurally
pruned model of the same shape, timed in turns in one process.

Structured pruning at 0.5 reads about 1.8x fewer bytes a step than eager on `medium`, yet its TPOT ratio is lower.
torch.profiler cannot say why: its cost per op inflates exactly the small ops in question. Here only the linears
are wrapped (two perf_counter_ns reads each), so "between linears" is what the norms, RoPE, the KV-cache writes,
attention and the framework cost inside a real step. The pruned model keeps every one of those ops, and each
linear before them has just streamed megabytes of weights through the caches, so they run cold. The printout
splits each model's step into linears (with GB/s per shape) and the time between them.

    python benchmarks/decode_breakdown.py [--model medium] [--sparsity 0.5] [--threads 1 2] [--rounds 6] [--resident]
                                          [--fused]

``--resident`` adds a third model that runs the same ops with weights that stay in the caches: every block is
one block (its FFN 64 channels wide) and the head has 256 rows. Its "between linears" is what those ops cost
when nothing has evicted them: the framework's part, apart from cache misses.

``--fused`` adds both models with each block's q/k/v projections concatenated into one matrix and w1/w3 into
another (gpt-fast's ``wqkv``; four linears a block instead of seven, fewer and larger products, one RoPE input),
and prints their comparison too: whether fewer calls close the gap between the bytes ratio and the TPOT ratio.

The pruned model is ``engines.surgery.first_of_width``, with the first KV groups and FFN channels kept: the
shapes of ``engine=pruned engine.method=structured`` without calibrating (which ones are kept does not change
the time).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.llama import Attention, FeedForward, Transformer, rotate_pairs
from engines.surgery import first_of_width
from harness.env import enable_huge_pages, huge_pages
from harness.paths import model_shape

STEPS = 8  # decode steps per turn


class LinearClock:
    """Wall-clock time of every nn.Linear call, by weight shape, and of the gaps between consecutive calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], int, int]] = []
        self._forward = torch.nn.Linear.forward

    def __enter__(self) -> LinearClock:
        forward, calls = self._forward, self.calls

        def timed(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter_ns()
            y = forward(module, x)
            calls.append((tuple(module.weight.shape), t0, time.perf_counter_ns()))
            return y

        torch.nn.Linear.forward = timed
        return self

    def __exit__(self, *exc: object) -> None:
        torch.nn.Linear.forward = self._forward


def step_parts(model: Transformer, clock: LinearClock, tokens: torch.Tensor, start: int) -> dict[str, float]:
    """Median over STEPS decode steps of: the step, the linears (total and per shape, ms) and between them."""
    parts: dict[str, list[float]] = defaultdict(list)
    for i in range(STEPS):
        clock.calls.clear()
        t0 = time.perf_counter_ns()
        model(tokens, torch.tensor([start + i]))
        total = time.perf_counter_ns() - t0
        per_shape: dict[str, float] = defaultdict(float)
        for shape, a, b in clock.calls:
            per_shape[f"{shape[0]}x{shape[1]}"] += (b - a) / 1e6
        linears = sum(per_shape.values())
        parts["step"].append(total / 1e6)
        parts["linears"].append(linears)
        parts["between linears"].append(total / 1e6 - linears)
        for name, ms in per_shape.items():
            parts[name].append(ms)
    return {k: float(np.median(v)) for k, v in parts.items()}


def linear_bytes(model: Transformer) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            out[f"{m.weight.shape[0]}x{m.weight.shape[1]}"] += m.weight.numel() * m.weight.element_size()
    return out


def resident_model(args) -> Transformer:
    """The eager step's ops (same dim, heads and layers) on weights small enough to stay cached: one block, with
    a 64-channel FFN, stands for every block, and the head has 256 rows. Its outputs mean nothing."""
    model = Transformer.build(dataclasses.replace(args, intermediate_size=64, vocab_size=256))
    model.layers = torch.nn.ModuleList([model.layers[0]] * args.n_layers)
    return model


class FusedAttention(Attention):
    """The reference attention with wq, wk and wv as one [q; k; v] matrix (built by ``fuse_projections``)."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        q = rotate_pairs(q.view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = rotate_pairs(k.view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        return self.wo(self.attend(q, k, v.view(b, s, self.n_kv_heads, self.head_dim), mask, input_pos))


class FusedFeedForward(FeedForward):
    """SwiGLU with w1 and w3 as one [w1; w3] matrix."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    weight = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    return out


def fuse_projections(model: Transformer) -> Transformer:
    """A copy of the model whose blocks run four linears instead of seven: [wq; wk; wv] and [w1; w3] stacked."""
    model = copy.deepcopy(model)
    for block in model.layers:
        a, f = block.attention, block.feed_forward
        a.split_sizes = [a.wq.out_features, a.wk.out_features, a.wv.out_features]
        a.wqkv = _stacked(a.wq, a.wk, a.wv)
        del a.wq, a.wk, a.wv
        a.__class__ = FusedAttention
        f.w13 = _stacked(f.w1, f.w3)
        del f.w1, f.w3
        f.__class__ = FusedFeedForward
    return model


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """The median of every part over one model's rounds."""
    return {k: float(np.median([row[k] for row in rows])) for k in rows[0]}


def paired_ratio(base: list[dict[str, float]], other: list[dict[str, float]]) -> float:
    """Median over rounds of base's step time over other's, each pair from the same round."""
    return float(np.median([a["step"] / b["step"] for a, b in zip(base, other, strict=True)]))


def compare(samples: dict, models: dict, base: str, other: str) -> None:
    """Print one model's step against another's: medians of each part, the paired TPOT ratio, GB/s by shape."""
    med = {n: medians(samples[n]) for n in (base, other)}
    print(f"  {'ms a step':32s} {base:>24s} {other:>24s} {'ratio':>7s}")
    for key in ("step", "linears", "between linears"):
        print(f"  {key:32s} {med[base][key]:24.2f} {med[other][key]:24.2f} {med[base][key] / med[other][key]:7.3f}")
    ratio = paired_ratio(samples[base], samples[other])
    nbytes = {n: linear_bytes(models[n]) for n in (base, other)}
    print(f"  TPOT ratio (median of per-round ratios) x{ratio:.3f}; linear weight bytes "
          f"{sum(nbytes[base].values()) / sum(nbytes[other].values()):.3f}x fewer")  # fmt: skip
    for n in (base, other):
        shapes = [k for k in med[n] if "x" in k and k[0].isdigit()]
        rates = ", ".join(f"{k} {nbytes[n][k] / med[n][k] / 1e6:.1f}" for k in shapes)
        print(f"  {n} linears, GB/s by weight shape (out x in): {rates}")


def run(name: str, sparsity: float, threads: int, rounds: int, resident: bool = False, fused: bool = False) -> None:
    torch.set_num_threads(threads)
    args = model_shape(name)
    eager = Transformer.build(args)
    pruned = first_of_width(eager, 1 - sparsity)
    small = f"structured {sparsity:g}"
    models = {"eager": eager, small: pruned}
    if resident:
        models["eager ops, cached weights"] = resident_model(args)
    if fused:
        models["eager, fused"] = fuse_projections(eager)
        models[f"{small}, fused"] = fuse_projections(pruned)
    tokens = torch.randint(0, min(args.vocab_size, 256), (1, 1), generator=torch.Generator().manual_seed(0))
    start = 128
    for m in models.values():
        m.setup_caches(1, start + STEPS)
        for i in range(3):
            m(tokens, torch.tensor([i]))
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in models}
    with LinearClock() as clock:
        for r in range(rounds):
            for n in list(models)[:: 1 if r % 2 == 0 else -1]:
                samples[n].append(step_parts(models[n], clock, tokens, start))
    print(f"\n{name}, batch 1, {threads} thread(s), {rounds} rounds in turns of {STEPS} decode steps")
    compare(samples, models, "eager", small)
    if resident:
        r = medians(samples["eager ops, cached weights"])
        print(f"  {'eager ops on cached weights':32s} step {r['step']:.2f}, linears {r['linears']:.2f}, "
              f"between linears {r['between linears']:.2f}")  # fmt: skip
    if fused:
        print("  with fused projections ([wq; wk; wv] and [w1; w3]):")
        compare(samples, models, "eager, fused", f"{small}, fused")
        for n in ("eager", small):
            gain = paired_ratio(samples[n], samples[f"{n}, fused"])
            print(f"  {n}: unfused / fused step x{gain:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="medium", help="a named shape in configs/model (default medium)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--resident", action="store_true", help="also time the same ops on weights that stay cached")
    ap.add_argument("--fused", action="store_true", help="also time both models with q/k/v and w1/w3 stacked")
    opts = ap.parse_args()
    enable_huge_pages()  # as `harness run` does, before any model is built
    print(f"torch {torch.__version__}, huge pages in use: {huge_pages()['in_use']}")
    with torch.inference_mode():
        for threads in opts.threads:
            run(opts.model, opts.sparsity, threads, opts.rounds, opts.resident, opts.fused)


if __name__ == "__main__":
    main()
