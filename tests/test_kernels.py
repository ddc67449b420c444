"""Triton kernels against the PyTorch compositions they replace, on fresh random inputs of odd shapes.

Without CUDA they run under Triton's interpreter (``engines.kernels`` switches it on), so this file checks the
kernels' arithmetic on every machine; on a GPU the same tests check the compiled kernels. Also: the quantized
engine's ``backend=triton`` reuses the int8 kernel."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engines import kernels
from engines.base import EngineError, PrepareContext, make_engine
from engines.kernels.attention import decode_attention
from engines.kernels.int8_gemv import Int8TritonLinear, int8_weight_only_matmul
from engines.kernels.rmsnorm import add_rmsnorm, rmsnorm
from engines.kernels.rope import rope_
from engines.kernels.swiglu import swiglu
from engines.llama import ModelArgs, RMSNorm, Transformer, apply_rope, rope_frequencies
from engines.quant.formats import dequantize_int8, quantize_int8

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32 = {"rtol": 1e-5, "atol": 1e-5}
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(kernels.unavailable(DEV) is not None, reason=str(kernels.unavailable(DEV)))


def rand(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def test_the_interpreter_is_on_exactly_when_cuda_is_absent():
    assert kernels.interpreted() == (not torch.cuda.is_available())
    if kernels.interpreted():
        assert "not representative" in kernels.timing_caveat(torch.device("cpu"))
        with pytest.raises(ValueError, match="fp32 and fp16 only"):
            kernels.check_dtype(torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's import order matters on a CPU only")
def test_kernels_run_when_triton_was_imported_before_the_interpreter_was_switched_on(subprocess_env):
    """``import torch._dynamo`` (any torch.compile) imports triton without TRITON_INTERPRET; the kernels must still
    run interpreted afterwards (they avoid triton's own jit reductions, decorated at that first import)."""
    code = (
        "import sys, torch, torch._dynamo; assert 'triton' in sys.modules; "
        "import torch.nn.functional as F; "
        "from engines.kernels.rmsnorm import add_rmsnorm; from engines.kernels.attention import decode_attention; "
        "x = torch.randn(3, 40); w = torch.rand(40); y, h = add_rmsnorm(x, x, w, 1e-5); "
        "ref = (2 * x) * torch.rsqrt((2 * x).pow(2).mean(-1, keepdim=True) + 1e-5) * w; "
        "torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5); "
        "q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16); "
        "out = decode_attention(q, k, v, torch.tensor([49])); "
        "want = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]; "
        "torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5); print('ok')"
    )
    env = {k: v for k, v in subprocess_env.items() if k != kernels.INTERPRET_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 257), (2, 768), (37, 100)])
def test_add_rmsnorm_matches_add_then_rmsnorm(shape):
    x, r = rand(*shape, seed=1), rand(*shape, seed=2, scale=3.0)
    ref_norm = RMSNorm(shape[-1], 1e-5).to(DEV)
    with torch.no_grad():
        ref_norm.weight.copy_(rand(shape[-1], seed=3))
        y, h = add_rmsnorm(x, r, ref_norm.weight, 1e-5)
        torch.testing.assert_close(h, x + r, **FP32)
        torch.testing.assert_close(y, ref_norm(x + r), **FP32)
        torch.testing.assert_close(rmsnorm(x, ref_norm.weight, 1e-5), ref_norm(x), **FP32)
    assert y.shape == h.shape == x.shape


def test_add_rmsnorm_in_fp16_rounds_like_the_reference():
    x, r = rand(4, 96, seed=4, dtype=torch.float16), rand(4, 96, seed=5, dtype=torch.float16)
    w = rand(96, seed=6, dtype=torch.float16)
    norm = RMSNorm(96, 1e-5).to(DEV, torch.float16)
    with torch.no_grad():
        norm.weight.copy_(w)
        y, h = add_rmsnorm(x, r, w, 1e-5)
        assert y.dtype == h.dtype == torch.float16
        torch.testing.assert_close(h, x + r, rtol=0, atol=0)
        torch.testing.assert_close(y, norm(x + r), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape", [(1, 150), (3, 7, 353), (70001,)])
def test_swiglu_matches_silu_times_up(shape):
    g, u = rand(*shape, seed=7, scale=4.0), rand(*shape, seed=8)
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u, **FP32)
    with pytest.raises(ValueError, match="differ"):
        swiglu(g, u[..., :-1])


def _tables(d: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the tokens' positions, as the model computes them (fp32, [S, D/2])."""
    angles = torch.outer(positions.float(), rope_frequencies(ModelArgs(dim=d * 4, n_heads=4), DEV))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("b,s,hq,hkv,d", [(1, 1, 4, 2, 16), (2, 5, 6, 2, 24), (3, 7, 8, 8, 10), (2, 33, 12, 4, 64)])
def test_rope_rotates_q_and_k_in_place_like_apply_rope(b, s, hq, hkv, d):
    q, k = rand(b, s, hq, d, seed=9), rand(b, s, hkv, d, seed=10)
    positions = torch.randperm(500, generator=torch.Generator().manual_seed(s))[:s].sort().values.to(DEV)
    cos, sin = _tables(d, positions)
    want_q, want_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ptr_q, ptr_k = q.data_ptr(), k.data_ptr()
    out_q, out_k = rope_(q, k, cos, sin)
    assert out_q.data_ptr() == ptr_q and out_k.data_ptr() == ptr_k  # in place
    torch.testing.assert_close(q, want_q, **FP32)
    torch.testing.assert_close(k, want_k, **FP32)


def _reference_decode(q, k_cache, v_cache, pos: int) -> torch.Tensor:
    """The reference model's path: boolean mask row ``pos`` of the causal mask over the whole static cache."""
    mask = torch.arange(k_cache.shape[2], device=DEV) <= pos
    gqa = q.shape[1] != k_cache.shape[1]
    y = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask[None, None, None],
                                       enable_gqa=gqa)  # fmt: skip
    return y[:, :, 0]


@pytest.mark.parametrize(
    "b,hq,hkv,d,t,pos,splits",
    [
        (1, 4, 4, 16, 40, 0, None),  # first position, no grouping
        (2, 8, 2, 24, 100, 63, None),  # GQA 4:1, head_dim not a power of two
        (3, 12, 4, 64, 300, 299, 5),  # GQA 3:1, the last position, odd chunk count
        (1, 6, 3, 80, 257, 130, 7),  # GQA 2:1, chunks past the position are empty
        (2, 2, 1, 32, 1000, 777, None),  # long cache: several chunks
    ],
)
def test_decode_attention_matches_sdpa_over_the_masked_static_cache(b, hq, hkv, d, t, pos, splits):
    q = rand(b, hq, d, seed=11)
    k_cache, v_cache = rand(b, hkv, t, d, seed=12), rand(b, hkv, t, d, seed=13)
    k_cache[:, :, pos + 1 :] = 1e4  # stale entries past the position must never be read
    v_cache[:, :, pos + 1 :] = float("nan")
    input_pos = torch.tensor([pos], device=DEV)
    got = decode_attention(q, k_cache, v_cache, input_pos, splits=splits)
    assert got.shape == (b, hq, d) and got.dtype == q.dtype
    k_cache[:, :, pos + 1 :] = 0.0
    v_cache[:, :, pos + 1 :] = 0.0
    torch.testing.assert_close(got, _reference_decode(q, k_cache, v_cache, pos), **FP32)


def test_decode_attention_in_fp16():
    q = rand(2, 8, 32, seed=14, dtype=torch.float16)
    k, v = rand(2, 4, 70, 32, seed=15, dtype=torch.float16), rand(2, 4, 70, 32, seed=16, dtype=torch.float16)
    got = decode_attention(q, k, v, torch.tensor([50], device=DEV))
    want = _reference_decode(q.float(), k.float(), v.float(), 50)
    torch.testing.assert_close(got.float(), want, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("m,k,n", [(1, 64, 96), (3, 100, 37), (17, 256, 130), (70, 48, 20)])
def test_int8_matmul_matches_the_dequantized_weight(m, k, n):
    x, w = rand(m, k, seed=17), rand(n, k, seed=18, scale=0.05)
    q, scale = quantize_int8(w)
    q, scale = q.to(DEV), scale.to(DEV)
    got = int8_weight_only_matmul(x, q, scale)
    want = x @ dequantize_int8(q, scale).T
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * math.sqrt(k))


@pytest.mark.gpu
@pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA: the output is 4 GiB and more (2**31 elements)")
def test_int8_matmul_addresses_outputs_past_2_to_the_31_elements():
    """A prefill through Llama-3's output head: 16800 rows x 128256 outputs overflow 32-bit offsets."""
    m, k, n = 16800, 64, 128256
    x = rand(m, k, seed=3, dtype=torch.bfloat16)
    q, scale = quantize_int8(rand(n, k, seed=4, scale=0.05))
    q, scale = q.to(DEV), scale.to(DEV, torch.bfloat16)
    got = int8_weight_only_matmul(x, q, scale)
    for rows in (slice(0, 8), slice(m - 8, m)):  # the last rows sit past element 2**31
        want = x[rows].float() @ dequantize_int8(q, scale).float().T
        torch.testing.assert_close(got[rows].float(), want, rtol=2e-2, atol=2e-2)


def test_quantized_engine_reuses_the_int8_kernel_with_backend_triton():
    args = ModelArgs(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=150,
                     max_seq_len=64)  # fmt: skip
    ref = Transformer.build(args, device=DEV, seed=0)
    eng = make_engine({"name": "quantized", "scheme": "int8_weight_only", "backend": "triton"})
    assert eng.available(DEV) is None
    assert eng.variant() == "quantized(scheme=int8_weight_only, backend=triton)"
    assert (eng.timing_caveat(DEV) is None) == (DEV.type == "cuda")
    with pytest.raises(EngineError, match=r"engine.backend: triton runs scheme=int8_weight_only only, got scheme=int4"):
        make_engine({"name": "quantized", "scheme": "int4_weight_only", "backend": "triton"})  # on no device
    q = eng.prepare(ref, PrepareContext(DEV, torch.float32, 0, "t", args, "/nonexistent"))
    info = q.engine_info
    assert info["backend"] == "triton" and info["kernel"] == Int8TritonLinear.kernel and info["layers_quantized"] == 14
    assert isinstance(q.layers[1].feed_forward.w2, Int8TritonLinear)  # in_features 150: no multiple-of-16 rule
    # the same model with each linear's weight replaced by its dequantized int8 copy, computed by PyTorch
    deq = Transformer.build(args, device=DEV, seed=0)
    with torch.no_grad():
        for name, mod in deq.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "output":
                mod.weight.copy_(dequantize_int8(*quantize_int8(mod.weight)))
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.inference_mode():
        q.setup_caches(2, 12)
        deq.setup_caches(2, 12)
        pos = torch.arange(9, device=DEV)
        torch.testing.assert_close(q(x, pos), deq(x, pos), rtol=1e-4, atol=1e-4)
        nxt = torch.tensor([[5], [7]], device=DEV)
        torch.testing.assert_close(q(nxt, pos[-1:] + 1), deq(nxt, pos[-1:] + 1), rtol=1e-4, atol=1e-4)


def _check_rmsnorm() -> None:
    x, r, w = rand(5, 100, seed=20), rand(5, 100, seed=21), rand(100, seed=22)
    norm = RMSNorm(100, 1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(w)
        torch.testing.assert_close(add_rmsnorm(x, r, w, 1e-5)[0], norm(x + r), **FP32)


def _check_swiglu() -> None:
    g, u = rand(3, 1001, seed=23), rand(3, 1001, seed=24)
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u, **FP32)


def _check_rope() -> None:
    q, k = rand(2, 3, 6, 24, seed=25), rand(2, 3, 2, 24, seed=26)
    cos, sin = _tables(24, torch.tensor([3, 9, 40], device=DEV))
    want_q, want_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rope_(q, k, cos, sin)
    torch.testing.assert_close((q, k), (want_q, want_k), **FP32)


def _check_attention() -> None:
    q, k, v = rand(2, 8, 24, seed=27), rand(2, 2, 300, 24, seed=28), rand(2, 2, 300, 24, seed=29)
    got = decode_attention(q, k, v, torch.tensor([200], device=DEV), splits=3)
    torch.testing.assert_close(got, _reference_decode(q, k, v, 200), **FP32)


def _check_int8() -> None:
    w = rand(70, 300, seed=30, scale=0.05)
    q, scale = (t.to(DEV) for t in quantize_int8(w))
    for m in (3, 20):  # both row blocks: decode's 16 and a prefill's 64
        x = rand(m, 300, seed=31)
        torch.testing.assert_close(int8_weight_only_matmul(x, q, scale), x @ dequantize_int8(q, scale).T,
                                   rtol=1e-5, atol=2e-4)  # fmt: skip


@pytest.mark.parametrize("module,kernel,check", [
    ("rmsnorm", "_add_rmsnorm_kernel", _check_rmsnorm), ("swiglu", "_swiglu_kernel", _check_swiglu),
    ("rope", "_rope_kernel", _check_rope), ("attention", "_decode_attention_split_kernel", _check_attention),
    ("int8_gemv", "_int8_matmul_kernel", _check_int8),
])  # fmt: skip
def test_every_gpu_autotune_config_computes_the_same(module, kernel, check):
    """Each block-size configuration the GPU autotuner may pick, run on its own (under the interpreter on a CPU),
    so that masks and loop bounds are right for all of them, not only for the one the interpreter uses."""
    import importlib

    mod = importlib.import_module(f"engines.kernels.{module}")
    tuner = getattr(mod, kernel)
    saved = tuner.configs
    try:
        for config in mod.GPU_CONFIGS:
            tuner.configs = [config]
            check()
    finally:
        tuner.configs = saved


@pytest.mark.parametrize("module,kernel,offsets", [
    ("swiglu", "_swiglu_kernel", ["offs = tl.program_id(0).to(tl.int64) * BLOCK"]),
    ("rmsnorm", "_add_rmsnorm_kernel", ["r64 = rows.to(tl.int64)", "X + r64 * stride_x", "R + r64 * stride_r",
                                        "H + r64 * stride_h", "Y + r64 * stride_y"]),
    ("rope", "_rotate", ["X + rows.to(tl.int64)[:, None] * stride"]),
])  # fmt: skip
def test_element_offsets_are_int64_past_2_to_the_31(module, kernel, offsets):
    """tokens x width passes 2**31 in large prefills (swiglu at 149,797 tokens of Llama-3-8B, the norms and RoPE
    at 524,288 tokens of dim 4096): an int32 offset would wrap negative and still pass its mask. Too large to run
    to run without a large GPU, so the kernels' source is read too (a lint): every pointer offset is computed in
    int64, as the int8 kernel's are. The behaviour itself is checked on CUDA by the *_past_2_to_the_31_elements
    tests below."""
    import importlib
    import inspect

    fn = getattr(importlib.import_module(f"engines.kernels.{module}"), kernel)
    fn = getattr(fn, "fn", fn)  # an autotuner wraps the jit function
    source = inspect.getsource(getattr(fn, "fn", fn))
    assert all(o in source for o in offsets)
    # no pointer is offset by an int32 product of rows and a stride
    assert "rows[:, None] * stride" not in source and "tl.program_id(0) * BLOCK " not in source


BIG_W = 4096
BIG_ROWS = 2**31 // BIG_W + 8  # the last 8 rows' elements sit past 2**31 (fp16: 4 GiB a tensor)
gpu_big = [pytest.mark.gpu, pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA: 2**31+ elements, 4 GiB each")]
# (applied as two decorators: the gpu marker selects them with -m gpu, the skip names the reason without CUDA)


def _free_cuda():
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@gpu_big[0]
@gpu_big[1]
def test_swiglu_past_2_to_the_31_elements():
    """The behaviour the source lint above stands for: the last rows of a 2**31+ element swiglu are right."""
    g = torch.randn(BIG_ROWS, BIG_W, device=DEV, dtype=torch.float16)
    u = torch.randn_like(g)
    out = swiglu(g, u)
    for rows in (slice(0, 8), slice(BIG_ROWS - 8, BIG_ROWS)):
        want = F.silu(g[rows].float()) * u[rows].float()
        torch.testing.assert_close(out[rows].float(), want, rtol=2e-3, atol=2e-3)
    del g, u, out
    _free_cuda()


@gpu_big[0]
@gpu_big[1]
def test_add_rmsnorm_past_2_to_the_31_elements():
    x = torch.randn(BIG_ROWS, BIG_W, device=DEV, dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.rand(BIG_W, device=DEV, dtype=torch.float16) + 0.5
    y, h = add_rmsnorm(x, r, w, 1e-5)
    for rows in (slice(0, 8), slice(BIG_ROWS - 8, BIG_ROWS)):
        want_h = x[rows].float() + r[rows].float()
        want_y = want_h * torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
        torch.testing.assert_close(h[rows].float(), want_h, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(y[rows].float(), want_y, rtol=1e-2, atol=1e-2)
    del x, r, y, h
    _free_cuda()


@gpu_big[0]
@gpu_big[1]
def test_rope_past_2_to_the_31_elements():
    hq, hkv, d = 32, 8, 128  # q: 4096 elements a token; 2**31 // 4096 + 8 tokens
    s = 2**31 // (hq * d) + 8
    q = torch.randn(1, s, hq, d, device=DEV, dtype=torch.float16)
    k = torch.randn(1, s, hkv, d, device=DEV, dtype=torch.float16)
    cos, sin = _tables(d, torch.arange(s, device=DEV))
    rows = [slice(0, 8), slice(s - 8, s)]
    want = [(apply_rope(q[:, r].float(), cos[r], sin[r]), apply_rope(k[:, r].float(), cos[r], sin[r])) for r in rows]
    rope_(q, k, cos, sin)
    for r, (want_q, want_k) in zip(rows, want, strict=True):
        torch.testing.assert_close(q[:, r].float(), want_q, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(k[:, r].float(), want_k, rtol=1e-2, atol=1e-2)
    del q, k
    _free_cuda()


def test_row_count_buckets_key_the_autotuners_of_row_kernels():
    """The block a prefill (many rows) was tuned for must not be reused for decode (batch-size rows)."""
    from engines.kernels import row_bucket
    from engines.kernels.rmsnorm import _add_rmsnorm_kernel
    from engines.kernels.rope import _rope_kernel

    assert "M_BUCKET" in _add_rmsnorm_kernel.keys and "M_BUCKET" in _rope_kernel.keys
    assert [row_bucket(m) for m in (1, 2, 3, 8, 9, 64, 65, 32768)] == [1, 2, 4, 8, 16, 64, 64, 64]
