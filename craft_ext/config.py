"""Configuration of `python -m craft_ext.train`: lerobot's TrainPipelineConfig plus a `craft` section.

Every lerobot-train flag keeps working (`--policy.path`, `--dataset.repo_id`, `--steps`, `--resume`,
`--wandb.enable`, ...); CRaFT adds `--craft.*`. `--craft.enable=false` trains through the same loop
with no retention gradient (no R buffer is allocated; the merged gradient is exactly the task gradient,
clipped): the plain fine-tuning baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lerobot.configs.train import TrainPipelineConfig

from .dual import CONTROLLERS, SCHEDULES
from .policies import SUPPORTED_POLICY_TYPES
from .retention import DISTANCES
from .surgery import MODES, PROJECT_MODES

__all__ = ["CraftConfig", "CraftTrainPipelineConfig"]


@dataclass
class CraftConfig:
    """The `--craft.*` options (DESIGN.md §2)."""

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
    # Distance between student and cached teacher hidden states: normalized_mse (MSE / the teacher's
    # per-layer variance, so epsilon=0.05 means 5 percent of that variance), mse, or cosine.
    distance: str = "normalized_mse"
    # Dual controller of lambda: ascent (projected dual ascent) or pi (nuPI, damps oscillation).
    controller: str = "ascent"
    lambda_init: float = 1.0
    lambda_lr: float = 0.01
    lambda_max: float = 10.0
    # nuPI gains and filter (controller=pi only).
    pi_kp: float = 0.0
    pi_ki: float = 1.0
    pi_ema: float = 0.0
    # Retention tolerance epsilon_t, annealed from start to end (constant | linear | cosine | exponential)
    # over epsilon_decay_steps (0 = the whole run).
    epsilon_start: float = 0.05
    epsilon_end: float = 0.05
    epsilon_schedule: str = "constant"
    epsilon_decay_steps: int = 0
    # When the step drops its component that raises L_ret (docs/architecture.md, "The step"):
    # active = only while the constraint is violated (L_ret > epsilon_t) and the merged step would still
    # raise L_ret; this solves "min L_task s.t. L_ret <= epsilon". always = PCGrad on the task gradient
    # whenever cos(T, R) < tau, also with slack: protects more than asked and ends at a worse task loss
    # (lambda -> 0 at a feasible point short of the optimum). never = the plain Lagrangian step.
    project: str = "active"
    # Cosine threshold of project=always (and of the conflict_rate metric); the other rules need 0.
    tau: float = 0.0
    # Merge G = a T' + b R: weighted (1, lambda), equal (1/2, 1/2), task_priority (1, min(lambda, 1)).
    merge: str = "weighted"
    # Steps with NaN/Inf loss or gradients are skipped; this many in a row abort the run.
    max_consecutive_skips: int = 10

    def validate(self) -> None:
        """Raise ValueError naming the first bad `--craft.*` value (before anything is built)."""
        _choice("distance", self.distance, DISTANCES)
        _choice("controller", self.controller, CONTROLLERS)
        _choice("epsilon_schedule", self.epsilon_schedule, SCHEDULES)
        _choice("merge", self.merge, MODES)
        for name in ("anchor_batch_size", "anchor_prefetch", "retention_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"--craft.{name}={getattr(self, name)}: expected an integer >= 1")
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
        _choice("project", self.project, PROJECT_MODES)
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
class CraftTrainPipelineConfig(TrainPipelineConfig):
    """lerobot's training config with the CRaFT section; saved as train_config.json in checkpoints."""

    craft: CraftConfig = field(default_factory=CraftConfig)

    def validate(self) -> None:
        self.craft.validate()
        super().validate()
        if self.policy is not None and self.policy.type not in SUPPORTED_POLICY_TYPES:
            raise ValueError(
                f"--policy.type={self.policy.type}: craft_ext.train supports {', '.join(SUPPORTED_POLICY_TYPES)}"
            )


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--craft.{name}={value!r}: expected one of {tuple(allowed)}")
