"""Building a cache from a teacher policy: which frames, the teacher forward, and the self-check.

Model-facing half of the cache (the writer knows nothing of models). Batches are formed inside a
shard only, so a shard's bytes depend on the settings alone and a resumed build reproduces them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..policies.base import PolicyAdapter
from ..retention import row_distance
from .features import anchor_features
from .manifest import HIDDEN_DTYPES, AnchorCacheError
from .reader import AnchorCache
from .writer import AnchorCacheWriter


def select_anchor_frames(episode_of_frame: Sequence[int], num_anchors: int, seed: int) -> list[int]:
    """``num_anchors`` dataset positions spread evenly over episodes, deterministic in ``seed``.

    Round-robin: every episode gives one random frame per round (episodes in a seeded order, so the
    last partial round is not always the first episodes), until enough frames are chosen."""
    episodes = np.asarray(episode_of_frame)
    if episodes.size == 0:
        raise ValueError("the dataset is empty: no frames to take anchors from")
    if not 1 <= num_anchors <= episodes.size:
        raise ValueError(f"num_anchors must be between 1 and the dataset's {episodes.size} frames, got {num_anchors}")
    rng = np.random.default_rng(seed)
    by_episode = np.argsort(episodes, kind="stable")
    _, counts = np.unique(episodes[by_episode], return_counts=True)
    groups = np.split(by_episode, np.cumsum(counts)[:-1])
    pools = [rng.permutation(groups[i]) for i in rng.permutation(len(groups))]
    chosen: list[int] = []
    for round_ in range(int(counts.max())):
        for pool in pools:
            if round_ < len(pool) and len(chosen) < num_anchors:
                chosen.append(int(pool[round_]))
    return sorted(chosen)


def write_shards(
    writer: AnchorCacheWriter,
    adapter: PolicyAdapter,
    load_batches: Callable[[list[int]], Iterable[dict]],
    progress: Callable[[int], object] = lambda rows: None,
) -> None:
    """Run the teacher over every pending shard's frames and write the shards.

    ``load_batches(frames)`` yields preprocessed batches (exactly what training feeds the policy)
    covering ``frames`` in order."""
    settings = writer.settings
    hidden_cfg = settings.hidden
    dtype = HIDDEN_DTYPES[hidden_cfg.dtype]
    for index in list(writer.pending):
        hidden, masks, inputs = [], [], {}
        for batch in load_batches(settings.shard_frames(index)):
            model_inputs = adapter.anchor_inputs(batch)
            with torch.no_grad():
                values, mask = anchor_features(adapter, model_inputs, hidden_cfg.layers, hidden_cfg.pooling)
            hidden.append(values.to(dtype).cpu())
            masks.append(mask)
            for key, value in model_inputs.items():
                inputs.setdefault(key, []).append(value.detach().cpu())
            progress(values.shape[0])
        writer.write_shard(
            index,
            _cat("hidden states", hidden),
            None if masks[0] is None else _cat("token mask", [m.cpu() for m in masks]),
            {key: _cat(f"input {key!r}", parts) for key, parts in inputs.items()},
        )


def _cat(what: str, parts: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise AnchorCacheError(
            f"{what} have different per-row shapes across batches {sorted(shapes)}: the preprocessor must "
            "pad to a fixed length (pi0-fast: padding='max_length')"
        )
    return torch.cat(parts)


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
