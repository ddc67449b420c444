"""2:4 semi-structured sparsity on Llama-3-8B's linear layers against dense, in one run.

Each linear of a Llama-3-8B layer (q, k, v, o, gate, up, down) is timed as ``F.linear(x, W)`` with ``W`` dense
bf16 and with ``W`` masked to 2:4 (the larger two of every four by magnitude) and compressed for the sparse
tensor cores, exactly as ``engine=pruned/2of4`` stores it (``engines.sparse_formats.to_semi_structured``), at
the batch sizes given (decode rows). Timings are ``triton.testing.do_bench`` medians, which flushes the L2 cache
before every repetition, so weights are read from HBM as in a real decode step. Prints a row per linear and
batch (dense and 2:4 microseconds, the speedup, dense GB/s) and the whole layer's total, and with ``--json``
writes the table too; ``--markdown`` writes it as a Markdown section (device, driver, versions, the command and
the table) to paste into docs/gpu-results.md (created with the first one). CUDA sm_80+ only: anywhere else it
prints why and exits with status 0.

    python benchmarks/sparse_24_linears.py [--batch 1 64] [--dtype bf16] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from engines.pruning import two_four_mask
from engines.sparse_formats import (
    semi_structured_bytes,
    semi_structured_kernel,
    semi_structured_shape_error,
    semi_structured_unavailable,
    to_semi_structured,
)

# Llama-3-8B: dim 4096, 32 query heads and 8 KV heads of 128, FFN 14336; (name, out_features, in_features)
LLAMA3_8B_LINEARS = (
    ("q", 4096, 4096),
    ("k", 1024, 4096),
    ("v", 1024, 4096),
    ("o", 4096, 4096),
    ("gate", 14336, 4096),
    ("up", 14336, 4096),
    ("down", 4096, 14336),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def median_us(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3


def measure(batches: list[int], dtype: torch.dtype, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, n_out, n_in in LLAMA3_8B_LINEARS:
        dense = torch.randn(n_out, n_in, device=device, dtype=dtype, generator=gen) * n_in**-0.5
        if why := semi_structured_shape_error((n_out, n_in), dtype):
            print(f"{name}: {why}; skipped", file=sys.stderr)
            continue
        masked = dense * two_four_mask(dense.abs().float()).to(dtype)
        sparse = to_semi_structured(masked)
        for b in batches:
            x = torch.randn(b, n_in, device=device, dtype=dtype, generator=gen)
            err = (F.linear(x, sparse).float() - F.linear(x, masked).float()).abs().max().item()
            t_dense = median_us(lambda x=x, w=dense: F.linear(x, w))
            t_sparse = median_us(lambda x=x, s=sparse: F.linear(x, s))
            dense_bytes = n_out * n_in * dense.element_size()
            rows.append({
                "linear": name, "out": n_out, "in": n_in, "batch": b, "dense_us": t_dense, "sparse_us": t_sparse,
                "speedup": t_dense / t_sparse, "dense_gbs": dense_bytes / t_dense / 1e3,
                "dense_mb": dense_bytes / 1e6,
                "sparse_mb": semi_structured_bytes(n_out, n_in, dense.element_size()) / 1e6,
                "max_abs_err_vs_masked_dense": err,
            })  # fmt: skip
        del dense, masked, sparse
    return rows


def layer_totals(rows: list[dict], batches: list[int]) -> list[tuple[int, float, float]]:
    """(batch, dense us, 2:4 us) of the whole layer for each batch that has rows."""
    totals = []
    for b in batches:
        sel = [r for r in rows if r["batch"] == b]
        if sel:
            totals.append((b, sum(r["dense_us"] for r in sel), sum(r["sparse_us"] for r in sel)))
    return totals


def table(rows: list[dict], batches: list[int]) -> str:
    head = f"{'linear':6} {'shape':>12} {'batch':>5} {'dense us':>9} {'2:4 us':>9} {'2:4 x':>6} {'dense GB/s':>10}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['linear']:6} {r['out']:>5}x{r['in']:<6} {r['batch']:>5} {r['dense_us']:9.1f} "
                     f"{r['sparse_us']:9.1f} {r['speedup']:6.2f} {r['dense_gbs']:10.0f}")  # fmt: skip
    for b, d, s in layer_totals(rows, batches):
        lines.append(f"{'layer':6} {'(all 7)':>12} {b:>5} {d:9.1f} {s:9.1f} {d / s:6.2f}")
    return "\n".join(lines)


def environment(device: torch.device, dtype: str) -> dict[str, str]:
    """What the numbers were measured on: device, driver, the numeric stack and the 2:4 kernel."""
    import triton

    env = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": str(torch.version.cuda),
           "triton": triton.__version__, "dtype": dtype, "kernel": semi_structured_kernel()}  # fmt: skip
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # NVML absent: the record says so instead of failing the run
        env["driver"] = f"unknown ({type(exc).__name__})"
    return env


def markdown(env: dict[str, str], rows: list[dict], batches: list[int], command: str) -> str:
    """A docs/gpu-results.md section: where and how it was measured, then a row per linear and batch and the
    whole layer's total per batch."""
    lines = [
        f"### 2:4 semi-structured vs dense {env['dtype']}: Llama-3-8B linears", "",
        f"- device: {env['device']}, driver {env['driver']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; {env['kernel']}",
        "- `triton.testing.do_bench` medians, L2 cache flushed before every repetition", "",
        f"    {command}", "",
        "| linear | out x in | batch | dense us | 2:4 us | 2:4 speedup | dense GB/s |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['linear']} | {r['out']}x{r['in']} | {r['batch']} | {r['dense_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | x{r['speedup']:.2f} | {r['dense_gbs']:.0f} |")  # fmt: skip
    for b, d, s in layer_totals(rows, batches):
        lines.append(f"| layer (all 7) | | {b} | {d:.1f} | {s:.1f} | x{d / s:.2f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="rows of x (decode batch sizes)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--markdown", help="also write a Markdown section (device, versions, command, table)")
    args = ap.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if why := semi_structured_unavailable(device):
        print(f"skipped: {why.split(';')[0]}")
        return 0
    dtype = DTYPES[args.dtype]
    rows = measure(args.batch, dtype, device)
    env = environment(device, args.dtype)
    print(f"{env['device']}, torch {env['torch']}, {args.dtype}, {env['kernel']}; do_bench medians, "
          "L2 flushed per repetition")
    print(table(rows, args.batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=1)
    if args.markdown:
        command = "python benchmarks/sparse_24_linears.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "w") as f:
            f.write(markdown(env, rows, args.batch, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
