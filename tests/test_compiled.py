"""Compiled engine: torch.compile of decode and prefill, against eager on the same weights; compilation happens once
per shape (never per token) and is recorded outside the timed window."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from engines.base import EngineError, PrepareContext, engine_info, make_engine
from engines.compiled import CompiledModel, ReductionGemvLinear, inductor_options
from engines.generate import greedy
from engines.llama import ModelArgs, Transformer
from harness.records import load, read_record

CPU = torch.device("cpu")
ARGS = ModelArgs(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=150, max_seq_len=64,
                 tie_embeddings=False)  # fmt: skip
pytestmark = [
    pytest.mark.skipif(make_engine({"name": "compiled"}).available(CPU) is not None, reason="no C++ compiler"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),  # raised inside inductor
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def pair() -> tuple[Transformer, CompiledModel]:
    ref = Transformer.build(ARGS, seed=0)
    compiled = make_engine({"name": "compiled"}).prepare(ref, PrepareContext(CPU, torch.float32, 0, "t", ARGS, "/x"))
    return ref, compiled


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_logits_match_eager_and_each_shape_compiles_once(pair):
    ref, compiled = pair
    x = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for m in (ref, compiled):
            m.setup_caches(2, 20)
        pos = torch.arange(10)
        assert relative_error(compiled(x, pos), ref(x, pos)) < 1e-4
        for i in range(4):
            tok, p = x[:, i : i + 1], torch.tensor([10 + i])
            assert relative_error(compiled(tok, p), ref(tok, p)) < 1e-4
    events = compiled.engine_info["compile"]["events"]
    assert [(e["phase"], e["tokens"], e["cache_rows"], e["cache_len"]) for e in events[:2]] == [
        ("prefill", [2, 10], 2, 20), ("decode", [2, 1], 2, 20),
    ]  # fmt: skip
    assert all(e["seconds"] > 0 for e in events) and compiled.engine_info["compile"]["count"] == len(events)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_decoding_never_recompiles_per_token(pair):
    """The static cache is a buffer updated in place and input_pos a tensor: once a shape is compiled, a whole
    generation adds no graph and converts no frame (dynamo's counters), logs no recompilation (torch._logging) and
    passes with dynamo's error_on_recompile; a new batch size, by contrast, compiles each phase once, logged."""
    ref, compiled = pair
    prompt = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    compiled.setup_caches(2, 20)
    greedy(compiled, prompt, 6)  # warm: compiles whatever this shape still needs
    graphs, frames = _unique_graphs(), counters["frames"]["total"]
    handler = _Records()
    log = logging.getLogger("torch._dynamo")
    log.addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = greedy(compiled, prompt, 10)
        assert not [m for m in handler.messages if "Recompiling" in m]
        assert _unique_graphs() == graphs and counters["frames"]["total"] == frames
        before = len(compiled.engine_info["compile"]["events"])
        compiled.setup_caches(3, 16)
        greedy(compiled, prompt.repeat(2, 1)[:3], 4)  # a new batch size: it recompiles, and the log shows it
        assert [m for m in handler.messages if "Recompiling" in m]
    finally:
        torch._logging.set_logs()
        log.removeHandler(handler)
    new = compiled.engine_info["compile"]["events"][before:]  # each phase once, for the new shape
    assert sorted(e["phase"] for e in new) == ["decode", "prefill"] and {e["cache_rows"] for e in new} == {3}
    ref.setup_caches(2, 20)
    assert torch.equal(out, greedy(ref, prompt, 10))


def test_each_point_records_its_own_compilations_and_a_later_chunk_keeps_the_mask(pair):
    """A prepared engine reused by later points (other batch sizes) gives each record the compilations of that
    point only, plus how many came before it. A prefill chunk at a later offset is compiled as its own graph,
    over the masked static cache, and matches eager."""
    ref, compiled = pair
    prompt = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    first = engine_info(compiled)  # point 1 begins
    with torch.inference_mode():
        for m in (ref, compiled):
            m.setup_caches(1, 24)
        pos = torch.arange(8)
        assert relative_error(compiled(prompt[:, :8], pos), ref(prompt[:, :8], pos)) < 1e-4
        later = engine_info(compiled)  # point 2 begins: point 1's record keeps its own list
        chunk = torch.arange(8, 12)
        assert relative_error(compiled(prompt[:, 8:], chunk), ref(prompt[:, 8:], chunk)) < 1e-4
    assert [(e["phase"], e["tokens"], e["cache_len"]) for e in first["compile"]["events"]] == [("prefill", [1, 8], 24)]
    assert [(e["phase"], e["tokens"]) for e in later["compile"]["events"]] == [("prefill", [1, 4])]
    assert later["compile"]["count"] == 1 and later["compiled_before"]["count"] == compiled.compile_log["count"] - 1
    assert compiled.engine_info["compile"] is compiled.compile_log  # the engine's own log holds every one


def test_prefill_is_compiled_without_cuda_graphs():
    """Only decode is graphed: a prefill graph would hold its [B, S, vocab] logits in the pool, plus a clone."""
    params = make_engine({"name": "compiled", "mode": "reduce-overhead"}).params
    model = CompiledModel(Transformer.build(ARGS, seed=0), params, torch.device("cuda"))  # compiles lazily
    assert model.cuda_graphs and model.options["triton.cudagraphs"] is True
    assert model.prefill_options["triton.cudagraphs"] is False
    assert {k: v for k, v in model.prefill_options.items() if k != "triton.cudagraphs"} == {
        k: v for k, v in model.options.items() if k != "triton.cudagraphs"
    }


def test_the_reference_is_left_alone_and_weights_are_shared(pair):
    ref, compiled = pair
    assert type(ref) is Transformer and not hasattr(ref, "engine_info")
    assert {n: p.data_ptr() for n, p in compiled.model.named_parameters()} == {
        n: p.data_ptr() for n, p in ref.named_parameters()
    }
    assert compiled.weight_bytes() == sum(p.numel() * 4 for p in ref.parameters())


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 12])
@pytest.mark.parametrize("bias", [False, True])
def test_the_reduction_gemv_computes_the_linear(rows, bias):
    """Up to max_rows rows the product is a multiply-sum, above it F.linear; both are the linear, odd sizes too."""
    g = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(97, 150, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(150, 97, generator=g))
    layer = ReductionGemvLinear(linear, max_rows=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(rows, 1, 97, generator=g)
    with torch.inference_mode():
        want = linear(x)
        assert torch.equal(layer(x), want)  # eagerly: F.linear itself
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, options={"freezing": True})
        assert relative_error(compiled(x), want) < 1e-5


def test_the_reduction_gemv_is_a_reduction_only_up_to_max_rows():
    from torch._inductor.utils import run_and_get_code

    linear = torch.nn.Linear(64, 32, bias=False)
    layer = ReductionGemvLinear(linear, max_rows=4)
    with torch.inference_mode():
        for rows, reduction in ((1, True), (4, True), (5, False)):
            torch._dynamo.reset()
            _, code = run_and_get_code(torch.compile(layer, fullgraph=True), torch.randn(rows, 64))
            source = "\n".join(code)
            assert ("cpp_fused_mul_sum" in source) == reduction and ("extern_kernels.mm(" in source) != reduction


def test_the_reduction_gemv_sums_low_precision_in_fp32():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 4096, generator=g), torch.randn(1, 4096, generator=g)
    linear = torch.nn.Linear(4096, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    with torch.inference_mode():
        exact = x.bfloat16().float() @ linear.weight.float().T
        got = torch.compile(ReductionGemvLinear(linear, max_rows=1), fullgraph=True)(x.bfloat16())
    assert got.dtype == torch.bfloat16 and relative_error(got.float(), exact) < 1e-2


def test_gemv_choice_swaps_linears_of_the_engine_copy_only():
    ref = Transformer.build(ARGS, seed=0)
    ctx = PrepareContext(CPU, torch.float32, 0, "t", ARGS, "/x")
    auto = make_engine({"name": "compiled"}).prepare(ref, ctx)
    kinds = {type(m) for n, m in auto.model.named_modules() if n.endswith(("wq", "w2", "output"))}
    assert kinds == {ReductionGemvLinear} and auto.engine_info["gemv"] == "reduction"
    assert auto.engine_info["gemv_max_rows"] == 4
    assert {type(m) for m in ref.modules()} >= {torch.nn.Linear} and not any(
        isinstance(m, ReductionGemvLinear) for m in ref.modules()
    )
    library = make_engine({"name": "compiled", "gemv": "library"}).prepare(ref, ctx)
    assert not any(isinstance(m, ReductionGemvLinear) for m in library.modules())
    assert library.engine_info["gemv"] == "library" and library.engine_info["gemv_max_rows"] is None
    assert make_engine({"name": "compiled"}).params.gemv_for(torch.device("cuda")) == "library"
    assert make_engine({"name": "compiled", "gemv": "reduction"}).params.gemv_for(torch.device("cuda")) == "reduction"
    with pytest.raises(EngineError, match=r"engine.gemv_max_rows: 0 is not allowed; allowed: an integer >= 1"):
        make_engine({"name": "compiled", "gemv_max_rows": 0})
    with pytest.raises(EngineError, match=r"engine.gemv: 'mkl' is not allowed; allowed: auto, reduction, library"):
        make_engine({"name": "compiled", "gemv": "mkl"})


def test_options_modes_and_availability():
    opts = inductor_options(make_engine({"name": "compiled"}).params, CPU)
    assert opts["freezing"] is True and opts["cpp.weight_prepack"] is True and opts["cpp_wrapper"] is True
    assert "triton.cudagraphs" not in opts
    cuda = torch.device("cuda")
    on_cuda = inductor_options(make_engine({"name": "compiled"}).params, cuda)
    assert on_cuda["freezing"] is False and on_cuda["cpp_wrapper"] is False
    ro = make_engine({"name": "compiled", "mode": "reduce-overhead"})
    assert inductor_options(ro.params, cuda)["triton.cudagraphs"] is True
    assert ro.available(CPU) == "engine.mode=reduce-overhead is CUDA graphs: it needs CUDA (this device: cpu)"
    ma = make_engine({"name": "compiled", "mode": "max-autotune", "cpp_wrapper": False})
    assert ma.available(CPU) is None and inductor_options(ma.params, CPU)["max_autotune"] is True
    assert inductor_options(ma.params, CPU)["cpp_wrapper"] is False
    assert ma.variant() == "compiled(cpp_wrapper=False, mode=max-autotune)"
    with pytest.raises(EngineError, match=r"engine.mode: 'fast' is not allowed; allowed: default, reduce-overhead"):
        make_engine({"name": "compiled", "mode": "fast"})


def test_a_torch_without_per_function_recompile_limits_gets_the_global_one(monkeypatch):
    """torch 2.11's torch.compile has no recompile_limit/isolate_recompiles: the engine still compiles, with
    dynamo's process-wide limit raised (under fullgraph=True the default 8 is an error, not a fallback)."""
    from engines import compiled

    assert compiled.recompile_kwargs() == {"recompile_limit": compiled.RECOMPILE_LIMIT, "isolate_recompiles": True}

    def old_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
                    disable=False):  # torch 2.11's signature
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    with torch._dynamo.config.patch(recompile_limit=8):  # restored on exit (dynamo's config is no plain module)
        assert compiled.recompile_kwargs() == {}
        assert torch._dynamo.config.recompile_limit == compiled.RECOMPILE_LIMIT
        CompiledModel(Transformer.build(ARGS, seed=0), make_engine({"name": "compiled"}).params, CPU)


def test_the_mode_options_list_beside_eager(compose_cfg):
    from omegaconf import OmegaConf

    options = ("compiled", "compiled/default", "compiled/reduce-overhead", "compiled/max-autotune")
    variants = [make_engine(OmegaConf.to_container(compose_cfg(f"engine={o}").engine)).variant() for o in options]
    assert variants == ["compiled", "compiled", "compiled(mode=reduce-overhead)", "compiled(mode=max-autotune)"]
    import yaml

    from harness.paths import config_dir

    params = yaml.safe_load((config_dir() / "sweep" / "compiled.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert params == {"model": "small", "engine": "eager,compiled", "workload.batch_size": "1,8"}


def test_a_run_records_compilation_outside_the_timed_window(run_harness, tmp_path, monkeypatch):
    from contextlib import contextmanager

    from harness import point

    # the order of events in the point: each compilation, and the timed window's start and end
    events: list[str] = []
    real_repeat, real_log = point.repeat, CompiledModel._log_compile

    def spy_repeat(fn, policy, converge_on, timed_window=None, res=None):
        @contextmanager
        def window():
            events.append("timed")
            with timed_window():
                yield
            events.append("timed end")

        return real_repeat(fn, policy, converge_on, timed_window=window, res=res)

    def spy_log(self, phase, tokens, seconds):
        events.append(f"compile {phase}")
        return real_log(self, phase, tokens, seconds)

    monkeypatch.setattr(point, "repeat", spy_repeat)
    monkeypatch.setattr(CompiledModel, "_log_compile", spy_log)
    out = tmp_path / "run"
    code = run_harness(
        "run", "device=cpu", "engine=compiled", "model=tiny", "model.weights=random", "model.n_layers=2",
        "measure=quick",
        "measure.max_time_s=0.5", "workload.prompt_len=8", "workload.gen_len=4", "quality.enabled=false",
        "roofline.enabled=false", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert code == 0
    row = load(out).iloc[0]
    assert row["status"] == "ok" and bool(row["timing_representative"])
    record = read_record(next(out.rglob("record.json")))
    compiles = record["engine_info"]["compile"]
    assert {e["phase"] for e in compiles["events"]} == {"prefill", "decode"} and compiles["seconds"] > 0
    # compilation happened in warm-up: the first warm-up generation carries it, the timed ones do not
    assert record["metrics"]["warmup_s"] >= 0.9 * sum(e["seconds"] for e in compiles["events"])
    # and none during the timed repetitions (not a time comparison: warm inductor caches make compiles short)
    assert events.count("timed") == 1 and events[-1] == "timed end", events
    assert events.index("timed") == len(compiles["events"]) and set(events[: events.index("timed")]) == {
        "compile prefill", "compile decode"}, events  # fmt: skip
