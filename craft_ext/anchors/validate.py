"""Does a cache fit the student that is about to train against it?

A cache built for another policy type, hidden width, depth, tokenizer, image layout, layer set or
pooling gives a loss that looks fine and means nothing; this check turns that into an error that
names every mismatching field with the cached and the current value. The teacher's weights checksum
is deliberately not compared: the student is *meant* to have different weights.
"""

from __future__ import annotations

from typing import Sequence

from ..policies.base import PolicyAdapter
from .manifest import AnchorCacheError, Manifest

#: identity fields that describe the weights rather than the architecture / input layout
WEIGHT_FIELDS = frozenset({"weights_sha256", "weights_checksum", "checksum", "path"})


def check_compatible(
    manifest: Manifest,
    adapter: PolicyAdapter,
    *,
    pooling: str | None = None,
    layers: Sequence[int] | None = None,
) -> None:
    """Raise AnchorCacheError listing every field where the cache and the student disagree.

    ``pooling`` / ``layers``: what the training config asks for, when it says so explicitly."""
    hidden = manifest.settings.hidden
    cached = manifest.settings.teacher.identity
    current = adapter.identity()
    problems = []

    def compare(name, cached_value, current_value):
        if cached_value != current_value:
            problems.append(f"{name}: cache has {cached_value!r}, student has {current_value!r}")

    compare("policy_type", cached.get("policy_type"), adapter.policy_type)
    compare("hidden_dim", hidden.dim, adapter.hidden_dim)
    for key in sorted((set(cached) | set(current)) - WEIGHT_FIELDS - {"policy_type", "hidden_dim"}):
        compare(key, cached.get(key), current.get(key))
    too_deep = [layer for layer in hidden.layers if layer >= adapter.num_layers]
    if too_deep:
        problems.append(f"layers: cache has layers {hidden.layers}, student has only {adapter.num_layers}")
    if pooling is not None:
        compare("pooling", hidden.pooling, pooling)
    if layers is not None and not too_deep:
        compare("layers", hidden.layers, adapter.resolve_layers(layers))
    if problems:
        raise AnchorCacheError("the anchor cache does not fit this policy: " + "; ".join(problems))
