"""The retention loss: how far the student's anchored hidden states moved from the cached teacher's.

Student features come from the same adapter + pooling path the cache was built with, and the
distance is computed per row and per layer with the ``hidden_mse`` op. ``normalized_mse`` divides
each layer's MSE by the teacher's variance of that layer (recorded in the manifest), so a constraint
epsilon = 0.05 reads as "5% of the teacher's variance" whatever the layer's scale.

This module sits above the cache package (it imports ``anchors``, never the reverse).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .anchors.features import anchor_features
from .anchors.manifest import HIDDEN_DTYPES, AnchorCacheError, Manifest
from .anchors.reader import AnchorBatch, AnchorCache
from .policies.base import PolicyAdapter

DISTANCES = ("normalized_mse", "mse", "cosine")


def retention_per_row(
    adapter: PolicyAdapter, batch: AnchorBatch, manifest: Manifest, *, distance: str = "normalized_mse"
) -> torch.Tensor:
    """float32[B]: the distance of each anchor row, differentiable in the student's parameters."""
    hidden = manifest.settings.hidden
    student, _ = anchor_features(adapter, batch.inputs, hidden.layers, hidden.pooling)
    if student.shape != batch.hidden.shape:
        raise AnchorCacheError(
            f"the student's anchored hidden states have shape {list(student.shape)} but the cache stores "
            f"{list(batch.hidden.shape)} (layers, vectors/tokens, dim must match)"
        )
    # The cached mask is the teacher's; the inputs are identical, so it is the student's too.
    return row_distance(student, batch.hidden, batch.mask, distance=distance, layer_var=manifest.layer_var)


def retention_loss(
    adapter: PolicyAdapter, batch: AnchorBatch, manifest: Manifest, *, distance: str = "normalized_mse"
) -> torch.Tensor:
    """Scalar L_ret: the mean over the batch's rows of ``retention_per_row``."""
    return retention_per_row(adapter, batch, manifest, distance=distance).mean()


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
    """The cache's own teacher must give L_ret == 0 up to the storage dtype's rounding.

    Catches a non-deterministic forward, a teacher/student path mismatch or broken storage right
    after building, when it is cheap to fix. Returns the largest normalised L_ret seen."""
    manifest = cache.manifest
    hidden_cfg = manifest.settings.hidden
    picks = sorted({int(round(x)) for x in np.linspace(0, len(cache) - 1, min(rows, len(cache)))})
    batch = cache.gather(picks).to(device)
    with torch.no_grad():
        student, _ = anchor_features(adapter, batch.inputs, hidden_cfg.layers, hidden_cfg.pooling)
        if student.shape != batch.hidden.shape:
            raise AnchorCacheError(
                f"self-check: the teacher now gives hidden states of shape {list(student.shape)}, the cache "
                f"stores {list(batch.hidden.shape)}"
            )
        kwargs = dict(mask=batch.mask, distance="normalized_mse", layer_var=manifest.layer_var)
        got = row_distance(student, batch.hidden, **kwargs)
        rounding = row_distance(student, student.to(HIDDEN_DTYPES[hidden_cfg.dtype]), **kwargs)
    worst = float(got.max())
    if bool((got > 2 * rounding + 1e-6).any()):
        raise AnchorCacheError(
            f"self-check failed: the teacher does not reproduce its own cache (normalised L_ret per row "
            f"{got.tolist()}, {hidden_cfg.dtype} rounding alone gives {rounding.tolist()}): the forward is "
            "non-deterministic or the stored inputs do not give the same prefix"
        )
    return worst
