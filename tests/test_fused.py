"""Fused engine: the reference model with Triton kernels swapped in, against eager on the same weights.

Without CUDA the kernels run under Triton's interpreter, so these tests use small shapes and few tokens; the
record of a CPU run marks its timings as not representative."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engines import kernels
from engines.base import EngineError, PrepareContext, make_engine
from engines.fused import FusedAttention, FusedRMSNorm, FusedTransformer
from engines.generate import beam_search, greedy
from engines.llama import ModelArgs, Transformer
from harness.records import load

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = ModelArgs(  # configs/model/tiny.yaml
    vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=704, max_seq_len=1024
)
pytestmark = pytest.mark.skipif(kernels.unavailable(DEV) is not None, reason=str(kernels.unavailable(DEV)))


def prepare(ref: Transformer, args: ModelArgs, **params) -> nn.Module:
    eng = make_engine({"name": "fused", **params})
    return eng.prepare(ref, PrepareContext(DEV, torch.float32, 0, "t", args, "/nonexistent"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def dev_small(small_model) -> Transformer:
    """The session's small model on DEV, as a copy: ``Module.to`` moves in place, and the session fixture must
    stay on the CPU for the tests after these (test_generate feeds it CPU prompts)."""
    return copy.deepcopy(small_model).to(DEV)


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return Transformer.build(TINY, device=DEV, seed=0)


def test_fused_logits_match_eager_on_tiny_prefill_and_decode(tiny):
    fused = prepare(tiny, TINY)
    x = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.inference_mode():
        for m in (tiny, fused):
            m.setup_caches(2, 16)
        pos = torch.arange(11, device=DEV)
        assert relative_error(fused(x, pos), tiny(x, pos)) < 1e-4  # prefill: SDPA, fused norms, rope, swiglu
        for step in range(3):  # decode: the split-K attention kernel over the static cache
            tok = torch.randint(1, 256, (2, 1), generator=torch.Generator().manual_seed(step)).to(DEV)
            p = torch.tensor([11 + step], device=DEV)
            assert relative_error(fused(tok, p), tiny(tok, p)) < 1e-4
        assert relative_error(fused(x), tiny(x)) < 1e-4  # the cacheless causal forward too


def test_module_replacement_shares_the_weights_and_leaves_the_reference_alone(tiny):
    fused = prepare(tiny, TINY)
    assert type(fused) is FusedTransformer and type(tiny) is Transformer
    assert isinstance(fused.layers[0].attention, FusedAttention) and isinstance(fused.norm, FusedRMSNorm)
    assert type(tiny.layers[0].attention).__name__ == "Attention" and type(tiny.norm).__name__ == "RMSNorm"
    ref_params = {n: p.data_ptr() for n, p in tiny.named_parameters()}
    assert {n: p.data_ptr() for n, p in fused.named_parameters()} == ref_params  # shared, not copied
    fused.setup_caches(1, 8)
    assert fused.layers[0].attention.kv_cache is not tiny.layers[0].attention.kv_cache
    info = fused.engine_info
    assert info["kernels"] == ["rmsnorm", "swiglu", "rope", "attention"]
    assert info["interpreted"] == kernels.interpreted()


def test_gqa_odd_shapes_greedy_and_beam_search_agree_with_eager(small_args, dev_small):
    """GQA 4:2, untied head, FFN width 150; generations go through the decode kernel and the cache reorder."""
    model = dev_small
    fused = prepare(model, small_args)
    prompt = torch.randint(1, small_args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEV)
    for m in (model, fused):
        m.setup_caches(2, 12)
    assert torch.equal(greedy(fused, prompt, 6), greedy(model, prompt, 6))
    outs = []
    for m in (model, fused):
        m.setup_caches(4, 10)
        outs.append(beam_search(m, prompt, 4, num_beams=2))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("subset", [["rmsnorm"], ["swiglu", "rope"], ["attention"], []])
def test_each_kernel_subset_is_exact_too(small_args, dev_small, subset):
    model = dev_small
    fused = prepare(model, small_args, kernels=subset)
    x = torch.randint(1, small_args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.inference_mode():
        for m in (model, fused):
            m.setup_caches(1, 8)
        pos = torch.arange(5, device=DEV)
        assert relative_error(fused(x, pos), model(x, pos)) < 1e-4
        tok, p = x[:, :1], torch.tensor([5], device=DEV)
        assert relative_error(fused(tok, p), model(tok, p)) < 1e-4


class OpLog(TorchDispatchMode):
    """The aten ops a forward dispatches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def decode_ops(model: nn.Module, prompt: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Prefill ``prompt``, then the aten ops and logits of one decode step after it."""
    b, p = prompt.shape
    model.setup_caches(b, p + 4)
    with torch.inference_mode():
        model(prompt, torch.arange(p, device=DEV))
        with OpLog() as log:
            out = model(prompt[:, -1:], torch.tensor([p], device=DEV))
    return log.ops, out


def test_fused_with_every_kernel_off_dispatches_exactly_eagers_ops(small_args, dev_small):
    """An ablation's baseline is eager itself: no rebuilt RoPE tables, no K/V-expanding GQA attention."""
    model = dev_small
    prompt = torch.randint(1, small_args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4)).to(DEV)
    eager_ops, eager_out = decode_ops(model, prompt)
    fused_ops, fused_out = decode_ops(prepare(model, small_args, kernels=[]), prompt)
    assert len(eager_ops) > 50 and Counter(fused_ops) == Counter(eager_ops)  # the same ops, as many times
    assert torch.equal(fused_out, eager_out)
    rope_ops, _ = decode_ops(prepare(model, small_args, kernels=["rope"]), prompt)  # the kernel replaces RoPE
    assert eager_ops.count("addcmul") == 2 * small_args.n_layers and "addcmul" not in rope_ops
    assert make_engine({"name": "fused", "kernels": []}).available(torch.device("meta"), torch.bfloat16) is None
    assert make_engine({"name": "fused", "kernels": []}).timing_caveat(torch.device("cpu")) is None


def test_fused_prefill_does_not_depend_on_the_cache_length(small_args, dev_small):
    """Like eager's, the fused prefill from position 0 attends over its own rows only (no mask, no S x T)."""
    fused = prepare(dev_small, small_args)
    x = torch.randint(1, small_args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5)).to(DEV)
    out = []
    with torch.inference_mode():
        for cache_len in (8, 120):
            fused.setup_caches(2, cache_len)
            out.append(fused(x, torch.arange(7, device=DEV)))
        want = dev_small(x)  # the plain causal forward
    assert torch.equal(out[0], out[1]) and relative_error(out[0], want) < 1e-4


def test_params_availability_and_caveat():
    eng = make_engine({"name": "fused"})
    assert eng.variant() == "fused"
    assert make_engine({"name": "fused", "kernels": ["rope"]}).variant() == "fused(kernels=('rope',))"
    with pytest.raises(EngineError, match="engine: invalid parameters for 'fused': engine.kernels"):
        make_engine({"name": "fused", "kernels": ["flash"]})
    cpu = torch.device("cpu")
    assert make_engine({"name": "fused", "cuda_graphs": True}).available(cpu) == (
        "engine.cuda_graphs=true needs CUDA (this device: cpu)"
    )
    if kernels.interpreted():
        assert eng.available(cpu) is None and eng.available(cpu, torch.float16) is None
        assert "fp32 and fp16 only" in eng.available(cpu, torch.bfloat16)
        assert "interpreter" in eng.timing_caveat(cpu) and "not representative" in eng.timing_caveat(cpu)
        with pytest.raises(ValueError, match="fp32 and fp16 only"):
            eng.prepare(Transformer.build(TINY, seed=0), PrepareContext(cpu, torch.bfloat16, 0, "t", TINY, "/x"))


def test_a_run_records_fidelity_and_marks_interpreted_timings(run_harness, tmp_path):
    out = tmp_path / "run"
    code = run_harness(
        "run", "engine=fused", "model=tiny", "model.weights=random", "measure=quick", "measure.max_time_s=0.5",
        "measure.min_reps=2", "workload.prompt_len=8", "workload.gen_len=3", "quality.n_seqs=1",
        "quality.seq_len=24", "quality.greedy_prompts=1", "quality.greedy_prompt_len=8", "quality.greedy_len=4",
        "roofline.enabled=false", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert code == 0
    row = load(out).iloc[0]
    assert row["status"] == "ok" and row["variant"] == "fused"
    assert row["fidelity_top1"] == 1.0 and row["fidelity_kl"] < 1e-6  # fp32 rounding only
    assert row["timing_representative"] == (DEV.type == "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_in_bf16():
    dev = torch.device("cuda")
    ref = Transformer.build(TINY, device=dev, dtype=torch.bfloat16, seed=0)
    eng = make_engine({"name": "fused", "cuda_graphs": True})
    assert eng.available(dev) is None and eng.timing_caveat(dev) is None
    fused = eng.prepare(ref, PrepareContext(dev, torch.bfloat16, 0, "t", TINY, "/nonexistent"))
    prompt = torch.randint(1, 256, (4, 16), device=dev)
    outs = []
    for m in (ref, fused):
        m.setup_caches(4, 32)
        outs.append(greedy(m, prompt, 12))
    agree = (outs[0] == outs[1]).float().mean()
    assert agree > 0.9  # bf16: a near-tie may flip one token, and the rest of that row follows it
    with torch.inference_mode():
        fused.setup_caches(4, 32)
        ref.setup_caches(4, 32)
        pos = torch.arange(16, device=dev)
        tok = fused(prompt, pos)[:, -1:].argmax(-1)
        ref(prompt, pos)
        torch.testing.assert_close(fused(tok, pos[-1:] + 1), ref(tok, pos[-1:] + 1), rtol=0.05, atol=0.05)
