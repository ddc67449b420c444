"""The torchao backend: ``torchao.quantization.quantize_`` on the engine's copy of the model (the CUDA path).

torchao swaps each selected ``nn.Linear.weight`` for a tensor subclass whose ``F.linear`` runs its kernel, so the
model keeps its modules and its ``forward``. On a CPU it runs too (the tests use that to check this path without
a GPU), but its CPU int8 linears convert the whole weight per call, and it has no CPU int4 layout: the engine
uses the aten kernels there unless asked for ``engine.backend=torchao``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# What each config runs in the pinned torchao (0.18.0), read from its source: recorded in engine_info.
KERNELS = {
    "int8_dynamic": "torchao Int8Tensor: activations quantized per row each call, torch._int_mm, rescale",
    "int8_weight_only": "torchao Int8Tensor: the int8 weight is cast to the activation dtype each call, then mm "
    "(fused only under torch.compile)",
    "int4_weight_only": "torchao Int4TilePackedTo4dTensor: tinygemm aten._weight_int4pack_mm",
    "fp8": "torchao Float8Tensor: per-row float8 e4m3 weights and activations, torch._scaled_mm",
}


def import_torchao() -> Any:
    """``torchao.quantization``, without the import-time warnings (CUDA extensions that cannot load on this
    machine, a torch deprecation notice) that would otherwise land in every point's log."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return q


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("torchao")
    except Exception:
        return None


def config(scheme: str, group_size: int) -> Any:
    """The torchao config of a scheme (weights per output row; int4 in tinygemm's tile-packed layout)."""
    q = import_torchao()
    common = {"set_inductor_config": False}  # no global inductor settings behind the harness' back
    if scheme == "int8_dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(**common)
    if scheme == "int8_weight_only":
        return q.Int8WeightOnlyConfig(**common)
    if scheme == "int4_weight_only":
        return q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d", **common)
    if scheme == "fp8":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow(), **common)
    raise ValueError(f"engine.scheme: {scheme!r} has no torchao config")


def quantize(model: nn.Module, scheme: str, group_size: int, select: Callable[[str], bool]) -> None:
    """Quantize, in place, the linears of ``model`` whose qualified names ``select`` accepts."""
    q = import_torchao()
    q.quantize_(model, config(scheme, group_size), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and select(fqn))


def is_quantized(weight: Tensor) -> bool:
    return type(weight) not in (Tensor, nn.Parameter)


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor really stores: a tensor subclass's inner tensors (quantized data, scales, zeros), summed."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names if getattr(t, name, None) is not None)


@functools.cache
def _probe(scheme: str, group_size: int, device: str, dtype: torch.dtype) -> str | None:
    try:
        layer = nn.Sequential(nn.Linear(256, 256, bias=False)).to(device=device, dtype=dtype)
        quantize(layer, scheme, group_size, lambda fqn: True)
        if not is_quantized(layer[0].weight):
            return f"torchao {version()} left a 256x256 layer unquantized for {scheme}"
        with torch.inference_mode():
            layer(torch.randn(2, 256, device=device, dtype=dtype))
    except Exception as exc:  # any failure of the library on this device is a reason, not a crash
        text = " ".join(str(exc).split())[:200]
        return f"torchao {version()} cannot run {scheme} on {device}: {type(exc).__name__}: {text}"
    return None


def unavailable(scheme: str, group_size: int, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when torchao runs the scheme on ``device`` (tried once on a small layer), else why not."""
    if version() is None:
        return "torchao is not installed (pip install torchao; the harness pins its version)"
    if dtype is None:  # tinygemm takes bf16 only; the other kernels take the model's dtype
        dtype = torch.bfloat16 if scheme == "int4_weight_only" or device.type == "cuda" else torch.float32
    return _probe(scheme, group_size, str(device), dtype)
