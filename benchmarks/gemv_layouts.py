"""Batch-1 GEMV speed by weight layout, for every linear shape of a model and of its structurally pruned twin:
``F.linear`` on the (out, in) weight that nn.Linear stores, against ``x @ w`` with the same weight stored
(in, out), timed in turns in one process on copies too large to stay in the caches.

A decode step at batch 1 streams each weight once, so a linear's time should be its bytes over the memory
bandwidth whatever its shape. On CPUs it is not: the BLAS kernel behind ``F.linear`` reads a matrix of short
rows (structured pruning's ``wo``, whose input is the kept heads) well below the bandwidth it reaches on square
ones, and the other layout can be faster still on wide outputs. This prints, per shape, the GB/s of each layout
and their speed ratio (median of per-round ratios), then what each model's linears would take per step with
nn.Linear's layout and with the faster one for every shape: the linears ratio of structured pruning over eager
that the kernels allow, beside the ratio of their bytes. Nothing here changes an engine; it says how much of a
gap between a pruned model's bytes and its speed is the GEMV kernel's.

    python benchmarks/gemv_layouts.py [--model medium] [--sparsity 0.5] [--threads 1 2] [--rounds 21]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from engines.llama import ModelArgs, Transformer
from engines.surgery import kept_width, shrunk_args
from harness.env import enable_huge_pages, huge_pages
from harness.paths import model_shape

COLD_BYTES = 128 << 20  # copies of a weight per layout: four times the last-level cache of these machines and more


def pruned_args(args: ModelArgs, sparsity: float) -> ModelArgs:
    """The shape ``engine=pruned engine.method=structured`` leaves at this sparsity (``first_of_width``'s)."""
    return shrunk_args(args, args.n_layers, *kept_width(args, 1 - sparsity))


def linear_shapes(args: ModelArgs) -> Counter[tuple[int, int]]:
    """(out, in) of every linear a decode step runs, with how many times (each module runs once a step), read
    from the model's modules built on the meta device: no weights are allocated."""
    with torch.device("meta"):
        model = Transformer(args)
    return Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))


class ShapeCopies:
    """Cold copies of one (out, in) fp32 weight in both layouts, and one batch-1 input."""

    def __init__(self, out: int, inp: int, cold_bytes: int) -> None:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out, inp, generator=gen)
        self.x = torch.randn(1, inp, generator=gen)
        self.copies = max(2, -(-cold_bytes // w.nbytes))
        self.rows = [w.clone() for _ in range(self.copies)]  # nn.Linear's layout: (out, in)
        self.cols = [w.t().contiguous() for _ in range(self.copies)]  # the same weight stored (in, out)
        self.max_abs_diff = float((F.linear(self.x, self.rows[0]) - self.x @ self.cols[0]).abs().max())
        self.linear()  # first touch: pages and the kernels' set-up
        self.stored_in_out()

    def linear(self) -> float:
        """Seconds per call of F.linear on the (out, in) copies."""
        t0 = time.perf_counter()
        for m in self.rows:
            F.linear(self.x, m)
        return (time.perf_counter() - t0) / self.copies

    def stored_in_out(self) -> float:
        """Seconds per call of x @ w on the (in, out) copies."""
        t0 = time.perf_counter()
        for m in self.cols:
            torch.mm(self.x, m)
        return (time.perf_counter() - t0) / self.copies


def measure(models: dict[str, ModelArgs], rounds: int, cold_bytes: int = COLD_BYTES) -> list[dict]:
    """One row per distinct shape of the models: its count in each model's step, its bytes, and each layout's
    seconds per call in every round. A round times every shape in both layouts (shapes and layouts in an order
    that reverses each round), so the rounds' step totals of the two models are paired as the shapes are."""
    counts = {name: linear_shapes(args) for name, args in models.items()}
    shapes = sorted({s for c in counts.values() for s in c}, key=lambda s: (-s[0] * s[1], s))
    weights = [ShapeCopies(out, inp, cold_bytes) for out, inp in shapes]
    times = [([], []) for _ in shapes]
    for r in range(rounds):
        order = range(len(shapes)) if r % 2 == 0 else reversed(range(len(shapes)))
        for i in order:
            runs = [(0, weights[i].linear), (1, weights[i].stored_in_out)]
            for layout, run in runs if r % 2 == 0 else runs[::-1]:
                times[i][layout].append(run())
    rows = []
    for (out, inp), w, (a, b) in zip(shapes, weights, times, strict=True):
        rows.append({"out": out, "in": inp, "bytes": out * inp * 4, "linear_rounds": a, "in_out_rounds": b,
                     "linear_s": float(np.median(a)), "in_out_s": float(np.median(b)),
                     "ratio": float(np.median(np.array(a) / np.array(b))), "max_abs_diff": w.max_abs_diff,
                     **{f"count_{n}": counts[n][(out, inp)] for n in models}})  # fmt: skip
    return rows


def step_linears(rows: list[dict], name: str) -> dict:
    """A step's linears of one model in every round, in seconds: with nn.Linear's layout (``linear``), and with
    the layout faster at the median for each shape (``best``); and their bytes."""
    n = [r[f"count_{name}"] for r in rows]
    best = ["linear_rounds" if r["linear_s"] <= r["in_out_s"] else "in_out_rounds" for r in rows]
    return {
        "linear": sum(k * np.array(r["linear_rounds"]) for k, r in zip(n, rows, strict=True)),
        "best": sum(k * np.array(r[b]) for k, r, b in zip(n, rows, best, strict=True)),
        "bytes": sum(k * r["bytes"] for k, r in zip(n, rows, strict=True)),
    }


def spread(ratios: np.ndarray) -> str:
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return f"{med:.3f}x [{q1:.3f}, {q3:.3f}]"


def report(rows: list[dict], names: list[str], threads: int) -> str:
    head = ("shape", 12), ("MB", 7), ("calls a step", 20), ("F.linear", 9), ("(in, out)", 10), ("speed ratio", 12)
    lines = [f"{threads} thread(s): GB/s of a batch-1 GEMV per weight shape (out x in), fp32, cold weights",
             "  " + " ".join(f"{name:>{width}s}" for name, width in head)]  # fmt: skip
    for r in rows:
        calls = " / ".join(str(r[f"count_{n}"]) for n in names)
        lines.append(f"  {r['out']:>5d}x{r['in']:<6d} {r['bytes'] / 1e6:7.1f} {calls:>20s} "
                     f"{r['bytes'] / r['linear_s'] / 1e9:9.1f} {r['bytes'] / r['in_out_s'] / 1e9:10.1f} "
                     f"{r['ratio']:11.3f}x")  # fmt: skip
    lines.append(f"  (calls a step: {' / '.join(names)}; speed ratio: F.linear's time over the (in, out) layout's)")
    steps = {n: step_linears(rows, n) for n in names}
    for n, st in steps.items():
        lines.append(f"  {n}: linears {np.median(st['linear']) * 1e3:.2f} ms a step with nn.Linear's layout, "
                     f"{np.median(st['best']) * 1e3:.2f} ms with the faster layout per shape "
                     f"({st['bytes'] / 1e6:.0f} MB)")  # fmt: skip
    if len(names) == 2:
        a, b = steps[names[0]], steps[names[1]]
        lines.append(f"  {names[0]} / {names[1]}: bytes {a['bytes'] / b['bytes']:.3f}x; linears "
                     f"{spread(a['linear'] / b['linear'])} with nn.Linear's layout, "
                     f"{spread(a['best'] / b['best'])} with the faster one per shape")  # fmt: skip
        lines.append("  (the median of the per-round ratios, [its quartiles])")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="medium", help="a named shape in configs/model (default medium)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="structured pruning's sparsity (default 0.5)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=21)
    opts = ap.parse_args(argv)
    if not 0.0 < opts.sparsity < 1.0:
        ap.error(f"--sparsity: must be within (0, 1), got {opts.sparsity}")
    enable_huge_pages()  # as `harness run` does, before any weight is allocated
    args = model_shape(opts.model)
    models = {"eager": args, f"structured {opts.sparsity:g}": pruned_args(args, opts.sparsity)}
    print(f"torch {torch.__version__}, {opts.model}, huge pages in use: {huge_pages()['in_use']}")
    with torch.inference_mode():
        for threads in opts.threads:
            torch.set_num_threads(threads)
            print("\n" + report(measure(models, opts.rounds), list(models), threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
