"""Quantized engine: formats and their error bounds, kernels against those bounds, stored bytes, layer selection,
the prepared model with its KV cache, and unavailable schemes recorded as skipped in a real sweep."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_POINT
from torch import nn

from engines.base import EngineError, PrepareContext, make_engine, weight_bytes
from engines.generate import greedy
from engines.llama import ModelArgs, Transformer
from engines.quant import cpu
from engines.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from engines.quantized import select_linears
from harness.records import load

CPU = torch.device("cpu")
ARGS = ModelArgs(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256, max_seq_len=64,
                 tie_embeddings=True)  # fmt: skip
CPU_SCHEMES = ("int8_dynamic", "int8_weight_only", "int4_weight_only")
QUICK = [*FAST_POINT, "quality.enabled=true"]  # the sweep test checks fidelity against eager
BF16_EPS = 2.0**-8  # relative rounding error of bf16 (8 significant bits), with a factor 2 of slack


def ctx(args: ModelArgs = ARGS, dtype: torch.dtype = torch.float32) -> PrepareContext:
    return PrepareContext(CPU, dtype, 0, "t", args, "/nonexistent")


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Random weights with outliers and an offset row, so asymmetric and per-channel scales matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] += 0.3  # a row far from zero: asymmetric int4 must still cover it
    w[1, 3] = 1.5  # an outlier: its channel (and group) gets a large scale, the others do not
    w[2] = 0.0  # an all-zero row must not divide by zero
    return w


def test_int8_round_trip_within_half_a_step_per_channel():
    w = weights(64, 256, 0)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (64,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    assert torch.equal(dequantize_int8(q, scale)[2], torch.zeros(256))
    # the outlier's channel is coarse, the others keep their own fine step
    assert scale[1] > 5 * scale[3] and err[3].max() <= scale[3] / 2 * (1 + 1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step_per_group(group_size):
    w = weights(48, 256, 1)
    q, scale, minimum = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scale.shape == (48, 256 // group_size)
    groups = w.reshape(48, -1, group_size)
    bound = (groups.amax(-1) - groups.amin(-1)) / 15 / 2  # (max - min) / 15 / 2 per group
    err = (dequantize_int4(q, scale, minimum, group_size) - w).reshape(48, -1, group_size).abs().amax(-1)
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    # both ends of each group are represented up to float rounding: the grid spans [min, max]
    deq = dequantize_int4(q, scale, minimum, group_size).reshape(48, -1, group_size)
    torch.testing.assert_close(deq.amin(-1), groups.amin(-1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_int4(torch.zeros(4, 100), 64)


def _error_bound(scheme: str, x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """|kernel(x) - x @ w.T| <= |x| @ dW.T + dX @ |w|.T + dX @ dW.T + output rounding, from each input's worst
    quantization error: dW from the weight format, dX from the activation format (per-token int8 for the dynamic
    scheme, bf16 for the weight-only kernels)."""
    if scheme == "int4_weight_only":
        g = w.reshape(w.shape[0], -1, group_size)
        d_w = ((g.amax(-1) - g.amin(-1)) / 30).repeat_interleave(group_size, dim=1)
        d_w = d_w + BF16_EPS * w.abs()  # the kernel keeps group scales and zeros in bf16
    else:
        d_w = (w.abs().amax(1, keepdim=True) / 254).expand_as(w) * (1 + BF16_EPS)  # scale/2 (bf16 scale: +eps)
    if scheme == "int8_dynamic":  # per token: each row's step is at most 2 * its max / levels
        levels = 255 if cpu.fbgemm_full_range() else 127
        d_x = (x.abs().amax(1, keepdim=True) / levels).expand_as(x)
    else:
        d_x = BF16_EPS * x.abs()
    out_rounding = 0.0 if scheme == "int8_dynamic" else BF16_EPS * (x.abs() @ w.abs().T)
    return x.abs() @ d_w.T + d_x @ w.abs().T + d_x @ d_w.T + out_rounding + 1e-6


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_cpu_kernels_stay_within_the_quantization_error_bound(scheme):
    lin = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights(96, 256, 2))
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3))
    x[1, 2] *= 50  # an outlier token: per-token activation scales keep the other tokens' precision
    qlin = cpu.LINEARS[scheme](lin, 64)
    for inputs in (x, x[:1, :1]):  # a prefill, and one decode token (kernels may take another path for it)
        with torch.inference_mode():
            y, ref = qlin(inputs), lin(inputs)
        assert y.shape == ref.shape and y.dtype == torch.float32
        err = (y - ref).abs().reshape(-1, 96)
        bound = _error_bound(scheme, inputs.reshape(-1, 256), lin.weight.detach(), 64)
        assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
        # and the kernel really is quantized: its error is not zero, yet far below the output's scale
        assert 0 < err.max() < 0.1 * ref.abs().max()


def token_rows(k: int) -> torch.Tensor:
    """Activation rows that per-tensor quantization would couple: signed, non-negative, an outlier, one far from
    zero (its span is a small part of its max), a constant one."""
    g = torch.Generator().manual_seed(4)
    signed, nonneg = torch.randn(k, generator=g), torch.rand(k, generator=g)
    offset = 10 + 0.1 * torch.randn(k, generator=g)
    return torch.stack([signed, nonneg, 50 * signed.roll(7), offset, torch.full((k,), -0.7)])


def test_int8_dynamic_quantizes_each_token_alone_whatever_its_batch():
    """One scheme at any row count: a row's output is the same alone (the single-row call of decode at batch 1),
    batched with any other row, and inside a prefill; so one request's result never depends on its neighbours."""
    lin = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights(96, 256, 5))
    qlin, rows = cpu.DynamicInt8Linear(lin), token_rows(256)
    with torch.inference_mode():
        alone = torch.cat([qlin(r[None]) for r in rows])
        for i, j in [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j]:
            pair = qlin(rows[[i, j]])
            torch.testing.assert_close(pair[0], alone[i], rtol=1e-6, atol=1e-6 * alone[i].abs().max())
        prefill = qlin(rows.flip(0).reshape(1, len(rows), 256))[0].flip(0)  # [B, T, K] as the model calls it
    torch.testing.assert_close(prefill, alone, rtol=1e-6, atol=1e-6 * alone.abs().max())


def test_int8_dynamic_error_is_within_each_tokens_own_asymmetric_step():
    """Against the int8 weight the kernel holds, the only error left is the activations': at most half a step of
    each row's own grid, (max - min) / levels / 2 per element. Symmetric per-row scaling would put the offset row
    on a grid about 40 times coarser (its span is 5% of its max), per-tensor scaling beside the outlier far more."""
    lin = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights(96, 256, 6))
    qlin, rows = cpu.DynamicInt8Linear(lin), token_rows(256)
    w_q = dequantize_int8(*quantize_int8(lin.weight.detach()))
    levels = 255 if cpu.fbgemm_full_range() else 127
    half_step = (rows.amax(1, keepdim=True) - rows.amin(1, keepdim=True)) / levels / 2
    exact = rows.double() @ w_q.double().T
    float_rounding = 1e-5 * (rows.abs() @ w_q.abs().T) + 1e-6
    with torch.inference_mode():
        batched, offset_alone = qlin(rows).double(), qlin(rows[3:4]).double()
    for y, n in ((batched, slice(None)), (offset_alone, slice(3, 4))):
        err = (y - exact[n]).abs()
        bound = half_step[n] * w_q.abs().sum(1) + float_rounding[n]
        assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
        assert err.max() > 0  # and it is quantized


def test_int8_dynamic_runs_scripted_with_the_python_functions_results():
    """The timed path is the TorchScript kernel (README: it skips Python's per-op dispatch); it computes what the
    Python function does, bit for bit, and the pinned torch scripts it, so no slower fallback goes unnoticed."""
    kernel = cpu._per_token_kernel()
    assert isinstance(kernel, torch.jit.ScriptFunction)
    qlin, rows = cpu.DynamicInt8Linear(nn.Linear(256, 96, bias=False)), token_rows(256)
    args = (qlin.packed, qlin.weight_row_sums, qlin.reduce_range)
    with torch.inference_mode():
        for x in (rows, rows[:1]):
            assert torch.equal(kernel(x, *args), cpu.per_token_matmul(x, *args))


def test_int8_dynamic_model_decodes_each_sequence_as_it_would_alone():
    """End to end: a batch of prompts gives each sequence the logits (and tokens) it gets decoded alone."""
    ref = Transformer.build(ARGS, seed=0)
    q = make_engine({"name": "quantized", "scheme": "int8_dynamic"}).prepare(ref, ctx())
    prompts = torch.randint(1, ARGS.vocab_size, (3, 10), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        q.setup_caches(3, 18)
        batched, tokens = q(prompts, torch.arange(10)), greedy(q, prompts, 8)
        for i in range(3):
            q.setup_caches(1, 18)
            torch.testing.assert_close(q(prompts[i : i + 1], torch.arange(10))[0], batched[i], rtol=1e-4, atol=1e-4)
            assert torch.equal(greedy(q, prompts[i : i + 1], 8)[0], tokens[i])


def test_packed_weights_are_the_expected_fraction_of_fp32():
    n, k, g = 256, 512, 64
    lin = nn.Linear(k, n, bias=False)
    fp32 = n * k * 4
    int8_wo = cpu.Int8WeightOnlyLinear(lin)
    assert int8_wo.weight_int8.dtype == torch.int8 and int8_wo.stored_bytes() == n * k + n * 2  # bf16 scales
    assert int8_wo.stored_bytes() / fp32 == pytest.approx(0.25, abs=0.01)
    dyn = cpu.DynamicInt8Linear(lin)
    assert dyn.stored_bytes() == n * k + 16 * n and dyn.stored_bytes() / fp32 == pytest.approx(0.25, abs=0.01)
    int4 = cpu.Int4WeightOnlyLinear(lin, g)
    assert int4.weight_int4.dtype == torch.uint8 and int4.weight_int4.numel() == n * k // 2  # two per byte
    assert int4.scales_and_zeros.shape == (k // g, n, 2) and int4.scales_and_zeros.dtype == torch.bfloat16
    assert int4.stored_bytes() == n * k // 2 + (k // g) * n * 2 * 2
    assert int4.stored_bytes() / fp32 == pytest.approx(1 / 8 + 1 / 8 / g * 8, rel=1e-9)  # 1/8 + scales/zeros


def test_prepared_model_runs_with_its_kv_cache_and_leaves_the_reference_alone():
    ref = Transformer.build(ARGS, seed=0)
    snapshot = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randint(1, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for scheme in CPU_SCHEMES:
        q = make_engine({"name": "quantized", "scheme": scheme}).prepare(ref, ctx())
        with torch.inference_mode():
            full = q(x)  # plain causal forward
            q.setup_caches(2, 20)
            cached = q(x, torch.arange(12))
        torch.testing.assert_close(cached, full, rtol=1e-3, atol=1e-3)
        assert greedy(q, x, 8).shape == (2, 8)
        info = q.engine_info
        assert info["scheme"] == scheme and info["backend"] == "aten" and info["layers_quantized"] == 14
        assert info["layers_unquantized"] == [
            {"layers": "output", "count": 1, "reason": "not selected by engine.layers=['all_but_head']"}
        ]
        assert weight_bytes(q) == info["weight_bytes"] == sum(info["weight_bytes_by_class"].values())
        assert set(info["weight_bytes_by_class"]) == {f"linear {scheme[:4]}", "embedding fp32", "norm fp32"}
        # the head quantized too (it has no .weight then): the cache still takes the model's dtype and device
        q_all = make_engine({"name": "quantized", "scheme": scheme, "layers": ["all"]}).prepare(ref, ctx())
        head_kept = q_all.engine_info["layers_unquantized"]  # int4 packs 16 rows at a time: 97 do not fit
        assert isinstance(q_all.output, nn.Linear) == bool(head_kept) == (scheme == "int4_weight_only")
        with torch.inference_mode():
            q_all.setup_caches(2, 20)
            torch.testing.assert_close(q_all(x, torch.arange(12)), q_all(x), rtol=1e-3, atol=1e-3)
        assert greedy(q_all, x, 8).shape == (2, 8)
    # the reference is what it was: same modules, same weights, no caches installed
    assert all(isinstance(ref.get_submodule(n), nn.Linear) for n in select_linears(ref, ("all",)))
    assert all(torch.equal(v, snapshot[k]) for k, v in ref.state_dict().items())
    assert ref.causal_mask is None and ref.layers[0].attention.kv_cache is None


def test_weight_bytes_count_what_is_stored_and_tied_weights_once():
    ref = Transformer.build(ARGS, seed=0)
    emb = ARGS.vocab_size * ARGS.dim * 4  # tied: the head shares the embedding, counted once
    norms = (2 * ARGS.n_layers + 1) * ARGS.dim * 4
    d, f, kv = ARGS.dim, ARGS.intermediate_size, ARGS.n_kv_heads * (ARGS.dim // ARGS.n_heads)
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * ARGS.n_layers  # (out, in) per linear
    assert weight_bytes(ref) == emb + norms + sum(n * k * 4 for n, k in shapes)
    q = make_engine({"name": "quantized", "scheme": "int8_weight_only"}).prepare(ref, ctx())
    assert weight_bytes(q) == emb + norms + sum(n * k + n * 2 for n, k in shapes)
    # quantizing the tied head as well stores its int8 copy beside the fp32 embedding
    q_all = make_engine({"name": "quantized", "scheme": "int8_weight_only", "layers": ["all"]}).prepare(ref, ctx())
    head = ARGS.vocab_size * ARGS.dim + ARGS.vocab_size * 2
    assert weight_bytes(q_all) == weight_bytes(q) + head and q_all.engine_info["layers_unquantized"] == []
    assert q.engine_info["weight_bytes_ratio"] == pytest.approx(weight_bytes(q) / weight_bytes(ref))
    # an fp32 model's weight-only linears run bf16 activations: the record says so beside the speedup
    assert q.engine_info["activations"].startswith("bf16") and q.engine_info["precision_caveat"] == (
        "the quantized linears take bf16 activations (the model is fp32): part of any speedup over fp32 eager is that "
        "lower precision"
    )


def test_torchao_backend_runs_on_cpu_and_counts_its_tensor_subclass_bytes():
    """The CUDA path (torchao's quantize_) exercised where it also runs: on the CPU, for the int8 schemes."""
    ref = Transformer.build(ARGS, seed=0)
    x = torch.randint(1, ARGS.vocab_size, (1, 8))
    for scheme in ("int8_dynamic", "int8_weight_only"):
        eng = make_engine({"name": "quantized", "scheme": scheme, "backend": "torchao"})
        assert eng.available(CPU) is None
        q = eng.prepare(ref, ctx())
        info = q.engine_info
        assert info["backend"] == "torchao" and info["torchao_version"] and "converted on every call" in info["note"]
        assert type(q.layers[0].attention.wq.weight).__name__ == "Int8Tensor"
        assert type(ref.layers[0].attention.wq.weight) is nn.Parameter  # the reference keeps its own weights
        int8 = sum(v for k, v in info["weight_bytes_by_class"].items() if "Int8Tensor" in k)
        linear_params = sum(ref.get_submodule(n).weight.numel() for n in select_linears(ref, ("all_but_head",)))
        assert linear_params <= int8 <= linear_params * 1.05  # int8 values plus per-row scales and zero points
        with torch.inference_mode():
            torch.testing.assert_close(q(x), ref(x), rtol=0.05, atol=0.05)
    int4 = make_engine({"name": "quantized", "scheme": "int4_weight_only", "backend": "torchao"})
    assert int4.available(CPU).startswith("torchao 0.18.0 cannot run int4_weight_only on cpu")


def test_layer_patterns_and_unsupported_shapes_are_recorded():
    odd = ModelArgs(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=150, max_seq_len=64)
    ref = Transformer.build(odd, seed=0)
    names = select_linears(ref, ("feed_forward.w2", "layers.0.attention.*"))
    assert names == [f"layers.0.attention.{w}" for w in ("wq", "wk", "wv", "wo")] + [
        "layers.0.feed_forward.w2", "layers.1.feed_forward.w2",
    ]  # fmt: skip
    assert select_linears(ref, ("attention",)) == [n for n in select_linears(ref, ("all",)) if ".attention." in n]
    with pytest.raises(ValueError, match=r"engine.layers: 'feedforward' matches no linear layer; the names are like"):
        select_linears(ref, ("feedforward",))
    q = make_engine({"name": "quantized", "scheme": "int4_weight_only", "group_size": 32}).prepare(ref, ctx(odd))
    info = q.engine_info
    skipped = {e["layers"]: e for e in info["layers_unquantized"]}
    assert "out_features divisible by 16 (got 150)" in skipped["feed_forward.w1"]["reason"]
    assert "in_features 150 is not a multiple of group_size 32" in skipped["feed_forward.w2"]["reason"]
    assert skipped["feed_forward.w2"]["count"] == 2 and info["layers_quantized_by_kind"] == {
        "attention.wq": 2, "attention.wk": 2, "attention.wv": 2, "attention.wo": 2,
    }  # fmt: skip
    assert type(q.layers[0].feed_forward.w2) is nn.Linear and "linear fp32" in info["weight_bytes_by_class"]
    with pytest.raises(ValueError, match="no selected layer could be quantized with int4_weight_only"):
        make_engine({"name": "quantized", "scheme": "int4_weight_only", "layers": ["w2"]}).prepare(ref, ctx(odd))


def test_params_are_validated_and_the_variant_names_the_scheme():
    assert make_engine({"name": "quantized"}).variant() == "quantized(scheme=int8_dynamic)"
    eng = make_engine({"name": "quantized", "scheme": "int4_weight_only", "group_size": 128, "layers": ["attention"]})
    assert eng.variant() == "quantized(scheme=int4_weight_only, group_size=128, layers=('attention',))"
    # per-channel schemes have no groups: group_size does not make another point of the same model
    same = make_engine({"name": "quantized", "scheme": "int8_weight_only", "group_size": 32})
    assert same.param_dict() == make_engine({"name": "quantized", "scheme": "int8_weight_only"}).param_dict()
    assert same.variant() == "quantized(scheme=int8_weight_only)"
    for params, msg in [
        ({"scheme": "int3"}, r"engine.scheme: 'int3' is not allowed; allowed: int8_dynamic, int8_weight_only"),
        ({"group_size": 48}, r"engine.group_size: 48 is not allowed; allowed: 32, 64, 128, 256"),
        ({"backend": "cuda"}, r"engine.backend: 'cuda' is not allowed; allowed: auto, aten, torchao"),
        ({"layers": []}, r"engine.layers: give all_but_head or all, or module-name patterns"),
        ({"layers": ["all", "attention"]}, r"engine.layers: all_but_head and all stand alone"),
        # no device runs it: refused before the sweep, not recorded as skipped (unavailable here)
        ({"backend": "triton", "scheme": "int8_dynamic"},
         r"engine.backend: triton runs scheme=int8_weight_only only, got scheme=int8_dynamic; choose"),
    ]:
        with pytest.raises(EngineError, match=msg):
            make_engine({"name": "quantized", **params})


def test_unavailable_schemes_say_why():
    fp8 = make_engine({"name": "quantized", "scheme": "fp8"})
    assert fp8.available(CPU) == "fp8 needs a CUDA GPU with compute capability 8.9+ (this device: cpu)"
    aten = make_engine({"name": "quantized", "backend": "aten"})
    assert "engine.backend=aten runs CPU kernels" in aten.available(torch.device("cuda"))
    for scheme in CPU_SCHEMES:
        assert make_engine({"name": "quantized", "scheme": scheme}).available(CPU) is None


def test_the_sweep_preset_lists_eager_and_every_scheme(compose_cfg):
    import yaml
    from omegaconf import OmegaConf

    from harness.paths import config_dir

    preset = yaml.safe_load((config_dir() / "sweep" / "quantized.yaml").read_text())
    options = preset["hydra"]["sweeper"]["params"]["engine"].split(",")
    variants = [make_engine(OmegaConf.to_container(compose_cfg(f"engine={o}").engine)).variant() for o in options]
    assert variants == ["eager"] + [f"quantized(scheme={s})" for s in CPU_SCHEMES + ("fp8",)]


def test_sweep_beside_eager_records_the_unavailable_scheme_as_skipped(run_harness, tmp_path):
    sweep = tmp_path / "sweep"
    code = run_harness(
        "run", "-m", "engine=eager,quantized/int8_dynamic,quantized/fp8,quantized/int4_weight_only",
        "model=tiny", "model.weights=random", "model.n_layers=2", "quality.n_seqs=2", "quality.seq_len=64",
        "quality.greedy_prompts=1", *QUICK, f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert code == 0
    df = load(sweep).set_index("variant")
    assert list(df["status"].sort_index().items()) == [
        ("eager", "ok"),
        ("quantized(scheme=fp8)", "skipped"),
        ("quantized(scheme=int4_weight_only)", "ok"),
        ("quantized(scheme=int8_dynamic)", "ok"),
    ]
    assert df.loc["quantized(scheme=fp8)", "error"].startswith("fp8 needs a CUDA GPU with compute capability 8.9+")
    int8 = df.loc["quantized(scheme=int8_dynamic)"]
    assert int8["engine.scheme"] == "int8_dynamic" and int8["tpot_ms_p50"] > 0
    assert 0.5 < int8["fidelity_top1"] <= 1 and int8["fidelity_kl"] > 0  # measured against eager, and not free
    assert int8["weight_bytes"] < 0.6 * df.loc["eager", "weight_bytes"]  # the embedding stays fp32


def test_int8_schemes_keep_top1_agreement_on_the_trained_tiny(trained_tiny):
    from harness import fidelity, training
    from harness.corpus import load_corpus, windows

    args = ModelArgs.from_dict(trained_tiny["args"])
    ref = training.load_trained(args, trained_tiny["path"], CPU, torch.float32)
    tokens = windows(load_corpus().tokens("heldout"), 8, 256, 0)
    for scheme in ("int8_dynamic", "int8_weight_only"):
        q = make_engine({"name": "quantized", "scheme": scheme}).prepare(ref, ctx(args))
        out = fidelity.teacher_forced(ref, q, tokens, with_ppl=False)
        assert out["top1_agreement"] >= 0.98, (scheme, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only", "int4_weight_only", "fp8"])
def test_torchao_schemes_on_cuda(scheme):
    """The CUDA path end to end: torchao on a bf16 model, close to the reference, bytes below bf16's."""
    dev = torch.device("cuda")
    eng = make_engine({"name": "quantized", "scheme": scheme})
    reason = eng.available(dev)
    if reason:
        pytest.skip(reason)  # fp8 below compute capability 8.9
    ref = Transformer.build(ARGS, device=dev, dtype=torch.bfloat16, seed=0)
    q = eng.prepare(ref, PrepareContext(dev, torch.bfloat16, 0, "t", ARGS, "/nonexistent"))
    assert q.engine_info["backend"] == "torchao" and q.engine_info["layers_quantized"] == 14
    assert weight_bytes(q) < weight_bytes(ref)
    x = torch.randint(1, ARGS.vocab_size, (2, 12), device=dev)
    with torch.inference_mode():
        q.setup_caches(2, 20)
        out, expected = q(x, torch.arange(12, device=dev)), ref(x)
    out, expected = (t.float() - t.float().mean(-1, keepdim=True) for t in (out, expected))
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.98  # CPU: >= 0.996
