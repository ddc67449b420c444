"""Benchmark scripts that need a GPU still import, explain themselves without one, and add up their tables."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sparse_24_linears_says_why_it_skips_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, on a GPU box too
    bench = load("sparse_24_linears")
    assert bench.main(["--batch", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("skipped: 2:4 semi-structured sparsity needs a CUDA GPU with compute capability 8.0+")


def test_sparse_24_linears_table_totals_each_batch():
    bench = load("sparse_24_linears")
    rows = [
        {"linear": name, "out": o, "in": i, "batch": b, "dense_us": 10.0 * (k + 1), "sparse_us": 5.0 * (k + 1),
         "speedup": 2.0, "dense_gbs": 1.0}
        for k, (name, o, i) in enumerate(bench.LLAMA3_8B_LINEARS)
        for b in (1, 64)
    ]  # fmt: skip
    text = bench.table(rows, [1, 64])
    layer = [line.split() for line in text.splitlines() if line.startswith("layer")]
    totals = [(r[3], r[4], r[5], r[6]) for r in layer]
    assert totals == [("1", "280.0", "140.0", "2.00"), ("64", "280.0", "140.0", "2.00")]
    assert len(bench.LLAMA3_8B_LINEARS) == 7 and {o for _, o, _ in bench.LLAMA3_8B_LINEARS} == {1024, 4096, 14336}

    env = {"device": "Some GPU", "driver": "1.2", "torch": "2.x", "cuda": "13.0", "triton": "3.x", "dtype": "bf16",
           "kernel": "2:4 semi-structured sparse matmul (cutlass)"}  # fmt: skip
    md = bench.markdown(env, rows, [1, 64], "python benchmarks/sparse_24_linears.py --batch 1 64")
    assert "Some GPU, driver 1.2" in md and "torch 2.x (CUDA 13.0), triton 3.x" in md
    assert "    python benchmarks/sparse_24_linears.py --batch 1 64" in md
    body = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == len(rows) + 2 and body[0][0].strip() == "q" and body[0][1].strip() == "4096x4096"
    assert [c.strip() for c in body[-1][2:6]] == ["64", "280.0", "140.0", "x2.00"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_24_linears_measures_on_a_gpu(tmp_path):
    bench = load("sparse_24_linears")
    if bench.semi_structured_unavailable(torch.device("cuda")):
        pytest.skip("GPU without sparse tensor cores")
    rows = bench.measure([1], torch.bfloat16, torch.device("cuda"))
    assert len(rows) == 7 and all(r["dense_us"] > 0 and r["sparse_us"] > 0 for r in rows)
    assert all(r["max_abs_err_vs_masked_dense"] < 0.1 for r in rows)
    env = bench.environment(torch.device("cuda"), "bf16")
    assert env["device"] == torch.cuda.get_device_name() and env["cuda"] == torch.version.cuda
    assert "| layer (all 7) | | 1 |" in bench.markdown(env, rows, [1], "python benchmarks/sparse_24_linears.py")


def test_decode_breakdown_splits_a_step_into_its_linears_and_the_rest():
    bench = load("decode_breakdown")
    args = bench.model_shape("tiny")
    model = bench.Transformer.build(args)
    forward = torch.nn.Linear.forward
    with torch.inference_mode():
        model.setup_caches(1, 16)
        with bench.LinearClock() as clock:
            parts = bench.step_parts(model, clock, torch.tensor([[3]]), 4)
            assert len(clock.calls) == 7 * args.n_layers + 1  # q k v o, w1 w3 w2 per block, and the head
    assert torch.nn.Linear.forward is forward  # unwrapped on exit
    shapes = {k: v for k, v in parts.items() if k[0].isdigit()}
    assert set(shapes) == {f"{o}x{i}" for o, i in {tuple(m.weight.shape) for m in model.modules()
                                                     if isinstance(m, torch.nn.Linear)}}  # fmt: skip
    assert 0 < parts["linears"] < parts["step"] and parts["between linears"] > 0
    bytes_by_shape = bench.linear_bytes(model)
    assert sum(bytes_by_shape.values()) == sum(m.weight.numel() * 4 for m in model.modules()
                                               if isinstance(m, torch.nn.Linear))  # fmt: skip


def test_decode_breakdown_resident_model_runs_the_same_ops_on_cached_weights():
    bench = load("decode_breakdown")
    args = bench.model_shape("tiny")
    model = bench.resident_model(args)
    assert len(model.layers) == args.n_layers and all(b is model.layers[0] for b in model.layers)
    assert model.layers[0].feed_forward.w1.weight.shape == (64, args.dim) and model.output.weight.shape[0] == 256
    with torch.inference_mode():
        model.setup_caches(1, 16)
        with bench.LinearClock() as clock:
            parts = bench.step_parts(model, clock, torch.tensor([[3]]), 4)
            assert len(clock.calls) == 7 * args.n_layers + 1  # the eager step's linears, one block's weights
    assert 0 < parts["linears"] < parts["step"]


def test_decode_breakdown_fused_projections_compute_the_same_logits_with_four_linears_a_block():
    from engines.surgery import first_of_width

    bench = load("decode_breakdown")
    args = bench.model_shape("tiny")
    with torch.inference_mode():
        for model in (bench.Transformer.build(args), first_of_width(bench.Transformer.build(args), 0.5)):
            fused = bench.fuse_projections(model)
            assert not hasattr(model.layers[0].attention, "wqkv")  # a copy: the original keeps its linears
            tokens = torch.randint(0, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
            outputs = []
            for m in (model, fused):
                m.setup_caches(2, 8)
                logits = [m(tokens[:, :5], torch.arange(5)), m(tokens[:, 5:], torch.tensor([5]))]
                outputs.append(torch.cat(logits, dim=1))
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
            fused.setup_caches(1, 16)
            with bench.LinearClock() as clock:
                bench.step_parts(fused, clock, tokens[:1, :1], 4)
                assert len(clock.calls) == 4 * args.n_layers + 1
    a = fused.layers[0].attention
    assert a.wqkv.weight.shape == (sum(a.split_sizes), args.dim)


def test_gemv_layouts_times_the_shapes_both_models_run():
    """The shapes it lists are the linears of the real models (eager and `first_of_width`, which times as
    structured pruning does), both layouts compute the same product, and each step adds up its calls."""
    import re
    from collections import Counter

    from engines.llama import Transformer
    from engines.surgery import first_of_width

    bench = load("gemv_layouts")
    args = bench.model_shape("tiny")
    eager = Transformer.build(args)
    models = {"eager": args, "structured 0.5": bench.pruned_args(args, 0.5)}
    for shape_args, model in zip(models.values(), (eager, first_of_width(eager, 0.5)), strict=True):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert bench.linear_shapes(shape_args) == Counter(tuple(m.weight.shape) for m in linears)
    with torch.inference_mode():
        rows = bench.measure(models, rounds=2, cold_bytes=1 << 16)
    assert {(r["out"], r["in"]) for r in rows} == set(bench.linear_shapes(args)) | set(
        bench.linear_shapes(models["structured 0.5"])
    )
    assert all(r["max_abs_diff"] < 1e-4 and r["linear_s"] > 0 and r["in_out_s"] > 0 and r["ratio"] > 0 for r in rows)
    step = bench.step_linears(rows, "eager")
    assert step["bytes"] == sum(m.weight.numel() * 4 for m in eager.modules() if isinstance(m, torch.nn.Linear))
    assert step["linear"][1] == pytest.approx(sum(r["count_eager"] * r["linear_rounds"][1] for r in rows))
    faster = ["linear_rounds" if r["linear_s"] <= r["in_out_s"] else "in_out_rounds" for r in rows]
    assert step["best"][0] == pytest.approx(sum(r["count_eager"] * r[f][0] for r, f in zip(rows, faster, strict=True)))
    text = bench.report(rows, list(models), 1)
    assert len([line for line in text.splitlines() if re.match(r"\s+\d+x\d+ ", line)]) == len(rows)
    assert "eager / structured 0.5: bytes" in text


def test_sampler_overhead_pairs_each_round_off_and_on(monkeypatch):
    bench = load("sampler_overhead")
    built = bench.models(["tiny"], structured=0.5)
    assert list(built) == ["tiny", "tiny structured 0.5"]
    assert built["tiny structured 0.5"].args.intermediate_size == built["tiny"].args.intermediate_size // 2
    calls = []

    def fake_tpot(model, seconds, sampler):
        calls.append(sampler is not None)
        if sampler is not None:
            with sampler:
                pass
        return 11.0 if sampler is not None else 10.0

    monkeypatch.setattr(bench, "tpot_ms", fake_tpot)
    c = bench.compare(built["tiny"], rounds=4, seconds=0.0, interval=0.05)
    assert calls == [False, True, True, False, False, True, True, False]  # alternating order
    assert c["ratio"] == pytest.approx(1.1) and c["off"] == 10.0 and c["on"] == 11.0


def test_sampler_overhead_times_a_real_generation_with_the_sampler(monkeypatch):
    bench = load("sampler_overhead")
    model = bench.models(["tiny"], structured=None)["tiny"]
    reps: list[tuple[float, list[float]]] = []  # (when, the generation's intervals) per repetition

    class Clock(bench.HostClock):
        def intervals_ms(self):
            iv = super().intervals_ms()
            reps.append((time.perf_counter(), [float(x) for x in iv]))
            return iv

    class WatchedSampler(bench.Sampler):
        def __enter__(self):
            self.entered = time.perf_counter()
            return super().__enter__()

    monkeypatch.setattr(bench, "HostClock", Clock)
    interval, seconds = 0.01, 0.2
    sampler = WatchedSampler(torch.device("cpu"), interval)
    tpot = bench.tpot_ms(model, seconds, sampler)
    timed = [iv for when, iv in reps if when > sampler.entered]  # the warm-up ran before the sampler's window
    assert len(timed) >= 3 and len(reps) > len(timed)  # the policy's minimum, after a warm-up
    assert all(len(iv) == bench.GEN_LEN and min(iv) > 0 for iv in timed)
    # TPOT is the median over the timed generations of their mean gap after the first token
    assert tpot == pytest.approx(float(np.median([np.mean(iv[1:]) for iv in timed])))
    assert sum(sum(iv) for iv in timed) <= sampler.window_s * 1e3  # all of them inside the sampled window

    result = sampler.result(tokens=1)
    assert result["window_s"] >= seconds and result["interval_s"] == interval
    n, expected = result["n_samples"], result["window_s"] / interval  # one a wake, and one at the window's end
    assert expected / 5 <= n <= expected + 1, (n, expected)
    t = result["timeline"]["t_s"]
    assert len(t) == n and t == sorted(t) and t[-1] <= result["window_s"]
    assert t[0] >= interval * 0.9 and np.diff(t[:-1]).min() >= interval * 0.9  # woke once an interval (the last
    # sample is the window's end, whenever it came)


def test_compiled_vs_eager_times_random_tokens_in_rotating_turns():
    bench = load("compiled_vs_eager")
    tokens = bench.decode_tokens(256, 8)
    assert tokens.shape == (8, 1) and tokens.dtype == torch.long
    assert torch.equal(tokens, bench.decode_tokens(256, 8))  # seeded: the same input every run
    assert tokens.unique().numel() > 1 and tokens.min() >= 0 and tokens.max() < 256  # not zeros, in the vocabulary

    names = ["eager", "a", "b"]
    orders = [bench.turn_order(names, r) for r in range(6)]
    assert orders[:3] == [["eager", "a", "b"], ["a", "b", "eager"], ["b", "eager", "a"]] and orders[3:] == orders[:3]
    for name in names:  # every model runs first, second and last equally often
        assert sorted(o.index(name) for o in orders) == [0, 0, 1, 1, 2, 2]

    calls: list[tuple[str, torch.Tensor, int]] = []

    def fake(name):
        return lambda toks, pos: calls.append((name, toks, int(pos)))

    ms = bench.interleaved({n: fake(n) for n in names}, tokens, rounds=3, start=32)
    assert {n: len(v) for n, v in ms.items()} == {n: 3 for n in names} and all(x >= 0 for v in ms.values() for x in v)
    steps = bench.STEPS
    firsts = [calls[i][0] for i in range(0, len(calls), steps)]
    assert firsts == [n for o in orders[:3] for n in o]
    assert all(toks is tokens for _, toks, _ in calls)
    assert [pos for _, _, pos in calls[:steps]] == list(range(32, 32 + steps))


def test_gate_multiplicity_prints_a_row_per_noise_and_mode_and_holm_never_flags_more(monkeypatch, capsys):
    bench = load("gate_multiplicity")
    monkeypatch.setattr("sys.argv", ["gate_multiplicity.py", "--runs", "2", "--points", "3", "--samples", "12"])
    bench.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "%" in line][1:]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        (aa_none, aa_holm), (hit_none, hit_holm) = (
            [float(x.rstrip("%")) for x in cell.split(" / ")] for cell in cells[2:]
        )
        assert aa_holm <= aa_none and hit_holm <= hit_none  # over the same samples Holm only takes verdicts back


def test_timer_overhead_on_cuda_without_cuda_is_one_line_and_exit_2(subprocess_env):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the refusal is for machines without it")
    out = subprocess.run([sys.executable, "benchmarks/timer_overhead.py", "--device", "cuda"], capture_output=True,
                         text=True, env=subprocess_env, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().endswith("--device cuda: CUDA is not available here")
