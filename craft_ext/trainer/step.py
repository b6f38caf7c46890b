"""One optimisation step of the CRaFT engine (docs/architecture.md, "The step").

Gradients live in `GradBuffers`: the task backward fills T, the retention backward (on retention
steps) fills R, `surgery_` writes G = alpha T + beta R into T with clipping folded in, and the
optimiser steps on T's views. The step is told whether it has a retention gradient (an anchor batch):
steps without one pass `retain=None`, so G = T exactly, clipped in one pass over T, and R is neither
read nor written. With `--craft.enable=false` there is no R at all (no second gradient's worth of
memory): the baseline runs the same code otherwise.

Host synchronisation: exactly one per step, `StepOutput.read()`, after the merge and before the
optimiser. It is needed there: a non-finite step must be skipped before the optimiser applies it,
and the dual update (host side) needs L_ret. The same read carries every metric of the step, so
logging adds none. Multi-process runs average the step's losses over ranks on the device, in the
same all-reduce call as the gradients and before the surgery (the `active` projection compares the
global L_ret with epsilon): the read then carries the means, and every rank makes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..anchors.manifest import Manifest
from ..anchors.reader import AnchorBatch
from ..distributed import all_reduce_mean_
from ..policies.base import PolicyAdapter
from ..retention import retention_loss
from ..surgery import GradBuffers, surgery_

#: surgery metrics that exist only on retention steps
_RETENTION_METRICS = ("cos", "conflict", "projected", "retain_norm")


@dataclass
class StepOutput:
    """Device tensors of one step, before the optimiser decides whether to apply it (losses: the
    means over ranks in multi-process runs)."""

    loss_task: torch.Tensor
    loss_ret: torch.Tensor | None
    surgery: dict[str, torch.Tensor]

    def read(self) -> dict[str, float]:
        """All of the step's scalars on the host, in one transfer (the step's single sync)."""
        names = ["loss_task", "found_inf", "task_norm", "grad_norm"]
        values = [self.loss_task] + [self.surgery[k] for k in names[1:]]
        if self.loss_ret is not None:
            names += ["loss_ret", *_RETENTION_METRICS]
            values += [self.loss_ret] + [self.surgery[k] for k in _RETENTION_METRICS]
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
        project: str,
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

    def compute(self, batch: dict, anchors: AnchorBatch | None, lam: float, *, epsilon: float | None) -> StepOutput:
        """Backward passes and the merge: G is in T when this returns (nothing applied yet).

        `anchors` is None on steps without retention. `epsilon` is this step's tolerance epsilon_t (the
        `active` projection compares L_ret with it on the device); None in plain runs.
        """
        self.bufs.task.zero_()
        with self.accelerator.autocast():
            loss_task = self.adapter.task_loss(batch)
        self.accelerator.backward(loss_task)
        loss_task = loss_task.detach().float()

        loss_ret = None
        if anchors is not None:
            if epsilon is None:
                raise ValueError("CraftStep.compute: a retention step needs epsilon (the step's tolerance)")
            self.bufs.retain.zero_()
            self.bufs.use("retain")
            with self.accelerator.autocast():
                loss_ret = retention_loss(self.adapter, anchors, self.manifest, distance=self.distance)
            self.accelerator.backward(loss_ret)
            self.bufs.use("task")
            loss_ret = loss_ret.detach().float()
        retain = self.bufs.retain if loss_ret is not None else None
        if self.distributed:  # every rank then holds the same T, R and losses, hence the same G
            losses = torch.stack([loss_task] + ([loss_ret] if loss_ret is not None else []))
            all_reduce_mean_(self.bufs.task, *([retain] if retain is not None else []), losses)
            loss_task, loss_ret = losses[0], (losses[1] if loss_ret is not None else None)
        out = surgery_(self.bufs.task, retain, lam, loss_ret=loss_ret, epsilon=epsilon, **self.surgery_options)
        return StepOutput(loss_task, loss_ret, out)

    def finish(self, output: StepOutput, host: dict[str, float]) -> bool:
        """Apply G unless the step is non-finite. Returns True if the step was applied."""
        applied = host["found_inf"] == 0 and math.isfinite(host["loss_task"]) and math.isfinite(host.get("loss_ret", 0.0))
        if applied:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()  # the schedule follows the step count, applied or not
        return applied
