"""The one code path from model-ready inputs to the vectors that are anchored.

The cache builder (teacher) and the retention loss (student) both call ``anchored_features`` (or, for
the prefix alone, ``anchor_features``), so the layer indexing, prompt layout, noise and time of the
action path and the pooling cannot drift apart between the two.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..policies.base import PolicyAdapter
from ..policies.pooling import pool, pool_sequence
from .manifest import PREFIX_TERM, TARGET_MASK_SUFFIX, BuildSettings


def anchor_features(
    adapter: PolicyAdapter, inputs: dict[str, torch.Tensor], layers: Sequence[int], pooling: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states of ``layers`` over the prefix, pooled: ([B, L, V, D], token mask [B, T] or None)."""
    return pool(adapter.prefix_hidden(inputs, layers), pooling)


def anchored_features(
    adapter: PolicyAdapter, inputs: dict[str, torch.Tensor], settings: BuildSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every anchored term of a cache built with ``settings``, from one forward: term -> (values
    [B, L, V, D], mask [B, V] or None). "prefix" always; the action path's terms as recorded:

      velocity       [B, 1, chunk, action dims]: the chunk's velocity vectors, one "layer"
      expert         [B, Le, V, De]: the expert's layers over the action positions, pooled as the prefix
                     (pooled: mean and last position; tokens: every position)
      action_tokens  [B, L, V, D] with its mask in tokens mode: the layers at the action tokens, pooled
    """
    hidden = settings.hidden
    terms = settings.action_terms
    if not terms:
        return {PREFIX_TERM: anchor_features(adapter, inputs, hidden.layers, hidden.pooling)}
    out = adapter.anchor_forward(inputs, hidden.layers, terms, settings.action.expert_layers)
    features = {PREFIX_TERM: pool(out.prefix, hidden.pooling)}
    action = out.action
    if "velocity" in terms:
        features["velocity"] = (action.velocity[:, None], None)
    if "expert" in terms:
        features["expert"] = pool_sequence(action.expert, None, hidden.pooling)
    if "action_tokens" in terms:
        features["action_tokens"] = pool_sequence(action.action_tokens, action.action_token_mask, hidden.pooling)
    return features


def target_tensors(features: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The stored form of the action-path terms of ``anchored_features``: ``<term>`` and ``<term>.mask``."""
    out = {}
    for term, (values, mask) in features.items():
        if term == PREFIX_TERM:
            continue
        out[term] = values
        if mask is not None:
            out[term + TARGET_MASK_SUFFIX] = mask
    return out
