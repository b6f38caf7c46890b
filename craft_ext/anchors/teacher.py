"""The teacher side of a cache build: which dataset frames become anchors, and the teacher forward
that turns them into shards.

Model-facing half of the cache (the writer knows nothing of models). Batches are formed inside a
shard only, so a shard's bytes depend on the settings alone and a resumed build reproduces them.
The self-check that the teacher reproduces its cache is a retention-loss check:
``craft_ext.engine.retention.check_teacher_reproduces``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..policies.base import PolicyAdapter
from .features import anchored_features, target_tensors
from .manifest import HIDDEN_DTYPES, PREFIX_TERM, ActionPathInfo, AnchorCacheError
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
    dtype = HIDDEN_DTYPES[settings.hidden.dtype]
    terms = settings.action_terms
    for index in list(writer.pending):
        frames = settings.shard_frames(index)
        hidden, masks, inputs, targets = [], [], {}, {}
        done = 0
        for batch in load_batches(frames):
            model_inputs = adapter.anchor_inputs(batch)
            rows = next(iter(model_inputs.values())).shape[0]
            if terms:
                draws = flow_draws(settings.action, frames[done : done + rows])
                model_inputs.update(adapter.action_inputs(batch, model_inputs, terms, draws))
            done += rows
            with torch.no_grad():
                features = anchored_features(adapter, model_inputs, settings)
            values, mask = features[PREFIX_TERM]
            hidden.append(values.to(dtype).cpu())
            masks.append(mask)
            for key, value in model_inputs.items():
                inputs.setdefault(key, []).append(value.detach().cpu())
            for key, value in target_tensors(features).items():
                targets.setdefault(key, []).append(value.detach().cpu() if value.dtype == torch.bool else value.to(dtype).cpu())
            progress(values.shape[0])
        writer.write_shard(
            index,
            _cat("hidden states", hidden),
            None if masks[0] is None else _cat("token mask", [m.cpu() for m in masks]),
            {key: _cat(f"input {key!r}", parts) for key, parts in inputs.items()},
            {key: _cat(f"target {key!r}", parts) for key, parts in targets.items()},
        )


def flow_draws(action: ActionPathInfo, frames: Sequence[int]) -> dict[str, torch.Tensor]:
    """The recorded flow-matching noise [rows, *noise_shape] and time [rows] of anchor rows taken from
    dataset positions ``frames``: each row's own generator, numpy's default_rng([noise_seed, frame]),
    so a row's draw depends on the settings and its frame only (resumed builds reproduce it). Time is
    Beta(alpha, beta) * scale + offset, lerobot's training distribution. Empty without a noise seed."""
    if action.noise_seed is None:
        return {}
    t = action.time_distribution
    noise, time = [], []
    for frame in frames:
        rng = np.random.default_rng([action.noise_seed, int(frame)])
        noise.append(rng.standard_normal(action.noise_shape, dtype=np.float32))
        time.append(rng.beta(t["alpha"], t["beta"]) * t["scale"] + t["offset"])
    return {
        "noise": torch.from_numpy(np.stack(noise)),
        "time": torch.tensor(time, dtype=torch.float32),
    }


def _cat(what: str, parts: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise AnchorCacheError(
            f"{what} have different per-row shapes across batches {sorted(shapes)}: the preprocessor must "
            "pad to a fixed length (pi0-fast: padding='max_length')"
        )
    return torch.cat(parts)
