"""The training loop: lerobot's components around the CRaFT step, with checkpoints, resume and metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from lerobot.common.train_utils import should_save_checkpoint
from lerobot.common.wandb_utils import WandBLogger
from lerobot.optim.factory import make_optimizer_and_scheduler
from lerobot.utils.random_utils import set_seed
from lerobot.utils.utils import cycle, inside_slurm

from ..config import CraftTrainPipelineConfig
from ..policies import make_adapter
from .checkpoint import CraftState, load_training_checkpoint, save_training_checkpoint
from .checks import check_cache_fits, check_dataset_exists, check_distributed, check_supported, open_anchor_cache
from .constraint import Constraint
from .factory import (
    build_policy,
    build_processors,
    held_out_loader,
    images_to_float,
    load_datasets,
    make_accelerator,
    make_dataloader,
)
from .metrics import MetricsLog, MetricsWindow, progress_postfix
from .step import CraftStep

logger = logging.getLogger(__name__)

#: called on the main process at each log step with (step, policy); returns extra metrics to record.
#: It must not run collectives (other processes do not call it).
Probe = Callable[[int, torch.nn.Module], dict[str, float]]


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had NaN/Inf losses or gradients."""


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None  # the last checkpoint this process wrote (None on non-main processes)
    steps: int
    wall_time_s: float
    skipped_steps: int
    final_lambda: float | None


def train(cfg: CraftTrainPipelineConfig, *, probe: Probe | None = None) -> TrainResult:
    """Run (or resume) the training run described by `cfg`. Bad input raises before any step."""
    start = time.perf_counter()
    cfg.validate()
    check_supported(cfg)
    check_dataset_exists(cfg)
    cache = open_anchor_cache(cfg.craft) if cfg.craft.enable else None
    accelerator = make_accelerator(cfg)
    check_distributed(accelerator)
    device, is_main = accelerator.device, accelerator.is_main_process
    if cfg.seed is not None:
        set_seed(cfg.seed, accelerator=accelerator)

    dataset, eval_dataset = load_datasets(cfg)
    policy = build_policy(cfg, dataset, device)
    adapter = make_adapter(policy)
    if cache is not None:
        check_cache_fits(cache, adapter)
    preprocessor, postprocessor = build_processors(cfg, policy, dataset, device)
    optimizer, scheduler = make_optimizer_and_scheduler(cfg, policy)

    step, state = 0, CraftState(enabled=cfg.craft.enable)
    if cfg.resume:
        step, state = load_training_checkpoint(cfg.checkpoint_path, optimizer, scheduler)
        if state.enabled != cfg.craft.enable:
            raise ValueError(
                f"the checkpoint {cfg.checkpoint_path} was trained with craft.enable={state.enabled}, "
                f"this run has --craft.enable={cfg.craft.enable}"
            )
    loader, sampler_state = make_dataloader(cfg, dataset, policy, device, step, accelerator.num_processes)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    if sampler_state is not None:  # accelerate re-sets the sampler's epoch from its own counter
        loader.set_epoch(sampler_state["epoch"])
    eval_loader = held_out_loader(cfg, eval_dataset, device)

    engine = CraftStep(
        policy,
        adapter,
        optimizer,
        scheduler,
        accelerator,
        manifest=cache.manifest if cache is not None else None,
        distance=cfg.craft.distance,
        project=cfg.craft.project,
        tau=cfg.craft.tau,
        merge=cfg.craft.merge,
        max_norm=cfg.optimizer.grad_clip_norm if cfg.optimizer.grad_clip_norm > 0 else None,
    )
    constraint = None
    if cache is not None:
        constraint = Constraint(
            cfg.craft, cache, total_steps=cfg.steps, seed=cfg.seed or 0, rank=accelerator.process_index, device=device
        )
        if state.multiplier is not None:
            constraint.load_from(state)

    log = None
    if is_main:
        wandb = WandBLogger(cfg) if cfg.wandb.enable and cfg.wandb.project else None
        log = MetricsLog(cfg.output_dir, resume_step=step if cfg.resume else None, wandb_logger=wandb)
        mode = f"CRaFT, anchors {cache.directory} ({len(cache)} rows)" if cache is not None else "plain fine-tuning"
        logger.info("%s: steps %d..%d, output %s", mode, step + 1, cfg.steps, cfg.output_dir)

    window, checkpoint = MetricsWindow(), None
    batches = cycle(loader)
    policy.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="craft" if constraint else "plain", unit="step", disable=not is_main or inside_slurm())
    with bar, constraint.anchors if constraint is not None else contextlib.nullcontext():
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            batch = preprocessor(images_to_float(next(batches), dataset.meta.camera_keys))
            anchors = constraint.anchor_batch(step) if constraint is not None else None
            epsilon = constraint.epsilon(step) if constraint is not None else None
            output = engine.compute(batch, anchors, constraint.lam if constraint is not None else 0.0, epsilon=epsilon)
            host = output.read()
            applied = engine.finish(output, host)
            if applied and anchors is not None:
                constraint.update(host["loss_ret"], epsilon)
            step += 1  # from here on `step` counts completed steps, as in metrics and checkpoints
            bar.update(1)
            _count_skip(state, applied, step, host, cfg.craft.max_consecutive_skips)
            window.add(_step_values(host, applied, lr, time.perf_counter() - t0, constraint, epsilon))

            if cfg.log_freq > 0 and step % cfg.log_freq == 0:
                if is_main:
                    record = {"step": step, **window.means(), **(probe(step, policy) if probe is not None else {})}
                    log.write(record)
                    bar.set_postfix(progress_postfix(record))
                window.reset()
            if eval_loader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and is_main:
                loss = held_out_loss(adapter, policy, eval_loader, preprocessor, dataset.meta.camera_keys, accelerator)
                log.write({"step": step, "eval_loss": loss})
            if cfg.save_checkpoint and should_save_checkpoint(step, cfg.save_freq, cfg.steps):
                if constraint is not None:
                    constraint.save_into(state)
                if is_main:
                    checkpoint = save_training_checkpoint(
                        Path(cfg.output_dir),
                        step,
                        cfg.steps,
                        state,
                        cfg=cfg,
                        policy=accelerator.unwrap_model(policy),
                        optimizer=optimizer,
                        scheduler=scheduler,
                        preprocessor=preprocessor,
                        postprocessor=postprocessor,
                        num_processes=accelerator.num_processes,
                        batch_size=cfg.batch_size,
                    )
                accelerator.wait_for_everyone()

    return TrainResult(
        output_dir=Path(cfg.output_dir),
        checkpoint=checkpoint,
        steps=step,
        wall_time_s=time.perf_counter() - start,
        skipped_steps=state.skipped_steps,
        final_lambda=constraint.lam if constraint is not None else None,
    )


def held_out_loss(adapter, policy, loader, preprocessor, camera_keys, accelerator) -> float:
    """Mean task loss over the held-out episodes (--dataset.eval_split with --eval_steps)."""
    policy.eval()
    total, batches = torch.zeros((), device=accelerator.device), 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            total += adapter.task_loss(preprocessor(images_to_float(batch, camera_keys))).float()
            batches += 1
    policy.train()
    return total.item() / max(batches, 1)


def _step_values(host: dict[str, float], applied: bool, lr: float, seconds: float, constraint, epsilon) -> dict[str, float]:
    """One step's metrics: a skipped step contributes only its skip (its losses are NaN)."""
    values = {k: v for k, v in host.items() if k != "found_inf"} if applied else {}
    if "conflict" in values:
        values["conflict_rate"] = values.pop("conflict")
    values.update(skip_rate=float(not applied), lr=lr, step_s=seconds)
    if constraint is not None:
        values.update({"lambda": constraint.lam, "epsilon": epsilon})
    return values


def _count_skip(state: CraftState, applied: bool, step: int, host: dict[str, float], limit: int) -> None:
    """Track skipped steps; warn on each, abort after `limit` in a row."""
    if applied:
        state.consecutive_skips = 0
        return
    state.consecutive_skips += 1
    state.skipped_steps += 1
    losses = f"L_task={host['loss_task']}" + (f", L_ret={host['loss_ret']}" if "loss_ret" in host else "")
    logger.warning(
        "step %d skipped: non-finite loss or gradient (%s, found_inf=%d); %d in a row",
        step,
        losses,
        int(host["found_inf"]),
        state.consecutive_skips,
    )
    if state.consecutive_skips >= limit:
        raise NonFiniteTrainingError(
            f"{state.consecutive_skips} consecutive steps (up to step {step}) had NaN/Inf losses or gradients; "
            f"aborting (--craft.max_consecutive_skips={limit}). Lower the learning rate, check the data, or "
            "resume from the last checkpoint."
        )
