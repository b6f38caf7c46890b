"""The one code path from model-ready inputs to the vectors that are anchored.

The cache builder (teacher) and the retention loss (student) both call ``anchor_features``, so the
layer indexing, prompt layout and pooling cannot drift apart between the two.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..policies.base import PolicyAdapter
from ..policies.pooling import pool


def anchor_features(
    adapter: PolicyAdapter, inputs: dict[str, torch.Tensor], layers: Sequence[int], pooling: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states of ``layers`` over the prefix, pooled: ([B, L, V, D], token mask [B, T] or None)."""
    return pool(adapter.prefix_hidden(inputs, layers), pooling)
