"""Reference model: named shapes, parameter counts, and KV-cache correctness."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engines.llama import (
    ModelArgs,
    RMSNorm,
    Transformer,
    apply_rope,
    rope_frequencies,
    rope_pair_tables,
    rotate_pairs,
    starts_at_zero,
)
from harness.paths import model_shape as shape

# Parameter counts of the real models these shapes copy (from their published configs).
KNOWN = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "llama-3.2-1b", "llama-3-8b"])
def test_named_shape_param_count_matches_module(name):
    args = shape(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    if name in KNOWN:
        assert args.num_params() == KNOWN[name]


def test_named_shape_sizes():
    assert 1e6 < shape("tiny").num_params() < 1e7
    assert 0.9e8 < shape("small").num_params() < 1.1e8
    medium = shape("medium")
    assert 3.2e8 < medium.num_params() < 3.8e8
    assert medium.num_params() * 4 > 480 * 2**20, "medium must not fit a 480 MB L3 in fp32"


@pytest.mark.parametrize("n_kv_heads,tie", [(4, True), (2, False), (1, False)])
def test_cached_decode_equals_full_forward(n_kv_heads, tie):
    args = ModelArgs(
        vocab_size=101,
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        intermediate_size=96,
        max_seq_len=64,
        tie_embeddings=tie,
    )
    model = Transformer.build(args, seed=1)
    tokens = torch.randint(0, args.vocab_size, (3, 40))
    with torch.inference_mode():
        full = model(tokens)
        model.setup_caches(3, 48)
        steps = [model(tokens[:, :17], torch.arange(17))]  # prefill
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(17, 30)]  # decode
        steps.append(model(tokens[:, 30:], torch.arange(30, 40)))  # a second chunk of prefill
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_rope_is_the_rotation_of_interleaved_pairs():
    """The three-kernel form (x * cos + swapped pairs * signed sin) is the textbook rotation of each pair."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 16, generator=gen)
    angles = torch.rand(5, 8, generator=gen) * 2 * math.pi
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    want = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, rtol=1e-6, atol=1e-6)
    cos2, sin2 = rope_pair_tables(cos, sin)
    torch.testing.assert_close(rotate_pairs(x, cos2, sin2), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(rotate_pairs(x, cos2[:, None], sin2[:, None]), rotate_pairs(x, cos2, sin2))  # [S, 1, D] too
    bf16 = apply_rope(x.bfloat16(), cos, sin)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_textbook_formula(dtype):
    """fp32 takes F.rms_norm (one op), other dtypes normalize in fp32: both are x / rms(x) * weight."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, generator=gen).to(dtype)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    xf = x.float()
    want = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    got = norm(x)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_build_is_seeded_and_tied(small_args):
    a = Transformer.build(small_args, seed=3)
    b = Transformer.build(small_args, seed=3)
    c = Transformer.build(small_args, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
            assert pa.std() > 0, name
    tied = Transformer.build(ModelArgs(tie_embeddings=True), seed=0)
    assert tied.output.weight is tied.tok_embeddings.weight


def test_build_in_bf16_keeps_rope_in_fp32(small_args):
    model = Transformer.build(small_args, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cos, sin = model.rope("cpu")
    assert cos.dtype == torch.float32 and cos.shape == (small_args.max_seq_len, small_args.head_dim // 2)
    cos2, sin2 = model.rope_pairs("cpu")
    assert cos2.dtype == sin2.dtype == torch.float32 and cos2.shape == (small_args.max_seq_len, small_args.head_dim)
    model.setup_caches(1, 8)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_llama3_rope_scaling_keeps_high_frequencies_and_scales_low_ones():
    args = shape("llama-3.2-1b")
    plain = rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": None}), "cpu")
    scaled = rope_frequencies(args, "cpu")
    factor = args.rope_scaling["factor"]
    wavelen = 2 * math.pi / plain
    old = args.rope_scaling["original_max_position_embeddings"]
    high = wavelen < old / args.rope_scaling["high_freq_factor"]
    low = wavelen > old / args.rope_scaling["low_freq_factor"]
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / factor)
    mid = ~(high | low)
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / factor)).all()


def test_setup_caches_rejects_too_long_context(small_args, small_model):
    with pytest.raises(ValueError, match="exceeds"):
        small_model.setup_caches(1, small_args.max_seq_len + 1)


def test_forward_with_positions_requires_caches(small_args):
    model = Transformer.build(small_args)
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(torch.tensor([[1, 2]]), torch.arange(2))


class KeyLengths(TorchDispatchMode):
    """The key length of every scaled-dot-product attention a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.overloadpacket.__name__:
            self.keys.append(args[1].shape[-2])
        return func(*args, **(kwargs or {}))


def test_prefill_from_zero_attends_over_its_own_rows_whatever_the_cache_length():
    """TTFT must not grow with gen_len: a prefill at positions 0..S-1 attends over S keys, causally and
    without a mask, and its logits are the plain causal forward's."""
    args = ModelArgs(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                     max_seq_len=1100, tie_embeddings=False)  # fmt: skip
    model = Transformer.build(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(tokens)
        out = {}
        for cache_len in (25, 1024):
            model.setup_caches(2, cache_len)
            with KeyLengths() as seen:
                out[cache_len] = model(tokens, torch.arange(24))
            assert seen.keys == [24] * args.n_layers
            cache = model.layers[0].attention.kv_cache.k_cache  # filled at the prompt's rows, zero past them
            assert cache[:, :, :24].abs().sum() > 0 and not cache[:, :, 24:].any()
        torch.testing.assert_close(out[25], full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1024], out[25], rtol=0, atol=0)
        # the masked static path (forced, or a chunk at a later offset) gives the same logits over the whole cache
        with KeyLengths() as seen:
            masked = model(tokens, torch.arange(24), from_zero=False)
        assert seen.keys == [1024] * args.n_layers
        torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)
        chunk = model(tokens[:, 16:], torch.arange(16, 24))
        torch.testing.assert_close(chunk, full[:, 16:], rtol=1e-5, atol=1e-5)


def test_prefill_from_zero_is_read_from_the_positions_only_for_prefills():
    assert starts_at_zero(torch.arange(5), 5) and not starts_at_zero(torch.arange(3, 8), 5)
    assert not starts_at_zero(torch.tensor([0]), 1)  # a decode step (or a one-token prompt) keeps its mask
    model = Transformer.build(ModelArgs(vocab_size=11, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                        intermediate_size=8, max_seq_len=16))  # fmt: skip
    model.setup_caches(1, 8)
    tok = torch.tensor([[3, 4, 5]])
    assert model.positions(tok, torch.arange(3))[0] is None
    assert model.positions(tok, torch.arange(3), from_zero=False)[0].shape == (1, 1, 3, 8)
    assert model.positions(tok[:, :1], torch.tensor([0]), from_zero=True)[0].shape == (1, 1, 1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gqa_prefill_and_decode_on_cuda_never_need_sdpas_math_backend():
    """A mask with enable_gqa sends CUDA's SDPA to its math backend (scores of [B, Hq, S, T] materialized): with
    only flash and memory-efficient attention allowed, a bf16 GQA generation still runs, and matches the math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = ModelArgs(vocab_size=512, dim=512, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=1024,
                     max_seq_len=1024)  # fmt: skip
    model = Transformer.build(args, device="cuda", dtype=torch.bfloat16, seed=0)
    tokens = torch.randint(0, args.vocab_size, (4, 128), device="cuda")
    out = {}
    with torch.inference_mode():
        for name, backends in (("fast", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
                               ("math", [SDPBackend.MATH])):  # fmt: skip
            model.setup_caches(4, 1024)
            with sdpa_kernel(backends):
                prefill = model(tokens, torch.arange(128, device="cuda"))
                step = model(tokens[:, :1], torch.tensor([128], device="cuda"))
            out[name] = torch.cat([prefill, step], dim=1)
    torch.testing.assert_close(out["fast"], out["math"], rtol=2e-2, atol=2e-2)
