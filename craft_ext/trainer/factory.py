"""Everything the loop needs, built from the config through lerobot's own factories.

Mirrors what lerobot-train does (same accelerator settings, dataset factory, policy factory,
processor overrides, optimizer/scheduler presets, episode-aware sampler with sample-exact resume),
plus what lerobot cannot do offline: reloading a pi0-fast preprocessor without the hub
(`preprocessor_overrides`).
"""

from __future__ import annotations

from typing import Any

import torch

from lerobot.datasets import EpisodeAwareSampler, compute_sampler_state
from lerobot.datasets.factory import make_train_eval_datasets
from lerobot.policies import make_policy, make_pre_post_processors
from lerobot.utils.collate import lerobot_collate_fn

from ..config import CraftTrainPipelineConfig
from ..policies.loading import preprocessor_overrides


def make_accelerator(cfg: CraftTrainPipelineConfig):
    """The Accelerator lerobot-train would create: device from --policy.device, autocast from
    --policy.dtype. The model is not wrapped in DDP (the CRaFT step all-reduces its flat buffers)."""
    from accelerate import Accelerator

    mixed_precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}.get(cfg.policy.dtype)
    return Accelerator(
        step_scheduler_with_optimizer=False,
        mixed_precision=mixed_precision,
        cpu=cfg.policy.device == "cpu",
    )


def load_datasets(cfg: CraftTrainPipelineConfig):
    """(train, held-out or None) through lerobot's factory; a failure names the dataset."""
    try:
        return make_train_eval_datasets(cfg)
    except Exception as exc:  # lerobot raises hub, IO and parsing errors of many types here
        raise FileNotFoundError(
            f"could not load the dataset --dataset.repo_id={cfg.dataset.repo_id} "
            f"(--dataset.root={cfg.dataset.root}): {type(exc).__name__}: {exc}"
        ) from exc


def build_policy(cfg: CraftTrainPipelineConfig, dataset, device: torch.device):
    """lerobot's make_policy, moved to `device`."""
    policy = make_policy(cfg=cfg.policy, ds_meta=dataset.meta, rename_map=cfg.rename_map)
    return policy.to(device)


def build_processors(cfg: CraftTrainPipelineConfig, policy, dataset, device: torch.device):
    """(preprocessor, postprocessor) as lerobot-train makes them; a fresh run normalises with the
    training dataset's statistics, a resumed one keeps the checkpoint's."""
    pretrained = cfg.policy.pretrained_path
    kwargs: dict[str, Any] = {}
    if not pretrained or not cfg.resume:
        kwargs["dataset_stats"] = dataset.meta.stats
    if pretrained:
        features = {**policy.config.input_features, **policy.config.output_features}
        pre = {
            "device_processor": {"device": device.type},
            "normalizer_processor": {"features": features, "norm_map": policy.config.normalization_mapping},
            "rename_observations_processor": {"rename_map": cfg.rename_map},
            **preprocessor_overrides(policy.config),
        }
        post = {
            "unnormalizer_processor": {
                "features": policy.config.output_features,
                "norm_map": policy.config.normalization_mapping,
            }
        }
        if not cfg.resume:
            pre["normalizer_processor"]["stats"] = dataset.meta.stats
            post["unnormalizer_processor"]["stats"] = dataset.meta.stats
        kwargs.update(preprocessor_overrides=pre, postprocessor_overrides=post)
    return make_pre_post_processors(policy_cfg=cfg.policy, pretrained_path=pretrained, **kwargs)


def make_dataloader(cfg: CraftTrainPipelineConfig, dataset, policy, device: torch.device, step: int, num_processes: int):
    """Task batches in lerobot's order: an episode-aware permutation that is a pure function of
    (seed, epoch), positioned at `step` for a sample-exact resume. Returns (loader, sampler state)."""
    sampler, state = None, None
    if not cfg.dataset.streaming:
        sampler = EpisodeAwareSampler(
            dataset.meta.episodes["dataset_from_index"],
            dataset.meta.episodes["dataset_to_index"],
            episode_indices_to_use=dataset.episodes,
            drop_n_last_frames=getattr(policy.config, "drop_n_last_frames", 0),
            shuffle=True,
            seed=cfg.seed if cfg.seed is not None else 0,
            absolute_to_relative_idx=dataset.absolute_to_relative_idx,
        )
        if step > 0:
            state = compute_sampler_state(step, len(sampler), cfg.batch_size, num_processes)
            sampler.load_state_dict(state)
    workers = cfg.num_workers > 0
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None and not cfg.dataset.streaming,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        collate_fn=lerobot_collate_fn if dataset.meta.has_language_columns else None,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers,
        multiprocessing_context=cfg.dataloader_multiprocessing_context if workers else None,
    )
    return loader, state


def held_out_loader(cfg: CraftTrainPipelineConfig, eval_dataset, device: torch.device):
    """A fixed-order loader over the held-out episodes (--dataset.eval_split), or None."""
    if eval_dataset is None:
        return None
    return torch.utils.data.DataLoader(
        eval_dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=device.type == "cuda",
        collate_fn=lerobot_collate_fn if eval_dataset.meta.has_language_columns else None,
    )


def images_to_float(batch: dict, camera_keys) -> dict:
    """lerobot's datasets return uint8 frames to the loop; its processors expect floats in [0, 1]."""
    for key in camera_keys:
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = batch[key].to(dtype=torch.float32) / 255.0
    return batch
