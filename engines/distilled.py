"""The distilled engine: a smaller student cut out of the teacher and trained on the teacher's soft targets.

The student keeps a fraction of the teacher's layers (``depth``, evenly spaced, or ``layers_kept``) and of
its FFN channels and KV head groups (``width``, by weight magnitude), initialized from the teacher's weights,
then trained for ``steps`` on the corpus with KL(teacher || student) at ``temperature`` (times T^2), mixed with
the hard-label loss by ``alpha``. Students are cached by teacher, corpus and parameters. When the teacher has
random weights (or ``steps=0``) the student is derived and timed untrained, and ``engine_info`` says so.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.base import Engine, PrepareContext, register
from engines.cache import building, cache_key, cached, file_lock, load_weights, save_weights
from engines.llama import Transformer
from engines.surgery import evenly_spaced, ffn_importance, kept_width, kv_group_importance, shrink, top_k_sorted
from engines.train import PRECISIONS, TrainConfig, fit, heldout_nll, resolve_precision

log = logging.getLogger(__name__)

DISTILL_VERSION = 1  # bump when what distillation computes changes: older students are then never read


@dataclass(frozen=True)
class DistilledParams:
    depth: float = 0.5  # fraction of teacher layers kept, evenly spaced (first and last kept)
    layers_kept: tuple[int, ...] | None = None  # explicit teacher layer indices; overrides depth
    width: float = 1.0  # fraction of FFN channels and KV head groups kept in each layer
    steps: int = 200
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the soft-target loss; 1 - alpha weighs the hard-label cross-entropy
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 128
    precision: str = "auto"  # training precision (engines.train): auto | fp32 | bf16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine.precision: {self.precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
        for name in ("depth", "width"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"engine.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"engine.alpha must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):  # inf: 0 x inf^2, a NaN student
            raise ValueError(f"engine.temperature must be a finite number > 0, got {self.temperature}")
        for name in ("steps", "batch_size", "seq_len"):
            value, low = getattr(self, name), 0 if name == "steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"engine.{name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"engine.lr must be a finite number > 0, got {self.lr}")
        if self.layers_kept is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers_kept
        ):
            raise ValueError(f"engine.layers_kept: layer indices must be integers, got {list(self.layers_kept)}")
        if self.layers_kept is not None and list(self.layers_kept) != sorted(set(self.layers_kept)):
            # a student keeps each layer once, in order: [3, 0] or [1, 1] would be [0, 3] or [1] under another key
            raise ValueError(f"engine.layers_kept: give distinct layer indices in increasing order, got "
                             f"{list(self.layers_kept)} (did you mean {sorted(set(self.layers_kept))}?)")  # fmt: skip
        if self.layers_kept is not None:  # depth is unused then: one student, one variant and one key
            object.__setattr__(self, "depth", DistilledParams.__dataclass_fields__["depth"].default)


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float):
    def loss(student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            t_logits = teacher(x).float()
        s_logits = student(x)
        v = s_logits.shape[-1]
        soft = (
            F.kl_div(
                F.log_softmax(s_logits.reshape(-1, v) / temperature, -1),
                F.log_softmax(t_logits.reshape(-1, v) / temperature, -1),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )
        if alpha >= 1:
            return soft
        return alpha * soft + (1 - alpha) * F.cross_entropy(s_logits.reshape(-1, v), y.reshape(-1))

    return loss


@register
class DistilledEngine(Engine):
    name = "distilled"
    Params = DistilledParams
    description = "Smaller student (fewer layers and/or narrower) distilled from the reference on its soft targets."

    def check_model(self, args: Any, trained: bool) -> None:
        p = self.params
        if p.layers_kept is not None:
            layers = sorted(set(p.layers_kept))
            if not layers or layers[0] < 0 or layers[-1] >= args.n_layers:
                raise ValueError(f"engine.layers_kept: indices must be in 0..{args.n_layers - 1}, got {p.layers_kept}")
        if trained and p.steps > 0 and p.seq_len > args.max_seq_len:
            raise ValueError(f"engine.seq_len: {p.seq_len} exceeds the teacher's context ({args.max_seq_len})")

    def derive(self, teacher: Transformer) -> tuple[Transformer, list[int]]:
        p, args = self.params, teacher.args
        if p.layers_kept is not None:
            self.check_model(args, trained=False)
            layers = sorted(set(p.layers_kept))
        else:
            layers = evenly_spaced(args.n_layers, max(1, round(p.depth * args.n_layers)))
        ffn_keep = kv_keep = None
        if p.width < 1:
            n_ffn, n_kv = kept_width(args, p.width)
            ffn_keep = [top_k_sorted(ffn_importance(teacher, i), n_ffn) for i in layers]
            kv_keep = [top_k_sorted(kv_group_importance(teacher, i), n_kv) for i in layers]
        return shrink(teacher, layers, ffn_keep, kv_keep), layers

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        p = self.params
        student, layers = self.derive(model)
        info = {"layers_kept": layers, "student_args": student.args.to_dict(), "teacher_layers": model.args.n_layers}
        info["student_params"] = student.args.num_params()
        can_train = ctx.trained and ctx.train_tokens is not None and p.steps > 0
        if not can_train:
            why = "steps=0" if p.steps == 0 else "the teacher has random weights"
            info.update(trained=False, note=f"student derived from the teacher, not distilled ({why})")
            student.engine_info = info
            return student
        if p.seq_len > model.args.max_seq_len:
            raise ValueError(f"engine.seq_len: {p.seq_len} exceeds the teacher's context ({model.args.max_seq_len})")
        student = student.float()
        params = {**asdict(p), "precision": resolve_precision(p.precision, ctx.device)}
        key = cache_key({"teacher": ctx.reference_key, "params": params, "seed": ctx.seed, "version": DISTILL_VERSION})
        if not ctx.reference_key:  # nothing identifies the teacher: a cache entry could be another teacher's
            meta = {**self._distill(model, student, ctx), "key": key, "cached": False}
            info.update(trained=True, **meta)
            student = student.to(ctx.dtype).eval()
            student.engine_info = info
            return student
        path = Path(ctx.cache_dir) / "students" / f"distilled-{key}.safetensors"
        with file_lock(path.with_suffix(".lock")):
            if cached(path, student):
                meta = load_weights(student, path, str(ctx.device))
                meta["cached"] = True
            else:
                with building() as build:  # once for every point of this variant: not one point's time
                    meta = self._distill(model, student, ctx)
                    meta["key"] = key
                    save_weights(student, path, meta)
                meta.update(cached=False, build_s=build.seconds)
        info.update(trained=True, **meta)
        student = student.to(ctx.dtype).eval()
        student.engine_info = info
        return student

    def _distill(self, teacher: nn.Module, student: Transformer, ctx: PrepareContext) -> dict:
        p = self.params
        held = ctx.heldout_tokens
        teacher_bpb = init_bpb = None
        if held is not None:
            teacher_bpb = heldout_nll(teacher, held) / math.log(2)
            init_bpb = heldout_nll(student, held) / math.log(2)
        cfg = TrainConfig(
            steps=p.steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr,
            warmup_steps=max(1, p.steps // 10), seed=ctx.seed, precision=p.precision,
        )  # fmt: skip
        every = max(1, p.steps // 5)
        log.info("distilling a %d-layer student from the %d-layer teacher for %d steps", student.args.n_layers,
                 teacher.args.n_layers, p.steps)  # fmt: skip
        t0 = time.perf_counter()
        losses = fit(
            student, ctx.train_tokens, cfg, loss_fn=distillation_loss(teacher, p.temperature, p.alpha),
            on_step=lambda s, loss, lr, r: log.info("distill step %d/%d loss %.4f", s, p.steps, loss)
            if s % every == 0 else None,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        meta = {"distill_seconds": seconds, "final_loss": losses[-1], "steps": p.steps,
                "precision": resolve_precision(p.precision, ctx.device)}  # fmt: skip
        if held is not None:
            distilled_bpb = heldout_nll(student, held) / math.log(2)
            gap = init_bpb - teacher_bpb
            meta.update(
                teacher_bits_per_byte=teacher_bpb, init_bits_per_byte=init_bpb, distilled_bits_per_byte=distilled_bpb,
                gap_recovered=(init_bpb - distilled_bpb) / gap if gap > 0 else None,
            )  # fmt: skip
            log.info("held-out bits/byte: teacher %.3f, student init %.3f, distilled %.3f (%.0f%% of the gap)",
                     teacher_bpb, init_bpb, distilled_bpb, 100 * (meta["gap_recovered"] or 0))  # fmt: skip
        return meta
