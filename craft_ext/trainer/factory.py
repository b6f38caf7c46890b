"""Everything the loop needs, built from the config through lerobot's own factories.

Mirrors what lerobot-train does (same accelerator settings, dataset factory, policy factory,
processor overrides, optimizer/scheduler presets, episode-aware sampler with sample-exact resume),
plus what lerobot cannot do offline: reloading a pi0-fast preprocessor without the hub
(`preprocessor_overrides`).
"""

from __future__ import annotations

import signal
from typing import Any

import torch

from lerobot.datasets import EpisodeAwareSampler, compute_sampler_state
from lerobot.datasets.factory import make_train_eval_datasets
from lerobot.policies import make_policy, make_pre_post_processors
from lerobot.utils.collate import lerobot_collate_fn

from ..baselines.peft import apply_peft
from ..policies.loading import preprocessor_overrides
from ..train_config import CraftTrainPipelineConfig
from ..utils.data import dataset_errors


def make_accelerator(cfg: CraftTrainPipelineConfig):
    """The Accelerator lerobot-train would create: device from --policy.device, autocast from
    --policy.dtype. The model is not wrapped in DDP (the CRaFT step reduces its flat buffers). Under
    torchrun it joins the process group with --craft.dist_timeout_s as the collectives' timeout, so
    a process that died or hangs stops the others with an error instead of a silent wait."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mixed_precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}.get(cfg.policy.dtype)
    return Accelerator(
        step_scheduler_with_optimizer=False,
        mixed_precision=mixed_precision,
        cpu=cfg.policy.device == "cpu",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.craft.dist_timeout_s))],
    )


def make_optimizer_and_scheduler(cfg: CraftTrainPipelineConfig, policy, device: torch.device):
    """lerobot's `make_optimizer_and_scheduler` (same presets and parameter groups), with
    --craft.fused_adamw: lerobot's adam / adamw optimizer built with torch's fused kernel."""
    from lerobot.optim.factory import make_optimizer_and_scheduler as lerobot_optimizer_and_scheduler

    if not use_fused_adamw(cfg, device):
        return lerobot_optimizer_and_scheduler(cfg, policy)
    from dataclasses import asdict

    params = policy.get_optim_params() if cfg.use_policy_training_preset else policy.parameters()
    kwargs = asdict(cfg.optimizer)  # what lerobot's AdamConfig / AdamWConfig.build pass to torch
    kwargs.pop("grad_clip_norm")
    optimizer = (torch.optim.AdamW if cfg.optimizer.type == "adamw" else torch.optim.Adam)(params, **kwargs, fused=True)
    scheduler = cfg.scheduler.build(optimizer, cfg.steps) if cfg.scheduler is not None else None
    return optimizer, scheduler


def use_fused_adamw(cfg: CraftTrainPipelineConfig, device: torch.device) -> bool:
    """Whether this run's optimizer uses torch's fused Adam(W) kernel: --craft.fused_adamw, or, when
    null, on CUDA with lerobot's adam / adamw optimizer. Raises for true with another optimizer."""
    adam = cfg.optimizer is not None and cfg.optimizer.type in ("adam", "adamw")
    if cfg.craft.fused_adamw is None:
        return adam and device.type == "cuda"
    if cfg.craft.fused_adamw and not adam:
        raise ValueError(
            f"--craft.fused_adamw=true needs lerobot's adam or adamw optimizer, not {cfg.optimizer.type!r}"
            if cfg.optimizer is not None else "--craft.fused_adamw=true: the run has no optimizer config"
        )
    return cfg.craft.fused_adamw


def keep_optimizer_kernel(optimizer, fused: bool) -> None:
    """After a checkpoint's optimizer state is loaded: the run's kernel choice, not the saved run's
    (torch takes each param group's `fused` flag from the loaded state)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in inner.param_groups:
        if "fused" in group:  # torch's Adam / AdamW (as built: fused True or None, foreach None)
            group["fused"] = True if fused else None
            if fused:
                group["foreach"] = None


def load_datasets(cfg: CraftTrainPipelineConfig):
    """(train, held-out or None) through lerobot's factory; a failure names the dataset and, for a
    local root, what is wrong with it (`craft_ext.utils.data.dataset_errors`)."""
    with dataset_errors(cfg.dataset.repo_id, cfg.dataset.root):
        return make_train_eval_datasets(cfg)


def build_policy(cfg: CraftTrainPipelineConfig, dataset, device: torch.device):
    """lerobot's make_policy with lerobot-train's --peft.* wrapping (`apply_peft`), moved to `device`."""
    pretrained = cfg.policy.pretrained_path
    policy = make_policy(cfg=cfg.policy, ds_meta=dataset.meta, rename_map=cfg.rename_map)
    cfg.policy.pretrained_path = pretrained  # loading a PEFT checkpoint can re-point it at the base policy
    return apply_peft(cfg, policy).to(device)


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


def frames_per_step(cfg: CraftTrainPipelineConfig) -> int:
    """Task frames one optimisation step consumes per process: --batch_size per micro-batch, less the
    micro-batch's replay frames (--replay.fraction), times --craft.gradient_accumulation_steps (what the
    sampler position advances by per step)."""
    task_frames = cfg.batch_size - cfg.replay.frames_per_batch(cfg.batch_size)
    return task_frames * cfg.craft.gradient_accumulation_steps


def make_dataloader(cfg: CraftTrainPipelineConfig, dataset, policy, device: torch.device, step: int, num_processes: int):
    """Task batches in lerobot's order: an episode-aware permutation that is a pure function of
    (seed, epoch), positioned at `step` for a sample-exact resume. One batch per optimisation step:
    `frames_per_step` frames, which the loop splits into the step's micro-batches. Returns (loader,
    sampler state)."""
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
            state = compute_sampler_state(step, len(sampler), frames_per_step(cfg), num_processes)
            sampler.load_state_dict(state)
    num_workers = cfg.loader_workers
    workers = num_workers > 0
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=frames_per_step(cfg),
        shuffle=sampler is None and not cfg.dataset.streaming,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        collate_fn=lerobot_collate_fn if dataset.meta.has_language_columns else None,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers,
        multiprocessing_context=cfg.dataloader_multiprocessing_context if workers else None,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    return loader, state


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: Ctrl-C and schedulers signal the whole process
    group, and a worker dying of it would abort the training process in the middle of its on-signal
    checkpoint (torch raises when a worker exits unexpectedly). The training process stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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

