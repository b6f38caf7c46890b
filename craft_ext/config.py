"""The `--craft.*` options of `python -m craft_ext.train` (CraftConfig).

The full training config, lerobot's TrainPipelineConfig plus this section, is
`craft_ext.train_config.CraftTrainPipelineConfig`. This module imports no lerobot: `--help` renders
these options without loading lerobot (which takes seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CraftConfig", "HELP_SECTIONS", "L2SPConfig", "ReplayConfig"]

#: --craft.sharding
SHARDING_MODES = ("none", "fsdp2")


@dataclass
class CraftConfig:
    """The `--craft.*` options (docs/architecture.md, "The step")."""

    # Train under the retention constraint. false = plain fine-tuning through the same loop.
    enable: bool = True
    # Anchor cache directory written by `python -m craft_ext.build_anchor_cache` (required if enabled).
    anchor_cache: Path | None = None
    # Anchor rows per retention forward/backward (per process).
    anchor_batch_size: int = 8
    # Anchor batches the background reader gathers ahead of the step.
    anchor_prefetch: int = 2
    # Seed of the anchor sampler's per-epoch permutation; null = the run's --seed.
    anchor_seed: int | None = None
    # Check every shard's sha256 before training (reads the whole cache once).
    verify_cache: bool = False
    # Compute the retention gradient every K-th step; the other steps are plain task steps.
    retention_every: int = 1
    # Micro-batches per optimisation step: N forward/backward passes of --batch_size frames (and, on
    # retention steps, of --craft.anchor_batch_size anchors), accumulated into the same gradient
    # buffers, then one surgery and one optimizer step: the step of --batch_size * N frames with the
    # activation memory of --batch_size. The anchor reader prefetches at least N batches.
    gradient_accumulation_steps: int = 1
    # Distance between student and cached teacher hidden states: normalized_mse (MSE / the teacher's
    # per-layer variance, so epsilon=0.05 means 5 percent of that variance), mse, or cosine.
    distance: str = "normalized_mse"
    # Weights of the retention loss's terms, e.g. prefix=1,velocity=2: L_ret = sum w_k L_k / sum w_k over
    # the terms the cache anchors (prefix; velocity, expert: pi0 / pi0.5; action_tokens: pi0-fast).
    # null = the weights recorded in the cache (build_anchor_cache --term_weights).
    term_weights: str | None = None
    # Dual controller of lambda: ascent (projected dual ascent), pi (nuPI, damps oscillation), or fixed
    # (lambda stays --craft.lambda_init: the fixed-weight penalty baseline; with --craft.project=never it
    # is plain L_task + lambda * L_ret).
    controller: str = "ascent"
    # Initial Lagrange multiplier lambda (the weight of the retention gradient).
    lambda_init: float = 1.0
    # Dual step size: lambda += lambda_lr * (L_ret - epsilon_t) per retention step. Scale it with
    # 1 / (typical L_ret): on the demo's kit (normalised L_ret ~0.05) 0.2 works best; a much faster
    # step drives lambda up in bursts that slow the new task without protecting the old one better.
    lambda_lr: float = 0.01
    # Upper bound of lambda (the projection of dual ascent).
    lambda_max: float = 10.0
    # nuPI proportional gain (controller=pi only).
    pi_kp: float = 0.0
    # nuPI integral gain (controller=pi only).
    pi_ki: float = 1.0
    # nuPI filter of the constraint violation, in [0, 1) (controller=pi only).
    pi_ema: float = 0.0
    # Retention tolerance epsilon_t at the first step, in units of the distance.
    epsilon_start: float = 0.05
    # Retention tolerance at the end of the decay (equal to epsilon_start: constant).
    epsilon_end: float = 0.05
    # How epsilon_t goes from start to end: constant | linear | cosine | exponential.
    epsilon_schedule: str = "constant"
    # Steps over which epsilon_t goes from start to end (0 = the whole run).
    epsilon_decay_steps: int = 0
    # When the step drops its component that raises L_ret (docs/architecture.md, "The step"):
    # active = only while the constraint is violated (L_ret > epsilon_t) and the merged step would still
    # raise L_ret; this solves "min L_task s.t. L_ret <= epsilon". always = PCGrad on the task gradient
    # whenever cos(T, R) < tau, also with slack: protects more than asked and ends at a worse task loss
    # (lambda -> 0 at a feasible point short of the optimum). never = the plain Lagrangian step.
    project: str = "active"
    # Cosine threshold of project=always (and of the conflict_rate metric); the other rules need 0.
    tau: float = 0.0
    # Merge G = T' + b R: weighted b = lambda, equal b = 1, task_priority b = min(lambda, 1).
    merge: str = "weighted"
    # Steps with NaN/Inf loss or gradients are skipped; this many in a row abort the run.
    max_consecutive_skips: int = 10
    # Several processes (torchrun --nproc_per_node=N; --batch_size and --craft.anchor_batch_size are
    # per process): none = each process holds the whole policy and the gradients are summed while
    # the backward runs (data parallel); fsdp2 = the policy, T, R and the optimizer state are divided
    # over the processes (FSDP2), for a model that does not fit one GPU with both gradients.
    sharding: str = "none"
    # MB of gradient per bucket: T and R are allocated bucket by bucket as their backward reaches them
    # (and freed after the optimizer step and after the surgery), and with several processes (data
    # parallel) each bucket's all-reduce starts as soon as its gradients are ready.
    bucket_mb: float = 25.0
    # torch's fused AdamW / Adam kernel for lerobot's adamw / adam optimizer (lerobot's own config has no
    # such option): the same update to rounding, one kernel per step instead of the for-each path's
    # chain, and no parameter-sized temporary (the for-each path allocates one at the step's end).
    # null = on for CUDA, off elsewhere (on the CPU torch's default is a per-parameter loop).
    fused_adamw: bool | None = None
    # Compute the retention gradient R twice per retention step (once for the surgery's statistics, once
    # to merge it into the task gradient, each parameter's share as the backward makes it) so that R is
    # never stored: about one gradient buffer less where the surgery is the step's peak (gradient
    # checkpointing with a fused AdamW), for a second anchor backward. One process,
    # --craft.gradient_accumulation_steps=1.
    two_pass_retention: bool = False
    # Seconds a process waits for the others in a collective before the run stops with an error (a
    # process died or hangs); longer than the slowest checkpoint write.
    dist_timeout_s: float = 600.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad `--craft.*` value (before anything is built)."""
        # imported here: they load the anchor-cache and policy modules, which `--help` does not need
        from .engine.dual import CONTROLLERS, SCHEDULES
        from .engine.retention import DISTANCES
        from .engine.surgery import MERGES, PROJECT_MODES

        _choice("distance", self.distance, DISTANCES)
        if self.term_weights is not None:
            from .anchors.manifest import parse_term_weights

            parse_term_weights(self.term_weights, "--craft.term_weights")
        _choice("controller", self.controller, (*CONTROLLERS, "fixed"))  # fixed: craft_ext.baselines.fixed_penalty
        _choice("epsilon_schedule", self.epsilon_schedule, SCHEDULES)
        _choice("merge", self.merge, MERGES)
        counts = (
            "anchor_batch_size", "anchor_prefetch", "retention_every", "gradient_accumulation_steps", "max_consecutive_skips",
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"--craft.{name}={getattr(self, name)}: expected an integer >= 1")
        if self.two_pass_retention and self.gradient_accumulation_steps > 1:
            raise ValueError(
                "--craft.two_pass_retention=true needs --craft.gradient_accumulation_steps=1 (its R is merged while "
                "the anchor backward runs, so it cannot accumulate over micro-batches)"
            )
        if self.epsilon_decay_steps < 0:
            raise ValueError(f"--craft.epsilon_decay_steps={self.epsilon_decay_steps}: expected >= 0")
        for name in ("lambda_init", "lambda_lr", "lambda_max", "pi_kp", "pi_ki", "epsilon_start", "epsilon_end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--craft.{name}={value}: expected a finite number >= 0")
        if self.lambda_init > self.lambda_max:
            raise ValueError(f"--craft.lambda_init={self.lambda_init} exceeds --craft.lambda_max={self.lambda_max}")
        if not 0 <= self.pi_ema < 1:
            raise ValueError(f"--craft.pi_ema={self.pi_ema}: expected a number in [0, 1)")
        # train_config.json of runs saved before --craft.project took a mode holds a bool (true: project T
        # whenever it conflicts with R), which draccus reads as "True" / "False": resuming them must parse
        self.project = {"True": "always", "False": "never"}.get(self.project, self.project)
        _choice("project", self.project, PROJECT_MODES)
        _choice("sharding", self.sharding, SHARDING_MODES)
        for name in ("bucket_mb", "dist_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--craft.{name}={getattr(self, name)}: expected a number > 0")
        if not -1 <= self.tau <= 1:
            raise ValueError(f"--craft.tau={self.tau}: a cosine threshold must be in [-1, 1]")
        if self.tau != 0 and self.project != "always":
            raise ValueError(f"--craft.tau={self.tau} applies only to --craft.project=always (here {self.project})")
        if self.enable and self.anchor_cache is None:
            raise ValueError(
                "--craft.enable=true needs --craft.anchor_cache=DIR (build one with python -m "
                "craft_ext.build_anchor_cache), or pass --craft.enable=false for plain fine-tuning"
            )


@dataclass
class ReplayConfig:
    """The `--replay.*` options: frames of old LeRobot datasets mixed into every task batch (the replay
    baseline, or replay together with CRaFT). Replay frames go through the run's preprocessor, so they
    are normalised with the fine-tuning dataset's statistics, as in any lerobot multi-dataset run."""

    # Share of every micro-batch of --batch_size frames given to replay frames: round(fraction *
    # batch_size) of them (halves round up), the rest are task frames, so a step costs what a plain step
    # does and sees fewer task frames. 0 = no replay.
    fraction: float = 0.0
    # Old LeRobot dataset(s) to replay from: one repo_id, or a list (--replay.repo_id='[a,b]'); frames are
    # drawn uniformly from all of them together.
    repo_id: list[str] | str | None = None
    # Their local copies: one directory, or a list in the order of --replay.repo_id (default: lerobot's cache).
    root: list[str] | str | None = None
    # Replay exactly the frames an anchor cache was built from (its manifest names the dataset and the
    # frame indices): replay of the old frames CRaFT anchors on. Replaces --replay.repo_id/root.
    frames_from_cache: Path | None = None
    # Seed of the replay sampler's per-epoch permutation (plus the process rank); null = the run's --seed.
    seed: int | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def frames_per_batch(self, batch_size: int) -> int:
        """Replay frames in each micro-batch of `batch_size` frames: round(fraction * batch_size), halves up."""
        return math.floor(self.fraction * batch_size + 0.5) if self.enabled else 0

    def repo_ids(self) -> list[str]:
        return [] if self.repo_id is None else [self.repo_id] if isinstance(self.repo_id, str) else list(self.repo_id)

    def roots(self) -> list[str | None]:
        """One root per --replay.repo_id (None: lerobot's cache)."""
        if self.root is None:
            return [None] * len(self.repo_ids())
        return [self.root] if isinstance(self.root, str) else list(self.root)

    def validate(self, batch_size: int) -> None:
        """Raise ValueError naming the first bad `--replay.*` value."""
        if not (math.isfinite(self.fraction) and 0 <= self.fraction < 1):
            raise ValueError(f"--replay.fraction={self.fraction}: expected a number in [0, 1)")
        sources = self.repo_id is not None or self.root is not None or self.frames_from_cache is not None
        if not self.enabled:
            if sources:
                raise ValueError(
                    "--replay.repo_id/root/frames_from_cache given, but --replay.fraction=0: set the fraction to replay"
                )
            return
        if self.frames_from_cache is not None and (self.repo_id is not None or self.root is not None):
            raise ValueError("--replay.frames_from_cache names the dataset itself: drop --replay.repo_id/root")
        if self.frames_from_cache is None and not self.repo_ids():
            raise ValueError(f"--replay.fraction={self.fraction} needs --replay.repo_id (or --replay.frames_from_cache=DIR)")
        if len(self.roots()) != len(self.repo_ids()):
            raise ValueError(
                f"--replay.root names {len(self.roots())} director(ies) for {len(self.repo_ids())} --replay.repo_id: "
                "give one root per dataset, in the same order"
            )
        count = self.frames_per_batch(batch_size)
        if count < 1:
            raise ValueError(
                f"--replay.fraction={self.fraction} of --batch_size={batch_size} rounds to 0 replay frames: "
                f"use a fraction >= {0.5 / batch_size:g} or a larger batch"
            )
        if count >= batch_size:
            raise ValueError(
                f"--replay.fraction={self.fraction} of --batch_size={batch_size} rounds to {count} replay frames, "
                "leaving no task frames: lower the fraction"
            )


@dataclass
class L2SPConfig:
    """The `--l2sp.*` options: L2-SP, a penalty pulling the trainable weights toward the run's start."""

    # Strength S: the step adds S * (theta - theta_0) to the task gradient, the gradient of
    # S/2 * |theta - theta_0|^2, where theta_0 are the trainable weights when the run started. theta_0 is
    # one extra copy of the trainable weights in memory, and is saved once as
    # OUTPUT/l2sp_start.safetensors so a resumed run pulls toward the same point. 0 = off.
    strength: float = 0.0

    def validate(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"--l2sp.strength={self.strength}: expected a finite number >= 0")


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--craft.{name}={value!r}: expected one of {tuple(allowed)}")


#: the option sections `python -m craft_ext.train --help` shows beyond lerobot's: (flag prefix, config
#: class, title). A new baseline with options adds its section here.
HELP_SECTIONS = (
    ("craft", CraftConfig, 'CRaFT options (docs/architecture.md, "The step")'),
    ("replay", ReplayConfig, "Replay of old datasets (a baseline, or with CRaFT)"),
    ("l2sp", L2SPConfig, "L2-SP (a baseline: a pull toward the starting weights)"),
)
