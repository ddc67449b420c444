"""CPU kernels for quantized linears: modules that replace ``nn.Linear`` inside the engine's copy of the model.

Each keeps only its quantized storage (no fp32 copy of the weight is left) and says how many bytes it stores.
Chosen by measuring per-layer speed on this repository's shapes (README, "Quantized engine"):

- ``DynamicInt8Linear``: fbgemm's ``quantized::linear_dynamic``. Per-channel int8 weights, prepacked; each call
  quantizes the activations to uint8 per token, asymmetric (each row on its own min..max grid, at one row or
  many; fbgemm itself takes one range per tensor, so rows are mapped onto [0, 1] first) and multiplies in int32
  (VNNI where the CPU has it).
- ``Int8WeightOnlyLinear``: ``aten._weight_int8pack_mm``. Per-channel int8 weights read directly by the kernel,
  activations in bf16 (its fp32 path is not vectorized and is several times slower than fp32 eager).
- ``Int4WeightOnlyLinear``: ``aten._weight_int4pack_mm_for_cpu``. Group-wise asymmetric int4 weights, two per
  byte, bf16 group scales and zeros, activations in bf16 (same reason).

A layer whose shape a kernel cannot take is not replaced; ``unsupported`` says why and the engine records it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.quant.formats import dequantize_int8, int4_kernel_scales, quantize_int4, quantize_int8

log = logging.getLogger(__name__)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU (and CUDA tinygemm) int4 kernels accept


def compute_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Activation dtype of the weight-only kernels: bf16 for an fp32 model (their fast path), else the model's."""
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype


class QuantLinear(nn.Module):
    """A Linear replacement computing ``x @ W.T`` from a quantized ``W``; subclasses hold the storage."""

    scheme: ClassVar[str] = ""
    kernel: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def unsupported(cls, linear: nn.Linear, group_size: int) -> str | None:
        """None when the kernel takes this layer, else why not."""
        return "biased linears are not supported" if linear.bias is not None else None

    def matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@contextlib.contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _fbgemm_pack(q: Tensor, scale: Tensor) -> torch.ScriptObject:
    """Per-channel symmetric int8 weight, prepacked for fbgemm (quantized tensors are deprecated upstream)."""
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings(), _quantized_engine("fbgemm"):
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


@functools.cache
def fbgemm_full_range() -> bool:
    """Whether fbgemm multiplies 8-bit activations exactly here. Without VNNI, its int16 pair sums saturate and
    activations must be reduced to 7 bits (``reduce_range``); probed on inputs that would saturate."""
    w = torch.ones(32, 64)
    x = torch.ones(1, 64)
    x[0, 0] = 0.0  # activations span [0, 1]: every other one quantizes to 255, pairs sum past int16
    y = torch.ops.quantized.linear_dynamic(x, _fbgemm_pack(*quantize_int8(w)), False)
    return bool(torch.allclose(y, F.linear(x, w), rtol=1e-3, atol=1e-3))


def per_token_matmul(
    x: Tensor, packed: torch.classes.quantized.LinearPackedParamsBase, row_sums: Tensor, reduce_range: bool
) -> Tensor:
    """x [M, K] fp32 @ W.T with each row quantized on its own asymmetric grid, the same alone or batched.

    fbgemm picks one range for the whole tensor, so a row's grid would depend on its neighbours. Each row mapped
    onto exactly [0, 1] by its own min and max (x' = (x - lo) / span) makes that range [0, 1] at any row count;
    x = x' * span + lo, so x @ W.T = (x' @ W.T) * span + lo * W.sum(1)."""
    lo = x.amin(dim=1, keepdim=True)
    x = x - lo
    span = x.amax(dim=1, keepdim=True).clamp_min_(1.1754943508222875e-38)  # fp32 tiny; a constant row is all 0
    y = torch.ops.quantized.linear_dynamic(x.div_(span), packed, reduce_range)
    return y.mul_(span).addcmul_(lo, row_sums)


@functools.cache
def _per_token_kernel():
    """``per_token_matmul`` as TorchScript: its seven small ops and the fbgemm call then skip Python's per-op
    dispatch, which costs more than the math (run from Python, tiny's decode TPOT at batch 1 was 30% above the
    old per-tensor path; scripted, 4% below). TorchScript is deprecated upstream; where it cannot script the
    function, the same function runs in Python."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return torch.jit.script(per_token_matmul)
    except Exception as exc:  # any failure of the deprecated compiler leaves the Python function, same results
        log.warning("int8_dynamic runs its per-token matmul in Python (slower): TorchScript failed: %s", exc)
        return per_token_matmul


class DynamicInt8Linear(QuantLinear):
    scheme = "int8_dynamic"
    kernel = "fbgemm quantized::linear_dynamic (int8 weights; activations uint8 per token, asymmetric, every call)"

    def __init__(self, linear: nn.Linear, group_size: int = 0) -> None:
        super().__init__(linear.in_features, linear.out_features)
        q, scale = quantize_int8(linear.weight.detach())
        self.packed = _fbgemm_pack(q, scale)
        # W.sum(1) of the weight fbgemm multiplies by: adds back the per-row shift taken off the activations
        self.register_buffer("weight_row_sums", dequantize_int8(q, scale).sum(1))
        self.reduce_range = not fbgemm_full_range()
        _per_token_kernel()  # scripted once per process, while preparing

    def matmul(self, x: Tensor) -> Tensor:
        return _per_token_kernel()(x.float(), self.packed, self.weight_row_sums, self.reduce_range)

    def stored_bytes(self) -> int:
        """What fbgemm's packed weight holds (int8 values, and per channel an fp32 scale, an int32 zero point and
        an int32 column offset) plus the fp32 row sums."""
        return self.out_features * self.in_features + 16 * self.out_features


class Int8WeightOnlyLinear(QuantLinear):
    scheme = "int8_weight_only"
    kernel = "aten._weight_int8pack_mm (int8 weights read by the kernel)"  # activations: engine_info's

    def __init__(self, linear: nn.Linear, group_size: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(linear.in_features, linear.out_features)
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scale.to(dtype))

    @classmethod
    def unsupported(cls, linear: nn.Linear, group_size: int) -> str | None:
        if linear.in_features % 16:  # the CPU kernel reads 16 columns at a time: other widths give wrong results
            return f"aten._weight_int8pack_mm on CPU needs in_features divisible by 16 (got {linear.in_features})"
        return super().unsupported(linear, group_size)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(self.scales.dtype), self.weight_int8, self.scales)


class Int4WeightOnlyLinear(QuantLinear):
    scheme = "int4_weight_only"
    kernel = "aten._weight_int4pack_mm_for_cpu (int4 weights, two per byte)"  # activations: engine_info's

    def __init__(self, linear: nn.Linear, group_size: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.group_size = group_size
        q, scale, minimum = quantize_int4(linear.weight.detach(), group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.register_buffer("weight_int4", packed)  # [N, K/2] uint8
        self.register_buffer("scales_and_zeros", int4_kernel_scales(scale, minimum, dtype))  # [K/g, N, 2]

    @classmethod
    def unsupported(cls, linear: nn.Linear, group_size: int) -> str | None:
        n, k = linear.out_features, linear.in_features
        if group_size not in INT4_GROUP_SIZES:
            return f"the int4 kernel takes group_size {INT4_GROUP_SIZES} (got {group_size})"
        if k % group_size:
            return f"in_features {k} is not a multiple of group_size {group_size}"
        if n % 16:
            return f"aten._weight_int4pack_mm_for_cpu needs out_features divisible by 16 (got {n})"
        return super().unsupported(linear, group_size)

    def matmul(self, x: Tensor) -> Tensor:
        sz = self.scales_and_zeros
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(sz.dtype), self.weight_int4, self.group_size, sz)


LINEARS: dict[str, type[QuantLinear]] = {
    cls.scheme: cls for cls in (DynamicInt8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear)
}
_OPS = {
    "int8_dynamic": ("quantized", "linear_dynamic"),
    "int8_weight_only": ("aten", "_weight_int8pack_mm"),
    "int4_weight_only": ("aten", "_weight_int4pack_mm_for_cpu"),
}


@functools.cache
def unavailable(scheme: str) -> str | None:
    """None when this torch build has the scheme's CPU kernel, else why not."""
    if scheme not in LINEARS:
        return f"{scheme} has no CPU kernel in this harness (CPU schemes: {', '.join(LINEARS)})"
    namespace, op = _OPS[scheme]
    if not hasattr(getattr(torch.ops, namespace), op):
        return f"this torch build ({torch.__version__}) has no torch.ops.{namespace}.{op}"
    if scheme == "int8_dynamic" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return f"this torch build ({torch.__version__}) has no fbgemm quantized engine"
    try:  # a build can list an op that is not compiled for this CPU: run it once on a tiny layer
        layer = nn.Linear(64, 32, bias=False)
        LINEARS[scheme](layer, 32)(torch.randn(2, 64))
    except (RuntimeError, NotImplementedError) as exc:
        return f"the CPU kernel for {scheme} failed on this machine: {' '.join(str(exc).split())[:200]}"
    return None
