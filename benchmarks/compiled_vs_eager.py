"""Compiled vs eager decode, interleaved in one process: the TPOT ratio with the machine's drift cancelled.

A sweep times each point minutes apart, so on a machine whose speed drifts (a shared VM) a 10% difference can
come out either way. Here the eager model and each compiled variant take turns, eight decode steps each, for
``--rounds`` rounds, the order rotating every round (each model runs first, second, ... equally often when the
rounds are a multiple of the five models, within one otherwise, so a model that slows or warms the next one's
caches does not bias one variant); the ratio is taken per round
(eager over variant, above 1: faster) and its median printed. The decoded token ids are random with a fixed
seed (never zeros). Compilation happens before the first round and is printed separately.

    python benchmarks/compiled_vs_eager.py [--model small] [--batch 1 8] [--rounds 12]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engines.compiled import CompiledModel, CompiledParams
from engines.llama import Transformer
from harness.env import enable_huge_pages, huge_pages
from harness.paths import model_shape

VARIANTS = {
    "compiled (defaults: reduction GEMV, freezing, ...)": CompiledParams(),
    "compiled, library GEMV (MKL)": CompiledParams(gemv="library"),
    "compiled, library GEMV, no weight prepack": CompiledParams(gemv="library", weight_prepack=False),
    "compiled, library GEMV, no freezing": CompiledParams(gemv="library", freezing=False),
}
STEPS = 8


def decode_tokens(vocab_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, 1] from a fixed seed: the same input for every model and every run."""
    return torch.randint(0, vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed))


def turn_order(names: list[str], round_index: int) -> list[str]:
    """The models' order in one round: rotated by one each round."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def interleaved(
    models: dict[str, torch.nn.Module], tokens: torch.Tensor, rounds: int, start: int
) -> dict[str, list[float]]:
    """Median ms a decode step of each model per round, the models taking turns in a rotating order."""
    ms: dict[str, list[float]] = {n: [] for n in models}
    for r in range(rounds):
        for name in turn_order(list(models), r):
            ms[name].append(decode_ms(models[name], tokens, start))
    return ms


def decode_ms(model: torch.nn.Module, tokens: torch.Tensor, start: int) -> float:
    times = []
    for i in range(STEPS):
        t0 = time.perf_counter()
        model(tokens, torch.tensor([start + i]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def run(model_name: str, batch: int, rounds: int) -> None:
    args = model_shape(model_name)
    tokens = decode_tokens(args.vocab_size, batch)
    models: dict[str, torch.nn.Module] = {}
    for name, params in {"eager": None, **VARIANTS}.items():
        m = Transformer.build(args).eval()
        m = m if params is None else CompiledModel(m, params, torch.device("cpu"))
        m.setup_caches(batch, 64 + STEPS)
        t0 = time.perf_counter()
        for i in range(3):
            m(tokens, torch.tensor([i]))
        print(f"  {name}: first calls (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
        models[name] = m
    ms = interleaved(models, tokens, rounds, 32)
    eager = np.array(ms["eager"])
    print(f"{model_name}, batch {batch}, {rounds} rounds in rotating turns of {STEPS} decode steps, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for name, values in ms.items():
        v = np.array(values)
        ratio = eager / v
        print(f"  {name:52s} TPOT {np.median(v):7.2f} ms   x eager {np.median(ratio):.3f} "
              f"[{ratio.min():.3f}, {ratio.max():.3f}]")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="a named shape in configs/model (default small)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=12)
    opts = ap.parse_args()
    enable_huge_pages()  # as `harness run` does, before any model is built
    print(f"torch {torch.__version__}, huge pages in use: {huge_pages()['in_use']}")
    with torch.inference_mode():
        for batch in opts.batch:
            run(opts.model, batch, opts.rounds)


if __name__ == "__main__":
    main()
