"""The teacher side of a cache build: which dataset frames become anchors, and the teacher forward
that turns them into shards.

Model-facing half of the cache (the writer knows nothing of models). Batches are formed inside a
shard only, so a shard's bytes depend on the settings alone and a resumed build reproduces them.
The self-check that the teacher reproduces its cache is a retention-loss check:
``craft_ext.retention.check_teacher_reproduces``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..policies.base import PolicyAdapter
from .features import anchor_features
from .manifest import HIDDEN_DTYPES, AnchorCacheError
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
