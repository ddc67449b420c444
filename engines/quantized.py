"""The quantized engine: linear layers with int8, int4 or fp8 weights, and what that costs in accuracy.

Schemes (``engine.scheme``):

- ``int8_dynamic``: per-channel symmetric int8 weights; activations quantized on every call; integer matmul.
- ``int8_weight_only``: per-channel symmetric int8 weights, dequantized inside the matmul.
- ``int4_weight_only``: group-wise (``engine.group_size``) asymmetric int4 weights, dequantized inside the matmul.
- ``fp8``: per-row float8 (e4m3) weights and activations; CUDA GPUs of compute capability 8.9+ only.

Backends (``engine.backend``): ``auto`` runs the aten/fbgemm kernels of ``engines.quant.cpu`` on a CPU and
torchao on CUDA; ``aten`` and ``torchao`` force one (torchao on a CPU has no fused int8 kernel and no int4 layout:
useful to see what that costs); ``triton`` runs int8_weight_only through the project's own Triton kernel
(``engines.kernels.int8_gemv``; on a CPU under Triton's interpreter, for its fidelity only: timings are marked not
representative). The kernel each layer runs is recorded in ``engine_info``.

Which linears are quantized (``engine.layers``): ``all_but_head`` (default), ``all``, or module-name patterns
(``attention``, ``feed_forward.w2``, ``layers.0.*``). A selected layer whose shape the kernel cannot take stays
in its dtype, and ``engine_info`` says which and why. The prepared model's ``weight_bytes()`` counts what it
really stores (quantized values, scales, zeros; unquantized weights at their dtype; tied weights once), which is
what the roofline's byte count uses.
"""

from __future__ import annotations

import fnmatch
import re
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engines.base import Engine, PrepareContext, choice, register
from engines.base import weight_bytes as plain_weight_bytes
from engines.llama import ModelArgs, RMSNorm, Transformer
from engines.quant import cpu, torchao_backend
from engines.quant.cpu import INT4_GROUP_SIZES, QuantLinear
from engines.surgery import clone

SCHEMES = ("int8_dynamic", "int8_weight_only", "int4_weight_only", "fp8")
BACKENDS = ("auto", "aten", "torchao", "triton")
LAYER_KEYWORDS = ("all_but_head", "all")
HEAD = "output"
FORMATS = {"int8_dynamic": "int8", "int8_weight_only": "int8", "int4_weight_only": "int4", "fp8": "fp8"}
FP8_CAPABILITY = (8, 9)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_PATTERN_HELP = "or module-name patterns such as attention, feed_forward, feed_forward.w2, layers.0.*"


@dataclass(frozen=True)
class QuantizedParams:
    scheme: str = choice("int8_dynamic", SCHEMES, "what is quantized, and how")
    group_size: int = choice(64, INT4_GROUP_SIZES, "int4: input channels per scale/zero (divides every named shape)")
    layers: tuple[str, ...] = ("all_but_head",)
    backend: str = choice("auto", BACKENDS, "auto: aten/fbgemm kernels on CPU, torchao on CUDA")

    def __post_init__(self) -> None:
        for name, allowed in (("scheme", SCHEMES), ("backend", BACKENDS), ("group_size", INT4_GROUP_SIZES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"engine.{name}: {getattr(self, name)!r} is not allowed; allowed: "
                                 f"{', '.join(map(str, allowed))}")  # fmt: skip
        if self.scheme != "int4_weight_only":  # per-channel scales: no groups, the point is the same model
            object.__setattr__(self, "group_size", QuantizedParams.__dataclass_fields__["group_size"].default)
        if self.backend == "triton" and self.scheme != "int8_weight_only":  # no device runs it: refused, not skipped
            raise ValueError(f"engine.backend: triton runs scheme=int8_weight_only only, got scheme={self.scheme}; "
                             "choose engine.backend=auto, aten or torchao for it")  # fmt: skip
        check_layers(self.layers)


def check_layers(layers: tuple[str, ...]) -> None:
    """``engine.layers`` is one keyword alone or module-name patterns (the quantized and pruned engines)."""
    if not layers or not all(isinstance(x, str) and x for x in layers):
        raise ValueError(f"engine.layers: give {' or '.join(LAYER_KEYWORDS)}, {_PATTERN_HELP}; got {layers!r}")
    if len(layers) > 1 and any(x in LAYER_KEYWORDS for x in layers):
        raise ValueError(f"engine.layers: {' and '.join(LAYER_KEYWORDS)} stand alone; got {list(layers)}")


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a qualified name as a glob, or as a run of whole dotted components (``attention``)."""
    return fnmatch.fnmatchcase(name, pattern) or f".{pattern}." in f".{name}."


def meta_model(args: ModelArgs) -> nn.Module:
    """A model of this shape with no storage (meta device): what ``select_linears`` reads, at no cost."""
    with torch.device("meta"):
        return Transformer(args)


def select_linears(model: nn.Module, layers: tuple[str, ...]) -> list[str]:
    """Qualified names of the linears ``engine.layers`` selects, in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layers == ("all",):
        return names
    if layers == ("all_but_head",):
        return [n for n in names if n != HEAD]
    for pattern in layers:
        if not any(_matches(n, pattern) for n in names):
            examples = ", ".join(n for n in names if n.startswith("layers.0.") or n == HEAD)
            raise ValueError(f"engine.layers: {pattern!r} matches no linear layer; the names are like {examples}")
    return [n for n in names if any(_matches(n, p) for p in layers)]


def _layer_kind(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name)


def _by_kind(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[_layer_kind(n)] = out.get(_layer_kind(n), 0) + 1
    return out


def _grouped_reasons(reasons: dict[str, str]) -> list[dict[str, Any]]:
    """{name: reason} -> one entry per (layer kind, reason) with a count, so 24 identical layers read as one."""
    groups: dict[tuple[str, str], int] = {}
    for name, reason in reasons.items():
        key = (_layer_kind(name), reason)
        groups[key] = groups.get(key, 0) + 1
    return [{"layers": k, "count": c, "reason": r} for (k, r), c in groups.items()]


def weight_storage(model: nn.Module) -> dict[str, int]:
    """Bytes of weights the model stores, by class (``linear int8``, ``linear fp32``, ``embedding fp32`` ...);
    a tied weight counts once."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(key: str, n: int) -> None:
        out[key] = out.get(key, 0) + n

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            add(f"linear {FORMATS[mod.scheme]}", mod.stored_bytes())
            continue
        kind = {nn.Linear: "linear", nn.Embedding: "embedding", RMSNorm: "norm"}.get(type(mod), type(mod).__name__)
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            fmt = type(p).__name__ if torchao_backend.is_quantized(p) else _DTYPE_NAMES.get(p.dtype, str(p.dtype))
            add(f"{kind} {fmt}", torchao_backend.tensor_bytes(p))
    return out


def _total_weight_bytes(model: nn.Module) -> int:
    """The prepared model's ``weight_bytes()``: what it really stores for weights (read by the roofline)."""
    return sum(weight_storage(model).values())


def fp8_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"fp8 needs a CUDA GPU with compute capability 8.9+ (this device: {device.type})"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"fp8 needs a CUDA GPU with compute capability 8.9+ (this device: {name}, {cap[0]}.{cap[1]})"
    return None


@register
class QuantizedEngine(Engine):
    name = "quantized"
    Params = QuantizedParams
    description = "Linear layers with int8, int4 or fp8 weights (aten/fbgemm kernels on CPU, torchao on CUDA)."

    def variant(self) -> str:
        """Always names the scheme (``quantized(scheme=int8_dynamic)``): a bare ``quantized`` would hide it."""
        extra = {k: v for k, v in self.non_default_params().items() if k != "scheme"}
        rest = "".join(f", {k}={v}" for k, v in sorted(extra.items()))
        return f"{self.name}(scheme={self.params.scheme}{rest})"

    def backend(self, device: torch.device) -> str:
        if self.params.backend != "auto":
            return self.params.backend
        return "torchao" if device.type == "cuda" else "aten"

    def check_model(self, args: ModelArgs, trained: bool) -> None:
        select_linears(meta_model(args), self.params.layers)  # a pattern that matches no layer of this shape

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        p = self.params
        if p.scheme == "fp8" and (reason := fp8_unavailable(device)):
            return reason
        if self.backend(device) == "triton":  # int8_weight_only (the other schemes are refused by the params)
            from engines import kernels

            return kernels.unavailable(device) or kernels.dtype_unavailable(dtype, device)
        if self.backend(device) == "aten":
            if device.type != "cpu":
                return (f"engine.backend=aten runs CPU kernels (fbgemm, aten int8/int4 pack); on {device.type} use "
                        "engine.backend=torchao or auto")  # fmt: skip
            return cpu.unavailable(p.scheme)
        return torchao_backend.unavailable(p.scheme, p.group_size, device, dtype)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        p = self.params
        backend = self.backend(ctx.device)
        reference_bytes = plain_weight_bytes(model)
        qmodel = clone(model)
        all_linears = [n for n, m in qmodel.named_modules() if isinstance(m, nn.Linear)]
        selected = select_linears(qmodel, p.layers)
        if backend == "aten":
            skipped, kernel, extra = self._quantize_aten(qmodel, selected, ctx.dtype)
        elif backend == "triton":
            skipped, kernel, extra = self._quantize_triton(qmodel, selected, ctx.dtype)
        else:
            skipped, kernel, extra = self._quantize_torchao(qmodel, selected, ctx)
        done = [n for n in selected if n not in skipped]
        if not done:
            reasons = "; ".join(f"{e['layers']}: {e['reason']}" for e in _grouped_reasons(skipped))
            raise ValueError(f"engine.layers: no selected layer could be quantized with {p.scheme} ({reasons})")
        not_selected = {n: f"not selected by engine.layers={list(p.layers)}" for n in all_linears if n not in selected}
        storage = weight_storage(qmodel)
        total = sum(storage.values())
        qmodel.engine_info = {
            "scheme": p.scheme,
            "backend": backend,
            "kernel": kernel,
            **extra,
            "group_size": p.group_size if p.scheme == "int4_weight_only" else None,
            "layers_quantized": len(done),
            "layers_quantized_by_kind": _by_kind(done),
            "layers_unquantized": _grouped_reasons({**skipped, **not_selected}),
            "weight_bytes": total,
            "weight_bytes_by_class": storage,
            "reference_weight_bytes": reference_bytes,
            "weight_bytes_ratio": total / reference_bytes,
        }
        qmodel.weight_bytes = types.MethodType(_total_weight_bytes, qmodel)
        return qmodel.eval()

    def _quantize_aten(self, qmodel: nn.Module, selected: list[str], dtype: torch.dtype):
        p = self.params
        cls = cpu.LINEARS[p.scheme]
        kwargs = {} if p.scheme == "int8_dynamic" else {"dtype": cpu.compute_dtype(dtype)}
        skipped: dict[str, str] = {}
        for name in selected:
            linear = qmodel.get_submodule(name)
            reason = cls.unsupported(linear, p.group_size)
            if reason:
                skipped[name] = reason
                continue
            qmodel.set_submodule(name, cls(linear, p.group_size, **kwargs))
        if p.scheme == "int8_dynamic":
            bits = 8 if cpu.fbgemm_full_range() else 7
            extra = {"activations": f"uint8 per token (its own min..max), {bits}-bit range, quantized on every call"}
        else:
            extra = {"activations": f"{_DTYPE_NAMES[kwargs['dtype']]} (the kernel's input dtype)"}
            act, model = _DTYPE_NAMES[kwargs["dtype"]], _DTYPE_NAMES.get(dtype, str(dtype))
            if act != model:  # a reader of the speedup over eager must know it is not the scheme's alone
                extra["precision_caveat"] = (f"the quantized linears take {act} activations (the model is "
                                             f"{model}): part of any speedup over {model} eager is that lower "
                                             "precision")  # fmt: skip
        return skipped, cls.kernel, extra

    def _quantize_triton(self, qmodel: nn.Module, selected: list[str], dtype: torch.dtype):
        from engines import kernels
        from engines.kernels.int8_gemv import Int8TritonLinear

        kernels.check_dtype(dtype)
        skipped = {n: r for n in selected if (r := Int8TritonLinear.unsupported(qmodel.get_submodule(n), 0))}
        for name in (n for n in selected if n not in skipped):
            qmodel.set_submodule(name, Int8TritonLinear(qmodel.get_submodule(name)))
        return skipped, Int8TritonLinear.kernel, {"activations": f"{_DTYPE_NAMES[dtype]} (the model's dtype)"}

    def timing_caveat(self, device: torch.device) -> str | None:
        if self.backend(device) != "triton":
            return None
        from engines import kernels

        return kernels.timing_caveat(device)

    def _quantize_torchao(self, qmodel: nn.Module, selected: list[str], ctx: PrepareContext):
        p = self.params
        reason = torchao_backend.unavailable(p.scheme, p.group_size, ctx.device, ctx.dtype)
        if reason:
            raise RuntimeError(reason)
        wanted = set(selected)
        torchao_backend.quantize(qmodel, p.scheme, p.group_size, wanted.__contains__)
        skipped = {}
        for name in selected:
            w = qmodel.get_submodule(name).weight
            if not torchao_backend.is_quantized(w):
                skipped[name] = f"torchao {torchao_backend.version()} left it unquantized (weight {tuple(w.shape)})"
        extra = {"torchao_version": torchao_backend.version()}
        if ctx.device.type == "cpu" and p.scheme.startswith("int8"):
            extra["note"] = "torchao has no fused int8 CPU kernel: the weight is converted on every call"
        return skipped, torchao_backend.KERNELS[p.scheme], extra
