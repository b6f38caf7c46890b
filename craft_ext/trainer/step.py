"""One optimisation step of the CRaFT engine (DESIGN.md §2), plain fine-tuning being the case R = 0.

Gradients live in `GradBuffers`: the task backward fills T, the retention backward (on retention
steps) fills R, `surgery_` writes G = alpha T + beta R into T with clipping folded in, and the
optimiser steps on T's views. R is zero outside retention steps, which makes G = T exactly there; with
`--craft.enable=false` there is no R at all (no second gradient's worth of memory) and `surgery_` only
clips T: the baseline runs the same code otherwise.

Host synchronisation: exactly one per step, `StepOutput.read()`, after the merge and before the
optimiser. It is needed there: a non-finite step must be skipped before the optimiser applies it,
and the dual update (DESIGN.md §2 step 8, host side) needs L_ret. The same read carries every
metric of the step, so logging adds none. Multi-process runs add the all-reduce of L_ret on
retention steps (`mean_across_ranks`), so that every rank computes the same lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..anchors.manifest import Manifest
from ..anchors.reader import AnchorBatch
from ..distributed import all_reduce_mean_, mean_across_ranks
from ..policies.base import PolicyAdapter
from ..retention import retention_loss
from ..surgery import GradBuffers, surgery_

#: surgery metrics that exist only on retention steps (on the others R = 0)
_RETENTION_METRICS = ("cos", "conflict", "retain_norm")


@dataclass
class StepOutput:
    """Device tensors of one step, before the optimiser decides whether to apply it."""

    loss_task: torch.Tensor
    loss_ret: torch.Tensor | None
    surgery: dict[str, torch.Tensor]

    def read(self) -> dict[str, float]:
        """All of the step's scalars on the host, in one transfer (the step's single sync)."""
        names = ["loss_task", "found_inf", "task_norm", "grad_norm"]
        values = [self.loss_task.detach().float()] + [self.surgery[k] for k in names[1:]]
        if self.loss_ret is not None:
            names += ["loss_ret", *_RETENTION_METRICS]
            values += [self.loss_ret.detach().float()] + [self.surgery[k] for k in _RETENTION_METRICS]
        return dict(zip(names, torch.stack(values).tolist(), strict=True))


class CraftStep:
    """Computes T (and R), merges them and applies G; one instance per run.

    `policy` must already be on its training device: the gradient buffers are allocated next to it.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        adapter: PolicyAdapter,
        optimizer,
        scheduler,
        accelerator,
        *,
        manifest: Manifest | None,
        distance: str,
        project: bool,
        tau: float,
        merge: str,
        max_norm: float | None,
    ) -> None:
        if accelerator.scaler is not None:
            raise ValueError("fp16 mixed precision (a GradScaler) is not supported by the CRaFT step: use bf16")
        self.bufs = GradBuffers(policy, retention=manifest is not None)  # plain runs hold no R
        self.adapter, self.optimizer, self.scheduler, self.accelerator = adapter, optimizer, scheduler, accelerator
        self.manifest, self.distance = manifest, distance
        self.surgery_options = {"project": project, "tau": tau, "mode": merge, "max_norm": max_norm}
        self.distributed = accelerator.num_processes > 1

    def compute(self, batch: dict, anchors: AnchorBatch | None, lam: float) -> StepOutput:
        """Backward passes and the merge: G is in T when this returns (nothing applied yet)."""
        self.bufs.task.zero_()
        with self.accelerator.autocast():
            loss_task = self.adapter.task_loss(batch)
        self.accelerator.backward(loss_task)

        loss_ret = None
        if anchors is not None:
            self.bufs.use("retain")
            with self.accelerator.autocast():
                loss_ret = retention_loss(self.adapter, anchors, self.manifest, distance=self.distance)
            self.accelerator.backward(loss_ret)
            self.bufs.use("task")
        if self.distributed:  # every rank then holds the same T and R, hence the same G
            all_reduce_mean_(self.bufs.task, *([self.bufs.retain] if anchors is not None else []))
        out = surgery_(self.bufs.task, self.bufs.retain, lam, **self.surgery_options)
        return StepOutput(loss_task, loss_ret, out)

    def finish(self, output: StepOutput, host: dict[str, float]) -> bool:
        """Apply G unless the step is non-finite; reset R. Returns True if the step was applied.

        In multi-process runs `host["loss_ret"]` is replaced by the mean over ranks, so every rank
        runs the same dual update.
        """
        applied = host["found_inf"] == 0 and math.isfinite(host["loss_task"]) and math.isfinite(host.get("loss_ret", 0.0))
        if applied:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()  # the schedule follows the step count, applied or not
        if output.loss_ret is not None:
            self.bufs.retain.zero_()
            if self.distributed:
                host["loss_ret"] = mean_across_ranks(output.loss_ret)
        return applied

