"""The eager engine: the reference model as it is, the baseline every other variant is compared with."""

from __future__ import annotations

from torch import nn

from engines.base import Engine, PrepareContext, register


@register
class EagerEngine(Engine):
    name = "eager"
    description = "Reference PyTorch model in eager mode (no fusion, no compilation)."

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        return model
