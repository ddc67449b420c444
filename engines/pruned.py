"""The pruned engine: weights removed by magnitude, by Wanda's activation-aware score, in 2:4 pairs, or as whole
attention heads and FFN channels; and what each kind really buys.

Methods (``engine.method``):

- ``magnitude`` / ``wanda``: unstructured. In every selected linear, exactly ``round(sparsity * numel)`` weights
  are zeroed, the lowest-scored (|W|, or |W| times the input's L2 norm over calibration tokens) of the layer, or
  of each output row with ``engine.granularity=row`` (the comparison group of the Wanda paper; the layer is the
  default for both methods, one group for both, and cost less perplexity on the trained ``tiny``: see README).
  Wanda's statistics come from one pass over the dense reference, not block by block through pruned blocks.
  ``engine.format=dense`` (what ``auto`` means here) keeps the zeros in dense matrices: the same bytes and the
  same matmul as eager, so no speedup, only the quality cost. ``engine.format=csr`` stores CSR matrices
  multiplied by ``torch.sparse.mm``: whether that is faster at a given sparsity is for the measurement to say.
- ``2:4``: two of every four consecutive input weights kept (sparsity fixed at 0.5), the pair chosen by
  ``engine.score`` (wanda by default, or magnitude), stored compressed for sparse tensor cores (CUDA sm_80+,
  fp16/bf16; recorded as skipped elsewhere). ``engine.format=dense`` applies the same mask to dense weights on
  any device, for its quality cost.
- ``structured``: a fraction ``sparsity`` of the FFN channels and of the KV head groups of every layer removed
  (a group's query heads go with it, so grouped-query attention stays consistent: round((1 - sparsity) *
  n_kv_heads) groups and round((1 - sparsity) * intermediate_size) channels are kept, at least one), the least
  important by the norm of their contribution to the residual stream over calibration tokens. The result is a
  smaller dense model (``engines.surgery.shrink``) whose shape ``engine_info`` records.

``engine_info`` holds ``sparsity`` (measured: the fraction of zeros in the selected linears for unstructured and
2:4; for structured the fraction of their parameters removed) beside ``sparsity_requested``, the format and
kernel, the calibration identity and the cache key. Calibration statistics (keyed by the reference weights and
the exact calibration tokens) and masks (bit-packed, keyed by that and the parameters) are cached on disk under
``<cache_dir>/pruning``, so other processes of a sweep do not calibrate or prune again.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines import pruning, sparse_formats
from engines.base import Engine, PrepareContext, choice, register
from engines.base import weight_bytes as plain_weight_bytes
from engines.cache import building, cache_key, cached, file_lock
from engines.quantized import check_layers, meta_model, select_linears
from engines.surgery import clone, kept_width, shrink, top_k_sorted

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "2:4", "structured")
SCORES = ("magnitude", "wanda")
FORMATS = ("auto", "dense", "csr", "semi_structured")
GRANULARITIES = ("layer", "row")
# structured pruning removes whole heads/channels in every block: engine.layers picks which of the two parts
STRUCTURED_PARTS = {
    ("all_but_head",): ("attention", "feed_forward"),
    ("attention",): ("attention",),
    ("feed_forward",): ("feed_forward",),
    ("attention", "feed_forward"): ("attention", "feed_forward"),
    ("feed_forward", "attention"): ("attention", "feed_forward"),
}
MASKS_VERSION = 1


def structured_layers(layers: tuple[str, ...]) -> tuple[str, ...]:
    """The one spelling of a structured selection (both parts: the default [all_but_head]), so that synonyms
    are one variant, one parameter set and one point key."""
    parts = STRUCTURED_PARTS[tuple(layers)]
    return ("all_but_head",) if len(parts) == 2 else parts


def format_methods(fmt: str) -> tuple[str, ...]:
    """The methods a storage format can hold (csr: unstructured; semi_structured: 2:4; auto and dense: any)."""
    return {"csr": ("magnitude", "wanda"), "semi_structured": ("2:4",)}.get(fmt, METHODS)


@dataclass(frozen=True)
class PrunedParams:
    method: str = choice("magnitude", METHODS, "what is removed, and how it is chosen")
    sparsity: float = 0.5  # fraction removed, in [0, 1); 2:4 fixes it at 0.5
    score: str | None = choice(None, SCORES, "2:4 only: the score that picks the kept pair (null: wanda)")
    format: str = choice("auto", FORMATS, "auto: dense, or semi_structured for 2:4")
    granularity: str = choice("layer", GRANULARITIES, "magnitude/wanda: weights compete within the layer or row")
    layers: tuple[str, ...] = ("all_but_head",)
    calibration_seqs: int = 32  # corpus windows the activation statistics are collected on
    calibration_seq_len: int = 128
    calibration_seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("format", FORMATS), ("granularity", GRANULARITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"engine.{name}: {getattr(self, name)!r} is not allowed; allowed: {', '.join(allowed)}"
                )
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"engine.sparsity: must be in [0, 1), got {self.sparsity}")
        if self.method == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"engine.sparsity: method=2:4 keeps two of every four weights, so sparsity is 0.5; "
                             f"got {self.sparsity}")  # fmt: skip
        if self.score is not None and (self.method != "2:4" or self.score not in SCORES):
            raise ValueError(f"engine.score: picks the kept pair of method=2:4 only (allowed: {', '.join(SCORES)}); "
                             f"leave it null for method={self.method}")  # fmt: skip
        if self.granularity != "layer" and self.method not in ("magnitude", "wanda"):
            raise ValueError(f"engine.granularity: applies to method=magnitude or wanda only; leave it at layer for "
                             f"method={self.method}")  # fmt: skip
        if self.method not in format_methods(self.format):
            allowed = [f for f in FORMATS if self.method in format_methods(f)]
            raise ValueError(f"engine.format: {self.format} is for method={' or '.join(format_methods(self.format))}; "
                             f"allowed for method={self.method}: {', '.join(allowed)}")  # fmt: skip
        layers = self.layers
        check_layers(layers)
        if self.method == "structured" and tuple(layers) not in STRUCTURED_PARTS:
            raise ValueError(f"engine.layers: method=structured prunes every block alike; allowed: [all_but_head], "
                             f"[attention], [feed_forward]; got {list(layers)}")  # fmt: skip
        for name in ("calibration_seqs", "calibration_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name}: must be >= 1, got {getattr(self, name)}")
        # one spelling per model: label, parameters and point key follow what is built, not how it was asked
        if self.method == "2:4":
            object.__setattr__(self, "score", self.resolved_score())  # null means wanda
        if self.method == "structured":
            object.__setattr__(self, "layers", structured_layers(layers))
        if not self.calibrates():
            # no calibration behind this method: the fields go back to their defaults, so that a sweep crossing
            # them with wanda (engine.method=magnitude,wanda engine.calibration_seqs=64) labels and keys the
            # magnitude point as what it is, the same model as without them
            for name, f in PrunedParams.__dataclass_fields__.items():
                if name.startswith("calibration_"):
                    object.__setattr__(self, name, f.default)

    def calibrates(self) -> bool:
        """Whether the method scores weights by calibration activations (wanda, structured, 2:4 by wanda)."""
        return self.method == "structured" or self.resolved_score() == "wanda"

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "semi_structured" if self.method == "2:4" else "dense"

    def resolved_score(self) -> str | None:
        """The score that chooses the weights (None for structured, which scores heads and channels)."""
        return {"magnitude": "magnitude", "wanda": "wanda", "2:4": self.score or "wanda"}.get(self.method)


@register
class PrunedEngine(Engine):
    name = "pruned"
    Params = PrunedParams
    description = "Weights pruned (magnitude, wanda, 2:4 or whole heads/channels), dense, CSR or 2:4 storage."

    def reads_corpus(self) -> bool:
        """Wanda and structured pruning calibrate on the corpus's train split, random weights or not."""
        return self.params.calibrates()

    def variant(self) -> str:
        """Always names method and sparsity (``pruned(method=wanda, sparsity=0.5)``), and 2:4's score."""
        p = self.params
        head = [f"method={p.method}", f"sparsity={p.sparsity:g}"]
        if p.method == "2:4":
            head.append(f"score={p.resolved_score()}")
        extra = {k: v for k, v in self.non_default_params().items() if k not in ("method", "sparsity", "score")}
        return f"{self.name}({', '.join(head + [f'{k}={v}' for k, v in sorted(extra.items())])})"

    def check_model(self, args: Any, trained: bool) -> None:
        p = self.params
        if p.method != "structured":
            select_linears(meta_model(args), p.layers)
        if p.calibrates() and p.calibration_seq_len > args.max_seq_len:
            raise ValueError(f"engine.calibration_seq_len: {p.calibration_seq_len} exceeds the model's context "
                             f"({args.max_seq_len})")  # fmt: skip

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        fmt = self.params.resolved_format()
        if fmt == "semi_structured":
            reason = sparse_formats.semi_structured_unavailable(device, dtype)
            return reason or (sparse_formats.semi_structured_dtype_error(dtype) if dtype is not None else None)
        if fmt == "csr" and dtype is not None:
            return sparse_formats.csr_unsupported(device, dtype)
        return None

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        if self.params.method == "structured":
            return self._structured(model, ctx)
        return self._unstructured(model, ctx)

    # -- shared ------------------------------------------------------------------------------------------------
    def _cache_path(self, ctx: PrepareContext, kind: str, key: str) -> Path | None:
        """Where a cache entry lives; None (no disk cache) when the context does not identify the reference."""
        return Path(ctx.cache_dir) / "pruning" / f"{kind}-{key}.safetensors" if ctx.reference_key else None

    def calibration(self, model: nn.Module, ctx: PrepareContext) -> pruning.Calibration:
        """Activation statistics of the reference on calibration windows (cached on disk): of the corpus's train
        split for trained weights; for random weights, seeded random ids over the whole vocabulary, the inputs
        that quality is scored on and timing feeds (corpus bytes would reach 256 embedding rows only)."""
        p = self.params
        if ctx.trained and ctx.train_tokens is None:
            raise ValueError(f"engine.method={p.method}: calibration needs corpus tokens, and the context has none")
        if p.calibration_seq_len > model.args.max_seq_len:
            raise ValueError(f"engine.calibration_seq_len: {p.calibration_seq_len} exceeds the model's context "
                             f"({model.args.max_seq_len})")  # fmt: skip
        if ctx.trained:
            windows = pruning.calibration_windows(ctx.train_tokens, p.calibration_seqs, p.calibration_seq_len,
                                                  p.calibration_seed)  # fmt: skip
            source = "corpus train split"
        else:
            windows = pruning.random_calibration_windows(model.args.vocab_size, p.calibration_seqs,
                                                         p.calibration_seq_len, p.calibration_seed)  # fmt: skip
            source = "random token ids"
        key = pruning.calibration_key(ctx.reference_key, windows, p.calibration_seed)
        path = self._cache_path(ctx, "calibration", key)
        if path is None:
            cal = pruning.calibrate(model, windows, key, None)
        else:
            with file_lock(path.with_suffix(".lock")):
                cal = pruning.calibrate(model, windows, key, path)
        cal.info = {
            "source": source, "seqs": p.calibration_seqs, "seq_len": p.calibration_seq_len,
            "tokens": cal.n_tokens, "seed": p.calibration_seed, "key": key, "cached": cal.cached,
            "reference_trained": ctx.trained,
        }  # fmt: skip
        return cal

    # -- unstructured and 2:4 ------------------------------------------------------------------------------------
    def masks(self, model: nn.Module, names: list[str], ctx: PrepareContext) -> tuple[dict, dict[str, Any]]:
        """Bit-packed keep-masks of the named linears ({name: packed}) and how they were obtained (cached on disk,
        keyed by the reference, the parameters and the calibration)."""
        p, score = self.params, self.params.resolved_score()
        cal = self.calibration(model, ctx) if score == "wanda" else None
        key = cache_key({
            "reference": ctx.reference_key, "method": p.method, "sparsity": p.sparsity, "score": score,
            "granularity": p.granularity, "layers": names, "calibration": cal.key if cal else None,
            "version": MASKS_VERSION,
        })  # fmt: skip
        meta: dict[str, Any] = {"key": key, "calibration": cal.info if cal else None}
        path = self._cache_path(ctx, "masks", key)
        if path is None:
            return self._compute_masks(model, names, cal), {**meta, "cached": False}
        with file_lock(path.with_suffix(".lock")):
            if cached(path):
                packed, _ = pruning.load_tensors(path)
                if self._complete(model, names, packed):
                    return packed, {**meta, "cached": True}
            with building():  # a cache entry, once for every batch size of this variant: not one point's time
                packed = self._compute_masks(model, names, cal)
                pruning.save_tensors(path, packed, meta)
        return packed, {**meta, "cached": False}

    def _complete(self, model: nn.Module, names: list[str], packed: dict) -> bool:
        """Whether cached masks are those ``_compute_masks`` writes: one per selected layer (2:4: each whose inputs
        are a multiple of 4) of its size. Any other set is computed again, never read as layers left dense."""
        want = {n: model.get_submodule(n).weight.shape for n in names}
        if self.params.method == "2:4":
            want = {n: shape for n, shape in want.items() if shape[1] % 4 == 0}
        ok = set(packed) == set(want) and all(packed[n].numel() == -(-math.prod(want[n]) // 8) for n in want)
        if not ok:
            log.warning("cached masks do not match the selected layers: computed again")
        return ok

    def _compute_masks(self, model: nn.Module, names: list[str], cal: pruning.Calibration | None) -> dict:
        p, packed = self.params, {}
        for name in names:
            w = model.get_submodule(name).weight
            score = pruning.weight_score(w, cal.input_sq[name] if cal else None)
            if p.method == "2:4" and w.shape[1] % 4:
                continue  # not 2:4-able: left dense (reported as not pruned)
            keep = (
                pruning.two_four_mask(score)
                if p.method == "2:4"
                else pruning.unstructured_mask(score, p.sparsity, p.granularity)
            )
            packed[name] = pruning.pack_mask(keep)
        return packed

    def _unstructured(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        p, fmt = self.params, self.params.resolved_format()
        reason = {"csr": sparse_formats.csr_unsupported(ctx.device, ctx.dtype),
                  "semi_structured": sparse_formats.semi_structured_dtype_error(ctx.dtype)}.get(fmt)  # fmt: skip
        if reason:
            raise ValueError(reason)
        names = select_linears(model, p.layers)
        packed, meta = self.masks(model, names, ctx)
        pruned = clone(model)
        not_pruned: dict[str, str] = {}
        zeros, total, per_layer = 0, 0, []
        for name in names:
            linear = pruned.get_submodule(name)
            w = linear.weight.detach()
            if name not in packed:
                not_pruned[name] = f"{w.shape[1]} input features is not a multiple of 4 (2:4 groups)"
            elif fmt == "semi_structured" and (why := sparse_formats.semi_structured_shape_error(w.shape, w.dtype)):
                not_pruned[name] = why
            else:
                w = w * pruning.unpack_mask(packed[name], tuple(w.shape)).to(w.device)
                if fmt == "csr":
                    pruned.set_submodule(name, sparse_formats.CSRLinear(w))
                elif fmt == "semi_structured":
                    linear.weight = nn.Parameter(sparse_formats.to_semi_structured(w), requires_grad=False)
                else:  # a new Parameter: a head tied to the embedding leaves the embedding unpruned
                    linear.weight = nn.Parameter(w, requires_grad=False)
            n_zero = int((w == 0).sum())
            zeros, total = zeros + n_zero, total + w.numel()
            per_layer.append(n_zero / w.numel())
        kernel = {
            "dense": "dense matmul (aten linear: the zeros are stored and multiplied like any weight)",
            "csr": sparse_formats.csr_kernel(ctx.device),
            "semi_structured": sparse_formats.semi_structured_kernel() if fmt == "semi_structured" else None,
        }[fmt]
        info = {
            "method": p.method, "score": p.resolved_score(), "sparsity_requested": p.sparsity,
            "granularity": p.granularity if p.method != "2:4" else "2:4 groups of four inputs",
            "sparsity": zeros / total, "sparsity_layer_min": min(per_layer), "sparsity_layer_max": max(per_layer),
            "format": fmt, "kernel": kernel, "layers_pruned": len(names) - len(not_pruned),
            "layers_not_pruned": [{"layer": k, "reason": v} for k, v in not_pruned.items()],
            "pruned_weights": total,
        }  # fmt: skip
        return self._finish(pruned, model, info, meta)

    def _finish(self, pruned: nn.Module, model: nn.Module, info: dict, meta: dict) -> nn.Module:
        stored, reference = sparse_formats.stored_weight_bytes(pruned), plain_weight_bytes(model)
        info.update(
            weight_bytes=stored, reference_weight_bytes=reference, weight_bytes_ratio=stored / reference,
            calibration=meta.get("calibration"), cache_key=meta.get("key"), cached=meta.get("cached", False),
        )  # fmt: skip
        pruned.engine_info = info
        pruned.weight_bytes = types.MethodType(sparse_formats.stored_weight_bytes, pruned)
        return pruned.eval()

    # -- structured ----------------------------------------------------------------------------------------------
    def structured_keep(self, model: nn.Module, cal: pruning.Calibration) -> tuple[list | None, list | None]:
        """Per layer, the FFN channels and KV groups kept (None: that part is not pruned)."""
        p, args = self.params, model.args
        parts = STRUCTURED_PARTS[tuple(p.layers)]
        n_ffn, n_kv = kept_width(args, 1 - p.sparsity)
        layers = range(args.n_layers)
        ffn_keep = kv_keep = None
        if "feed_forward" in parts and n_ffn < args.intermediate_size:
            ffn_keep = [top_k_sorted(pruning.ffn_channel_importance(model, cal, i), n_ffn) for i in layers]
        if "attention" in parts and n_kv < args.n_kv_heads:
            kv_keep = [top_k_sorted(pruning.kv_group_importance(cal, i), n_kv) for i in layers]
        return ffn_keep, kv_keep

    def _structured(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        p = self.params
        cal = self.calibration(model, ctx)
        ffn_keep, kv_keep = self.structured_keep(model, cal)
        small = shrink(model, None, ffn_keep, kv_keep)
        parts = STRUCTURED_PARTS[tuple(p.layers)]
        before = _block_linear_params(model, parts)
        after = _block_linear_params(small, parts)
        a, b = model.args, small.args
        info = {
            "method": "structured", "sparsity_requested": p.sparsity, "sparsity": 1 - after / before,
            "pruned_parts": list(parts), "format": "dense (a smaller model)", "kernel": "dense matmul (aten linear)",
            "kept_shape": {k: getattr(b, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim",
                                                      "intermediate_size")},  # fmt: skip
            "ffn_channels_removed": a.intermediate_size - b.intermediate_size,
            "kv_groups_removed": a.n_kv_heads - b.n_kv_heads, "heads_removed": a.n_heads - b.n_heads,
            "params_removed_fraction": 1 - _n_params(small) / _n_params(model), "model_args": b.to_dict(),
            "ffn_kept": [k.tolist() for k in ffn_keep] if ffn_keep else None,
            "kv_groups_kept": [k.tolist() for k in kv_keep] if kv_keep else None,
        }  # fmt: skip
        return self._finish(small, model, info, {"calibration": cal.info, "cached": cal.cached, "key": cal.key})


def _block_linear_params(model: nn.Module, parts: tuple[str, ...]) -> int:
    linears = (m for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(f".{x}." in n for x in parts))
    return sum(m.weight.numel() for m in linears)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
