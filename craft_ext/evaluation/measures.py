"""Forgetting measures: task losses on dataset frames and retention against the cached teacher.

Shared by `python -m craft_ext.eval` and the embedded demo, so both report the same numbers
(docs/architecture.md, "Measuring").
  mean_task_loss        the policy's training loss, mean over frames (pi0-fast: next FAST-token
                        cross-entropy; pi0, pi0.5: flow-matching MSE at seeded noise and times)
  decoded_action_mse    MSE between decoded action chunks and the dataset's, in normalised units
  retention_on_cache    mean retention distance of a policy's hidden states from the cached teacher's
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.utils.collate import lerobot_collate_fn
from lerobot.utils.constants import ACTION

from ..anchors.reader import AnchorCache
from ..engine.retention import retention_per_row
from ..policies import make_adapter
from ..utils.data import dataset_errors, images_to_float

logger = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A fixed set of frames of one dataset, preprocessed once and reused for every model."""

    name: str
    batches: list[dict]

    @property
    def frames(self) -> int:
        return sum(len(b[ACTION]) for b in self.batches)


def load_eval_set(
    name: str,
    repo_id: str,
    root,
    policy_config,
    preprocessor,
    *,
    max_frames: int,
    batch_size: int,
    seed: int = 0,
    exclude: Sequence[int] = (),
) -> EvalSet:
    """Up to `max_frames` frames of a LeRobot dataset (a seeded random subset, in index order, never one
    of `exclude`), preprocessed by `preprocessor` (which holds the normalisation statistics to use)."""
    with dataset_errors(repo_id, root, flag=f"{name}: root"):
        meta = LeRobotDatasetMetadata(repo_id, root=root)
        dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=resolve_delta_timestamps(policy_config, meta))
    candidates = np.setdiff1d(np.arange(len(dataset)), np.asarray(exclude, dtype=np.int64))
    if len(candidates) == 0:
        raise ValueError(f"{name}: no frames left to evaluate on after excluding {len(exclude)} of {len(dataset)}")
    count = min(max_frames, len(candidates))
    frames = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False)).tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, frames),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lerobot_collate_fn if meta.has_language_columns else None,
    )
    return EvalSet(name, [preprocessor(images_to_float(b, meta.camera_keys)) for b in loader])


@torch.no_grad()
def mean_task_loss(policy: torch.nn.Module, eval_set: EvalSet, seed: int = 0) -> float:
    """Mean over frames of the policy's task loss (batch means weighted by size).

    Flow-matching losses draw noise and times: they are drawn from `seed` (the caller's random state
    is left as it was), so every model is scored at the same noise and times on the same frames."""
    adapter = make_adapter(policy)
    total = torch.zeros((), dtype=torch.float64)
    with eval_mode(policy), _seeded(policy, seed):
        for batch in eval_set.batches:
            total += adapter.task_loss(batch).double().cpu() * len(batch[ACTION])
    return total.item() / eval_set.frames


@torch.no_grad()
def decoded_action_mse(policy: torch.nn.Module, eval_set: EvalSet, seed: int = 0) -> tuple[float | None, int]:
    """(MSE of decoded vs true normalised action chunks over the frames that decoded, frames decoded).
    pi0 and pi0.5 integrate from noise: drawn from `seed` for every batch, as in `mean_task_loss`.

    lerobot's decoder asserts the "Action:" prefix per batch and replaces an undecodable sequence by
    zeros (with a warning); such frames count as not decoded. MSE is None when nothing decoded.
    """
    sq_sum, decoded = 0.0, 0
    for batch in eval_set.batches:
        try:
            with eval_mode(policy), _seeded(policy, seed):
                pred = policy.predict_action_chunk(batch)
        except AssertionError as exc:  # the "Action:" prefix check of a whole batch
            logger.warning("decoding failed for a batch of %s: %s", eval_set.name, exc)
            continue
        target = batch[ACTION][:, : pred.shape[1], : pred.shape[2]].to(pred.dtype)
        ok = pred.flatten(1).abs().amax(dim=1) > 0
        sq_sum += ((pred[ok] - target[ok]) ** 2).mean(dim=(1, 2)).sum().item()
        decoded += int(ok.sum())
    return (sq_sum / decoded if decoded else None), decoded


@torch.no_grad()
def retention_on_cache(
    policy: torch.nn.Module, cache: AnchorCache, *, distance: str = "normalized_mse", batch_size: int = 32, max_rows: int = 0
) -> float:
    """Mean retention distance over the cache's rows (the first `max_rows`, 0 = all)."""
    adapter = make_adapter(policy)
    rows = len(cache) if max_rows <= 0 else min(max_rows, len(cache))
    device = next(policy.parameters()).device
    total = 0.0
    with eval_mode(policy):
        for start in range(0, rows, batch_size):
            batch = cache.gather(range(start, min(start + batch_size, rows))).to(device)
            total += retention_per_row(adapter, batch, cache.manifest, distance=distance).double().sum().item()
    return total / rows


@contextlib.contextmanager
def _seeded(policy: torch.nn.Module, seed: int):
    """Draw random numbers from `seed` inside the block; the caller's generator state is restored."""
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(policy: torch.nn.Module):
    """Evaluate in eval mode, then restore the mode the caller had (training loops call these)."""
    was_training = policy.training
    policy.eval()
    try:
        yield
    finally:
        policy.train(was_training)


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe number: NaN/Inf become None."""
    return value if value is not None and math.isfinite(value) else None
