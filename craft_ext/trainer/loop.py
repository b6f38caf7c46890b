"""The training run: `setup` builds everything from the config, `run_loop` steps it.

`train(cfg)` = validate, `setup`, `run_loop`. The loop writes metrics, periodic checkpoints, and on
SIGINT/SIGTERM one more checkpoint after the current step (craft_ext.trainer.stopping; docs/architecture.md,
"Data flow").
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import default_collate

from lerobot.common.train_utils import load_training_step, should_save_checkpoint
from lerobot.utils.collate import lerobot_collate_fn
from lerobot.utils.constants import TRAINING_STATE_DIR
from lerobot.utils.random_utils import set_seed
from lerobot.utils.utils import cycle

from ..baselines import Baselines, make_baselines
from ..baselines.peft import check_constraint_can_act
from ..engine.step import CraftStep, split_frames
from ..policies import make_adapter
from ..policies.base import PolicyAdapter
from ..train_config import CraftTrainPipelineConfig
from ..utils.cli_logging import progress, quiet_policy_load
from ..utils.data import images_to_float
from .checkpoint import CraftState, load_training_checkpoint, save_training_checkpoint
from .checks import (
    check_cache_fits,
    check_dataset_exists,
    check_distributed,
    check_student_matches_teacher,
    check_supported,
    open_anchor_cache,
)
from .constraint import Constraint
from .factory import (
    build_policy,
    build_processors,
    frames_per_step,
    held_out_loader,
    keep_optimizer_kernel,
    load_datasets,
    make_accelerator,
    make_dataloader,
    make_optimizer_and_scheduler,
    use_fused_adamw,
)
from .metrics import MetricsLog, MetricsWindow, progress_postfix
from .output_dir import check_resumable, hold_output_dir
from .sharding import Parallelism, load_optimizer_state
from .stopping import StopOnSignal, agree_to_stop

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
    first_step: int  # completed steps when this run started (the resumed checkpoint's step; 0 if fresh)
    steps: int  # completed steps when it ended
    wall_time_s: float
    skipped_steps: int
    final_lambda: float | None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run early

    @property
    def already_finished(self) -> bool:
        """A resumed run whose checkpoint was already at --steps: nothing was trained."""
        return self.first_step == self.steps and self.stopped_by is None


@dataclass
class Run:
    """Everything `setup` built for one run; `run_loop` steps it."""

    cfg: CraftTrainPipelineConfig
    accelerator: Any
    dataset: Any
    policy: torch.nn.Module
    adapter: PolicyAdapter
    preprocessor: Any
    postprocessor: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    eval_loader: Any | None
    baselines: Baselines  # replay and L2-SP (craft_ext.baselines)
    engine: CraftStep
    parallel: Parallelism
    constraint: Constraint | None
    state: CraftState
    start_step: int
    log: MetricsLog | None  # main process only

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: CraftTrainPipelineConfig, *, probe: Probe | None = None) -> TrainResult:
    """Run (or resume) the training run described by `cfg`. Bad input raises before any step.

    SIGINT/SIGTERM during the loop stop it after the current step with a checkpoint
    (`TrainResult.stopped_by`); a second signal exits at once.
    """
    start = time.perf_counter()
    cfg.validate()
    check_supported(cfg)
    check_resumable(cfg)
    with hold_output_dir(cfg):  # one run per --output_dir, taken before anything is built
        if cfg.resume:
            finished = _finished_run(cfg, start)
            if finished is not None:
                return finished
        return run_loop(setup(cfg), probe=probe, start=start)


def setup(cfg: CraftTrainPipelineConfig) -> Run:
    """Build the run from a validated config through lerobot's factories, resuming if asked.
    Every check that can fail on bad input runs here, before the first step."""
    check_dataset_exists(cfg)
    cache = open_anchor_cache(cfg.craft) if cfg.craft.enable else None
    accelerator = make_accelerator(cfg)
    check_distributed(accelerator, cfg)
    device = accelerator.device
    if cfg.seed is not None:
        set_seed(cfg.seed, accelerator=accelerator)

    dataset, eval_dataset = load_datasets(cfg)
    with quiet_policy_load():
        policy = build_policy(cfg, dataset, device)
    adapter = make_adapter(policy)
    if cache is not None:
        check_cache_fits(cache, adapter)
        check_constraint_can_act(policy, adapter, cache, distance=cfg.craft.distance, accelerator=accelerator)
    preprocessor, postprocessor = build_processors(cfg, policy, dataset, device)
    parallel = Parallelism(accelerator, cfg.craft.sharding)
    policy = parallel.prepare(policy, adapter.fsdp_units)  # rank 0's weights everywhere, then sharded (fsdp2)
    adapter = parallel.adapter(adapter)
    optimizer, scheduler = make_optimizer_and_scheduler(cfg, policy, device)  # lerobot's, with --craft.fused_adamw

    step, state = 0, CraftState(enabled=cfg.craft.enable)
    if cfg.resume:
        step, state = load_training_checkpoint(
            cfg.checkpoint_path, optimizer, scheduler, load_optimizer=not parallel.sharded,
            point_last=accelerator.is_main_process,
        )
        if parallel.sharded:
            load_optimizer_state(optimizer, cfg.checkpoint_path)
        keep_optimizer_kernel(optimizer, use_fused_adamw(cfg, device))
        if state.enabled != cfg.craft.enable:
            raise ValueError(
                f"the checkpoint {cfg.checkpoint_path} was trained with craft.enable={state.enabled}, "
                f"this run has --craft.enable={cfg.craft.enable}"
            )
    loader, sampler_state = make_dataloader(cfg, dataset, policy, device, step, accelerator.num_processes)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    if sampler_state is not None:  # accelerate re-sets the sampler's epoch from its own counter
        loader.set_epoch(sampler_state["epoch"])

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
        bucket_bytes=int(cfg.craft.bucket_mb * 2**20),
        two_pass=cfg.craft.two_pass_retention,
    )
    collate = lerobot_collate_fn if dataset.meta.has_language_columns else default_collate
    baselines = make_baselines(
        cfg, engine.bufs, dataset, rank=accelerator.process_index, collate=collate, is_main=accelerator.is_main_process
    )
    if baselines.changes_task_gradient:
        engine.before_surgery = baselines.adjust_task_gradient
    constraint = None
    if cache is not None:
        constraint = Constraint(
            cfg.craft, cache, total_steps=cfg.steps, seed=cfg.seed or 0, rank=accelerator.process_index, device=device,
            world=accelerator.num_processes,
        )
        if state.multiplier is not None:
            constraint.load_from(state)

    log = None
    if accelerator.is_main_process:
        wandb = None
        if cfg.wandb.enable and cfg.wandb.project:
            from lerobot.common.wandb_utils import WandBLogger

            wandb = WandBLogger(cfg)
        log = MetricsLog(cfg.output_dir, resume_step=step if cfg.resume else None, wandb_logger=wandb)
        mode = f"CRaFT, anchors {cache.directory} ({len(cache)} rows)" if cache is not None else "plain fine-tuning"
        logger.info("%s: steps %d..%d, output %s", mode, step + 1, cfg.steps, cfg.output_dir)

    return Run(
        cfg=cfg,
        accelerator=accelerator,
        dataset=dataset,
        policy=policy,
        adapter=adapter,
        preprocessor=preprocessor,
        postprocessor=postprocessor,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        eval_loader=held_out_loader(cfg, eval_dataset, device),
        baselines=baselines,
        engine=engine,
        parallel=parallel,
        constraint=constraint,
        state=state,
        start_step=step,
        log=log,
    )


def run_loop(run: Run, *, probe: Probe | None = None, start: float | None = None) -> TrainResult:
    """Step `run` from its start step to --steps; see `train`."""
    start = time.perf_counter() if start is None else start
    cfg, constraint, state = run.cfg, run.constraint, run.state
    step, window, checkpoint, saved_at = run.start_step, MetricsWindow(), None, None
    batches = cycle(run.loader)
    camera_keys = run.dataset.meta.camera_keys
    run.policy.train()
    bar = progress(  # a bar on a terminal, a line per log step in a log file
        cfg.steps, initial=step, desc="craft" if constraint else "plain", disable=not run.is_main,
        every=None if cfg.log_freq > 0 else max(1, cfg.steps // 20),
    )
    stop = StopOnSignal()
    devices = (run.accelerator.num_processes, run.accelerator.device)
    with stop, bar, constraint.anchors if constraint is not None else contextlib.nullcontext():
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            micro = cfg.craft.gradient_accumulation_steps  # one loader batch of micro * --batch_size frames
            parts = split_frames(next(batches), micro)
            parts = run.baselines.mix(parts, step)
            batch = [run.preprocessor(images_to_float(part, camera_keys)) for part in parts]
            anchors = _anchor_batches(constraint, step, micro)
            epsilon = constraint.epsilon(step) if constraint is not None else None
            output = run.engine.compute(batch, anchors, constraint.lam if constraint is not None else 0.0, epsilon=epsilon)
            host = output.read()
            applied = run.engine.finish(output, host)
            if applied and anchors is not None:
                constraint.update(host["loss_ret"], epsilon)
            if step == run.start_step and anchors is not None and run.is_main:  # the student starts at the teacher?
                warning = check_student_matches_teacher(host["loss_ret"], cfg.resume, run.engine.manifest, cfg.craft.distance)
                if warning is not None:
                    logger.warning(warning)
            step += 1  # from here on `step` counts completed steps, as in metrics and checkpoints
            bar.update(1)
            _count_skip(state, applied, step, host, cfg.craft.max_consecutive_skips)
            window.add(_step_values(host, applied, lr, time.perf_counter() - t0, constraint, epsilon))

            if cfg.log_freq > 0 and (step % cfg.log_freq == 0 or step == cfg.steps):  # the last step always
                if run.is_main:
                    record = {"step": step, **window.means(), **(probe(step, run.policy) if probe is not None else {})}
                    run.log.write(record)
                    bar.set_postfix(progress_postfix(record))
                window.reset()
            if run.eval_loader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and run.is_main:
                run.log.write({"step": step, "eval_loss": held_out_loss(run)})
            if cfg.env is not None and cfg.env_eval_freq > 0 and step % cfg.env_eval_freq == 0 and run.is_main:
                run.log.write({"step": step, **closed_loop_success(run)})
            if cfg.save_checkpoint and should_save_checkpoint(step, cfg.save_freq, cfg.steps):
                checkpoint, saved_at = save(run, step), step
            if step < cfg.steps and (stop_signal := agree_to_stop(stop.received, *devices)):
                stop.stopped_by = stop_signal
                if cfg.save_checkpoint and saved_at != step:
                    checkpoint = save(run, step)
                break

    return TrainResult(
        output_dir=Path(cfg.output_dir),
        checkpoint=checkpoint,
        first_step=run.start_step,
        steps=step,
        wall_time_s=time.perf_counter() - start,
        skipped_steps=state.skipped_steps,
        final_lambda=constraint.lam if constraint is not None else None,
        stopped_by=stop.stopped_by,
    )


def save(run: Run, step: int) -> Path | None:
    """Checkpoint `step` (the main process writes, every process waits); the one code path of the
    periodic, final and on-signal checkpoints. Returns its directory on the main process."""
    if run.constraint is not None:
        run.constraint.save_into(run.state)
    checkpoint = None
    gathered = run.parallel.checkpoint_state(run.policy, run.optimizer)  # every process takes part
    if run.is_main:
        checkpoint = save_training_checkpoint(
            Path(run.cfg.output_dir),
            step,
            run.cfg.steps,
            run.state,
            cfg=run.cfg,
            policy=run.accelerator.unwrap_model(run.policy),
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            preprocessor=run.preprocessor,
            postprocessor=run.postprocessor,
            num_processes=run.accelerator.num_processes,
            batch_size=frames_per_step(run.cfg),
            **gathered,
        )
    run.accelerator.wait_for_everyone()
    return checkpoint


def _finished_run(cfg: CraftTrainPipelineConfig, start: float) -> TrainResult | None:
    """The result of resuming a checkpoint already at --steps (nothing to train), else None.
    A checkpoint beyond --steps is an error: the run would train backwards."""
    state = CraftState.read(cfg.checkpoint_path)  # first: a foreign checkpoint gets its clear error
    step = load_training_step(cfg.checkpoint_path / TRAINING_STATE_DIR)
    if step < cfg.steps:
        return None
    if step > cfg.steps:
        raise ValueError(f"the checkpoint {cfg.checkpoint_path} is at step {step}, beyond --steps={cfg.steps}")
    final_lambda = state.multiplier["value"] if state.multiplier is not None else None
    return TrainResult(
        output_dir=Path(cfg.output_dir),
        checkpoint=cfg.checkpoint_path,
        first_step=step,
        steps=step,
        wall_time_s=time.perf_counter() - start,
        skipped_steps=state.skipped_steps,
        final_lambda=final_lambda,
    )


def held_out_loss(run: Run) -> float:
    """Mean task loss over the held-out episodes (--dataset.eval_split with --eval_steps)."""
    run.policy.eval()
    total, batches = torch.zeros((), device=run.accelerator.device), 0
    with torch.no_grad(), run.accelerator.autocast():
        for batch in run.eval_loader:
            total += run.adapter.task_loss(run.preprocessor(images_to_float(batch, run.dataset.meta.camera_keys))).float()
            batches += 1
    run.policy.train()
    return total.item() / max(batches, 1)


def closed_loop_success(run: Run) -> dict[str, float]:
    """Success rate per task in the simulator (--env.*, every --env_eval_freq steps) over --eval.n_episodes
    seeded episodes: the same layouts at every evaluation, apart from the recorded demonstrations'
    (craft_ext.sim.rollout). The random state is forked around it: training draws what it would have
    drawn without the evaluation."""
    from ..sim.rollout import evaluate

    cfg = run.cfg
    episodes = cfg.eval.n_episodes
    devices = [run.accelerator.device] if run.accelerator.device.type == "cuda" else []
    run.policy.eval()
    with torch.random.fork_rng(devices=devices), run.accelerator.autocast():
        results = evaluate(run.policy, run.preprocessor, run.postprocessor, cfg.env, episodes=episodes,
                           batch_size=min(episodes, cfg.eval.batch_size or 1), rename_map=cfg.rename_map)
    run.policy.train()
    return {f"success/{task}": result.rate for task, result in results.items()}


def _step_values(host: dict[str, float], applied: bool, lr: float, seconds: float, constraint, epsilon) -> dict[str, float]:
    """One step's metrics: a skipped step contributes only its skip (its losses are NaN)."""
    values = {k: v for k, v in host.items() if k != "found_inf"} if applied else {}
    for flag in ("conflict", "projected"):  # 0/1 per step: their window means are rates
        if flag in values:
            values[f"{flag}_rate"] = values.pop(flag)
    values.update(skip_rate=float(not applied), lr=lr, step_s=seconds)
    if constraint is not None:
        values.update({"lambda": constraint.lam, "epsilon": epsilon})
    return values


def _anchor_batches(constraint: Constraint | None, step: int, count: int):
    """The step's anchor batches, one per micro-batch, on retention steps; else None."""
    first = constraint.anchor_batch(step) if constraint is not None else None
    return None if first is None else [first] + [constraint.anchor_batch(step) for _ in range(count - 1)]


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
