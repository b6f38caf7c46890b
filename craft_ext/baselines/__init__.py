"""The methods CRaFT is compared with, run through the same trainer, data order and step budget.

    replay         old frames mixed into every task micro-batch (--replay.*)
    l2sp           a pull toward the starting weights, added to the task gradient (--l2sp.*)
    peft           LoRA and lerobot's other adapters (--peft.*), applied where lerobot-train applies them
    fixed_penalty  L_task + lambda * L_ret with lambda fixed (--craft.controller=fixed)

Each is alone or combined with CRaFT. The loop reaches replay and L2-SP through `Baselines`, at the
two points where a baseline changes a step: the task frames before the preprocessor (`mix`) and the
task gradient once it is reduced, before the surgery (`adjust_task_gradient`). peft wraps the policy
when it is built (trainer.factory), and the fixed penalty stands in for the multiplier
(trainer.constraint).

A new baseline: a module here, its options as a config section (craft_ext.config, listed in
`HELP_SECTIONS` there for `--help`), and its hook in `Baselines` (or, if it changes what is built, in
the factory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.grad_buffers import GradBuffers
from ..train_config import CraftTrainPipelineConfig
from .l2sp import L2SP
from .replay import Replay, make_replay


@dataclass
class Baselines:
    """The run's replay and L2-SP, each None when off."""

    replay: Replay | None = None
    l2sp: L2SP | None = None

    def mix(self, parts: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """The task micro-batches of 0-based `step`, with replay frames when replay is on."""
        return self.replay.mix(parts, step) if self.replay is not None else parts

    def adjust_task_gradient(self) -> None:
        """Add the baselines' terms to the reduced task gradient T (L2-SP's pull), before the surgery."""
        if self.l2sp is not None:
            self.l2sp.pull_()

    @property
    def changes_task_gradient(self) -> bool:
        return self.l2sp is not None


def make_baselines(
    cfg: CraftTrainPipelineConfig, bufs: GradBuffers, dataset, *, rank: int, collate, is_main: bool
) -> Baselines:
    """The run's baselines from its config (replay datasets are checked against the task dataset)."""
    l2sp = None
    if cfg.l2sp.strength > 0:
        l2sp = L2SP.for_run(bufs, cfg.l2sp.strength, Path(cfg.output_dir), resume=cfg.resume, is_main=is_main)
    return Baselines(replay=make_replay(cfg, dataset, rank, collate), l2sp=l2sp)


__all__ = ["Baselines", "make_baselines"]
