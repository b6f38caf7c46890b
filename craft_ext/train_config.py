"""The config of `python -m craft_ext.train`: lerobot's TrainPipelineConfig plus the `craft` section.

Saved as train_config.json in every checkpoint (`--resume=true --config_path=...` reads it back).
lerobot-train's flags keep their meaning (`--policy.path`, `--dataset.repo_id`, `--steps`, `--resume`,
`--wandb.enable`, ...; `craft_ext.trainer.checks.check_supported` refuses those this trainer does not
implement); CRaFT adds `--craft.*` (craft_ext.config). Two defaults differ from lerobot-train, both
for the first minutes on a small machine: `--num_workers` follows the machine's cores, and
`--policy.push_to_hub` is off (this trainer never pushes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lerobot.configs import parser
from lerobot.configs.train import TrainPipelineConfig

from .config import CraftConfig, L2SPConfig, ReplayConfig
from .policies import SUPPORTED_POLICY_TYPES
from .policies.loading import policy_source_problem

__all__ = ["CraftTrainPipelineConfig", "default_num_workers"]


@dataclass
class CraftTrainPipelineConfig(TrainPipelineConfig):
    """lerobot's training config with the CRaFT section; saved as train_config.json in checkpoints."""

    # DataLoader worker processes. null (default) = chosen from the cores this process may use:
    # min(4, cores - 1), and 0 (load in the training process) on 2 cores or fewer, where spawning
    # workers only delays the first step.
    num_workers: int | None = None
    craft: CraftConfig = field(default_factory=CraftConfig)
    # baselines, alone or with CRaFT (craft_ext.config)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    l2sp: L2SPConfig = field(default_factory=L2SPConfig)

    def validate(self) -> None:
        self.craft.validate()
        self.replay.validate(self.batch_size)
        self.l2sp.validate()
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps}: expected an integer >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num_workers={self.num_workers}: expected >= 0 (or leave it unset: chosen from the cores)")
        # lerobot's "output_dir exists" check looks before anything is created: two runs started together
        # both pass it. The trainer checks it atomically instead, when it takes the directory's lock
        # (craft_ext.trainer.output_dir.hold_output_dir); lerobot skips the check for a non-Path value.
        output_dir = self.output_dir
        if isinstance(output_dir, Path):
            self.output_dir = str(output_dir)
        try:
            super().validate()
        finally:
            if isinstance(self.output_dir, str):
                self.output_dir = Path(self.output_dir)
        # saved absolute in train_config.json: the printed resume command (an absolute --config_path) then
        # resumes into this directory from any working directory, not into a namesake under the new one
        self.output_dir = self.output_dir.absolute()
        if self.policy is not None and self.policy.type not in SUPPORTED_POLICY_TYPES:
            raise ValueError(
                f"--policy.type={self.policy.type}: craft_ext.train supports {', '.join(SUPPORTED_POLICY_TYPES)}"
            )

    @property
    def loader_workers(self) -> int:
        """--num_workers, or the machine's choice when unset."""
        return self.num_workers if self.num_workers is not None else default_num_workers()

    def _resolve_pretrained_from_cli(self) -> None:
        """lerobot's (loads --policy.path), then: lerobot's policy configs default to push_to_hub=true,
        which makes lerobot demand a --policy.repo_id. This trainer never pushes, so for a policy given
        on the command line that default is switched off; an explicit --policy.push_to_hub=true stays,
        and `check_supported` refuses it."""
        policy_path = parser.get_path_arg("policy")
        problem = policy_source_problem(policy_path) if policy_path else None  # a local folder's problems
        if problem is not None:
            raise FileNotFoundError(problem)
        try:
            super()._resolve_pretrained_from_cli()
        except Exception as exc:  # a hub id that could not be fetched: say which, and why, in words
            problem = policy_source_problem(policy_path, exc) if policy_path else None
            if problem is None:
                raise
            raise FileNotFoundError(problem) from exc
        from_command_line = parser.get_path_arg("policy") or parser.get_type_arg("policy")
        if self.policy is not None and from_command_line and parser.parse_arg("policy.push_to_hub") is None:
            self.policy.push_to_hub = False


def default_num_workers() -> int:
    """DataLoader workers for this machine: min(4, cores - 1), 0 on 2 cores or fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores - 1)
