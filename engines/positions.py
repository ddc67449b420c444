"""Whether a forward is a prefill from position 0, known without reading the device where the caller says so.

A prefill at positions 0..S-1 attends causally over the S cache rows it writes, whatever the static cache's
length (``engines.llama``); telling it apart from a chunk at a later offset must not cost a host read inside
the timed prefill.
"""

from __future__ import annotations

import weakref

from torch import Tensor

_FROM_ZERO: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def from_zero_positions(positions: Tensor) -> Tensor:
    """Declare ``positions`` (an arange from 0) a prefill's, so ``starts_at_zero`` knows it without a host read."""
    _FROM_ZERO[id(positions)] = positions
    return positions


def starts_at_zero(input_pos: Tensor, s: int) -> bool:
    """Whether a prefill of S > 1 tokens is at positions 0..S-1. The decoding loops declare theirs
    (``from_zero_positions``); other positions are read, two of them once per prefill (a sync on CUDA, inside
    TTFT). A decode step (S = 1) reads nothing, so decode graphs (CUDA graphs, torch.compile) stay host-free."""
    if s <= 1 or input_pos.shape[0] != s:
        return False
    return _FROM_ZERO.get(id(input_pos)) is input_pos or input_pos[[0, -1]].tolist() == [0, s - 1]
