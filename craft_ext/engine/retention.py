"""The retention loss: how far the student's anchored outputs moved from the cached teacher's.

Student features come from the same adapter + pooling path the cache was built with (one anchor
forward for every term: the prefix hidden states and, in format-v3 caches, the action path's), and
each term's distance is computed per row and per layer with the ``hidden_mse`` op.
``normalized_mse`` divides each layer's MSE by the teacher's variance of that layer (the velocity's:
of its action dimensions), recorded in the manifest, so every term reads "x% of the teacher's
spread". The loss of a row is the weighted mean of its terms,

    L_ret = sum_k w_k L_k / sum_k w_k,

with the cache's term weights (``Manifest.weights``; ``--craft.term_weights`` overrides them), so
epsilon = 0.05 still means 5% of the teacher's variance, now on average over the anchored terms.

This module sits above the cache package (it imports ``anchors``, never the reverse).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..anchors.features import anchored_features
from ..anchors.manifest import HIDDEN_DTYPES, PREFIX_TERM, TARGET_MASK_SUFFIX, AnchorCacheError, Manifest
from ..anchors.reader import AnchorBatch, AnchorCache
from ..policies.base import PolicyAdapter

DISTANCES = ("normalized_mse", "mse", "cosine")


def retention_terms(
    adapter: PolicyAdapter, batch: AnchorBatch, manifest: Manifest, *, distance: str = "normalized_mse"
) -> dict[str, torch.Tensor]:
    """term -> float32[B]: each anchored term's distance per row (``Manifest.terms``), all from one
    anchor forward, differentiable in the student's parameters."""
    student = anchored_features(adapter, batch.inputs, manifest.settings)
    out = {}
    for term in manifest.terms:
        values, _ = student[term]
        teacher, mask = _teacher(batch, term)
        if values.shape != teacher.shape:
            raise AnchorCacheError(
                f"the student's anchored {term} has shape {list(values.shape)} but the cache stores "
                f"{list(teacher.shape)} (layers, vectors/tokens, dim must match)"
            )
        # The cached mask is the teacher's; the inputs are identical, so it is the student's too.
        out[term] = row_distance(values, teacher, mask, distance=distance, layer_var=manifest.term_variance(term))
    return out


def combine_terms(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted mean of per-row term distances: sum_k w_k L_k / sum_k w_k."""
    total = sum(weights[term] for term in terms)
    if total <= 0:
        raise ValueError(f"the retention terms' weights {weights} must have a positive sum")
    return sum(terms[term] * (weights[term] / total) for term in terms)


def retention_per_row(
    adapter: PolicyAdapter, batch: AnchorBatch, manifest: Manifest, *, distance: str = "normalized_mse"
) -> torch.Tensor:
    """float32[B]: the distance of each anchor row (the weighted mean of its terms), differentiable in
    the student's parameters."""
    return combine_terms(retention_terms(adapter, batch, manifest, distance=distance), manifest.weights())


def retention_loss(
    adapter: PolicyAdapter, batch: AnchorBatch, manifest: Manifest, *, distance: str = "normalized_mse"
) -> torch.Tensor:
    """Scalar L_ret: the mean over the batch's rows of ``retention_per_row``."""
    return retention_per_row(adapter, batch, manifest, distance=distance).mean()


def _teacher(batch: AnchorBatch, term: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if term == PREFIX_TERM:
        return batch.hidden, batch.mask
    return batch.targets[term], batch.targets.get(term + TARGET_MASK_SUFFIX)


def row_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    distance: str,
    layer_var: list[float],
) -> torch.Tensor:
    """Per-row distance between [B, L, V, D] student and teacher vectors (mask [B, V] in tokens mode),
    averaged over layers and over the valid vectors."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    batch, layers = student.shape[:2]
    if distance == "cosine":
        per_vector = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # [B, L, V]
        weight = torch.ones_like(per_vector) if mask is None else mask[:, None, :].expand_as(per_vector).float()
        return (per_vector * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1)
    # One hidden_mse call over [B*L, V, D] gives the MSE of every (row, layer) pair.
    flat_mask = None if mask is None else mask.repeat_interleave(layers, dim=0)
    per_layer = ops.hidden_mse(
        student.reshape(batch * layers, *student.shape[2:]).contiguous(),
        teacher.reshape(batch * layers, *teacher.shape[2:]).contiguous(),
        flat_mask,
    ).view(batch, layers)
    if distance == "normalized_mse":
        if min(layer_var) <= 0:
            raise ValueError(f"the teacher's per-layer variance {layer_var} has a zero: use distance='mse'")
        per_layer = per_layer / torch.tensor(layer_var, dtype=torch.float32, device=per_layer.device)
    return per_layer.mean(dim=1)


def check_teacher_reproduces(adapter: PolicyAdapter, cache: AnchorCache, device: str | torch.device, rows: int = 4) -> float:
    """The cache's own teacher must give L_ret == 0 up to the storage dtype's rounding, in every term.

    Catches a non-deterministic forward, a teacher/student path mismatch or broken storage right
    after building, when it is cheap to fix. Returns the largest normalised term distance seen."""
    manifest = cache.manifest
    storage = manifest.settings.hidden.dtype
    picks = sorted({int(round(x)) for x in np.linspace(0, len(cache) - 1, min(rows, len(cache)))})
    batch = cache.gather(picks).to(device)
    worst = 0.0
    with torch.no_grad():
        student = anchored_features(adapter, batch.inputs, manifest.settings)
        for term in manifest.terms:
            values, _ = student[term]
            teacher, mask = _teacher(batch, term)
            if values.shape != teacher.shape:
                raise AnchorCacheError(
                    f"self-check: the teacher now gives {term} of shape {list(values.shape)}, the cache "
                    f"stores {list(teacher.shape)}"
                )
            kwargs = dict(mask=mask, distance="normalized_mse", layer_var=manifest.term_variance(term))
            got = row_distance(values, teacher, **kwargs)
            rounding = row_distance(values, values.to(HIDDEN_DTYPES[storage]), **kwargs)
            worst = max(worst, float(got.max()))
            if bool((got > 2 * rounding + 1e-6).any()):
                raise AnchorCacheError(
                    f"self-check failed: the teacher does not reproduce its own cache's {term} (normalised "
                    f"distance per row {got.tolist()}, {storage} rounding alone gives {rounding.tolist()}): the "
                    "forward is non-deterministic or the stored inputs do not give the same outputs"
                )
    return worst
