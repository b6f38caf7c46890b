"""Replay: frames of old LeRobot datasets mixed into every task micro-batch (`--replay.*`).

The baseline a robotics team reaches for first: keep some old data and keep training on it. Each
micro-batch of `--batch_size` frames holds `k = round(fraction * batch_size)` replay frames (halves
round up) and `batch_size - k` task frames, so a step costs what a plain step costs; the task loader
yields `batch_size - k` frames per micro-batch (`factory.frames_per_step`). Replay frames join the
task frames before the preprocessor, so they are tokenised and normalised exactly as the task frames
are (with the fine-tuning dataset's statistics, as in any lerobot multi-dataset run). Combinable with
CRaFT: the constraint then sees a task gradient that already contains the replay frames.

Which frames: every frame of `--replay.repo_id` (one or several datasets, drawn uniformly from all of
them together), or exactly the frames an anchor cache was built from (`--replay.frames_from_cache`),
so that replay and CRaFT can be compared on the same old frames.

Order and resume: the replay frames of step t are positions [t*n, (t+1)*n) (n = k per micro-batch times
the micro-batches) of an endless sequence of per-epoch permutations of the pool, each a pure function
of (seed + rank, epoch). The sampler's state is therefore the step itself, which every checkpoint
records: a resumed run draws exactly the frames the uninterrupted run drew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps

from ..anchors.manifest import AnchorCacheError
from ..anchors.reader import AnchorCache
from ..train_config import CraftTrainPipelineConfig
from ..utils.data import dataset_errors, require_dataset_root

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySource:
    """One old dataset and the positions (`dataset[i]`) replay may draw from it."""

    name: str  # repo_id, for messages
    dataset: Any  # LeRobotDataset
    frames: np.ndarray  # int64 positions


class Replay:
    """Draws the replay frames of each step and appends them to the step's task micro-batches."""

    def __init__(self, sources: list[ReplaySource], per_batch: int, seed: int, collate) -> None:
        self.sources, self.per_batch, self.seed, self.collate = sources, per_batch, seed, collate
        self._owner = np.concatenate([np.full(len(s.frames), i) for i, s in enumerate(sources)])
        self._frames = np.concatenate([s.frames for s in sources])
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        """Frames in the pool."""
        return len(self._frames)

    def positions(self, step: int, micro: int) -> list[tuple[int, int]]:
        """(source index, dataset position) of the replay frames of 0-based `step` with `micro` micro-batches."""
        n = self.per_batch * micro
        out = []
        for p in range(step * n, (step + 1) * n):
            epoch, offset = divmod(p, len(self))
            if epoch != self._epoch:
                self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self))
            i = self._order[offset]
            out.append((int(self._owner[i]), int(self._frames[i])))
        return out

    def mix(self, parts: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """The task micro-batches of 0-based `step`, each followed by its `per_batch` replay frames."""
        drawn = [self.sources[s].dataset[i] for s, i in self.positions(step, len(parts))]
        k = self.per_batch
        return [_concat(part, self.collate(drawn[j * k : (j + 1) * k])) for j, part in enumerate(parts)]


def make_replay(cfg: CraftTrainPipelineConfig, dataset, rank: int, collate) -> Replay | None:
    """The run's replay (None without --replay.fraction). Every replay dataset must give frames with
    the task dataset's keys and shapes (the same cameras, state and action); otherwise the error names
    the dataset and the key."""
    replay = cfg.replay
    if not replay.enabled:
        return None
    if cfg.dataset.streaming:
        raise ValueError("--replay.* needs a map-style task dataset: drop --dataset.streaming=true")
    if replay.frames_from_cache is not None:
        try:
            source = AnchorCache(replay.frames_from_cache).manifest.settings.source
        except AnchorCacheError as exc:
            raise AnchorCacheError(f"--replay.frames_from_cache={replay.frames_from_cache}: {exc}") from exc
        wanted = [(source.repo_id, source.root, np.asarray(source.frame_indices, dtype=np.int64))]
        flag = "--replay.frames_from_cache (the cache's source dataset)"
    else:
        wanted = [(r, root, None) for r, root in zip(replay.repo_ids(), replay.roots(), strict=True)]
        flag = "--replay.root"
    sources = []
    for repo_id, root, frames in wanted:
        require_dataset_root(repo_id, root, flag)
        with dataset_errors(repo_id, root, flag=flag):
            meta = LeRobotDatasetMetadata(repo_id, root=root)
            old = LeRobotDataset(repo_id, root=root, delta_timestamps=resolve_delta_timestamps(cfg.policy, meta))
        if frames is None:
            frames = np.arange(len(old), dtype=np.int64)
        elif len(frames) and (frames.min() < 0 or frames.max() >= len(old)):
            raise ValueError(f"{flag}: frame positions up to {frames.max()} for {repo_id}, which has {len(old)} frames")
        if len(frames) == 0:
            raise ValueError(f"{flag}: {repo_id} has no frames to replay")
        _check_compatible(dataset[0], old[int(frames[0])], repo_id, cfg.dataset.repo_id)
        sources.append(ReplaySource(repo_id, old, frames))
    seed = (replay.seed if replay.seed is not None else cfg.seed or 0) + rank
    per_batch = replay.frames_per_batch(cfg.batch_size)
    result = Replay(sources, per_batch, seed, collate)
    logger.info(
        "replay: %d of every %d frames from %s (%d frames)",
        per_batch, cfg.batch_size, ", ".join(s.name for s in sources), len(result),
    )
    return result


def _check_compatible(task_frame: dict, replay_frame: dict, name: str, task_name: str) -> None:
    for key, value in task_frame.items():
        if key not in replay_frame:
            raise ValueError(f"replay dataset {name} has no {key!r}, which the task dataset {task_name} feeds the policy")
        other = replay_frame[key]
        if isinstance(value, torch.Tensor) and (not isinstance(other, torch.Tensor) or other.shape != value.shape):
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise ValueError(
                f"replay dataset {name}: {key!r} has shape {shape}, the task dataset {task_name}'s has {tuple(value.shape)}"
            )


def _concat(task: dict[str, Any], replay: dict[str, Any]) -> dict[str, Any]:
    """One micro-batch: the task frames, then the replay frames (per-frame tensors and lists are joined)."""
    size = next(len(v) for v in task.values() if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0))
    out = {}
    for key, value in task.items():
        other = replay[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = torch.cat([value, other.to(value.dtype)])
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = list(value) + list(other)
        else:
            out[key] = value
    return out
