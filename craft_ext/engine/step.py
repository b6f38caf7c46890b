"""One optimisation step of the CRaFT engine (docs/architecture.md, "The step").

Gradients live in `GradBuffers`: the task backward fills T, the retention backward (on retention
steps) fills R, `surgery_` writes G = alpha T + beta R into T with clipping folded in, and the
optimiser steps on T's views. The step is told whether it has a retention gradient (an anchor batch):
steps without one pass `retain=None`, so G = T exactly, clipped in one pass over T, and R is neither
read nor written. With `--craft.enable=false` there is no R at all: the baseline runs the same code
otherwise.

Memory: T and R are lazy storages cut like the gradient buckets (`bucket_bytes`). T's pieces appear
as the task backward reaches them and are freed after the optimiser step; R's appear as the anchor
backward reaches them and are freed as soon as the surgery has merged R into T, so R exists only on
retention steps, from the anchor backward to the merge (docs/architecture.md, "Memory"). FSDP2 shards
are allocated whole when their backward starts. With ``two_pass`` R is never stored: the anchor
backward runs twice, once for the surgery's stats and once to merge R into T, each parameter's
gradient consumed as it is made (craft_ext.engine.two_pass).

Gradient accumulation (N > 1 micro-batches per step): the step's frames come as N micro-batches and
its anchors as N anchor batches; each gets its own forward and backward, accumulating in place into T
(then R), so the activations are one micro-batch's while T, R, the surgery and the optimiser step are
one per step. Each micro-batch's loss is weighted by its share of the step's loss terms (the
adapter's `task_loss_weight`: pi0-fast's target tokens; anchor rows for L_ret), so T, R and the
reported losses are those of the whole batch: N micro-batches of B frames give the step of one batch
of N*B up to rounding. `split_frames` cuts one loader batch of N*B frames into the micro-batches, so
the frames of a step do not depend on N.

Host synchronisation: exactly one per step, `StepOutput.read()`, after the merge and before the
optimiser. It is needed there: a non-finite step must be skipped before the optimiser applies it,
and the dual update (host side) needs L_ret. The same read carries every metric of the step, so
logging adds none. Multi-process runs weight every micro-batch by its share of the loss terms of the
step's global batch (`craft_ext.engine.distributed.loss_shares`), sum T and R over ranks while their last
backward runs (`BucketReducer`; with FSDP2 shards, FSDP's reduce-scatter), and take the surgery's
decision from one small all-reduce of the losses, with the stats of the shards
(`distributed_surgery_`): the read carries the global losses, and every rank makes the same decisions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..anchors.manifest import Manifest
from ..anchors.reader import AnchorBatch
from ..policies.base import PolicyAdapter
from .distributed import DEFAULT_BUCKET_BYTES, BucketReducer, distributed_surgery_, loss_shares
from .grad_buffers import GradBuffers
from .retention import retention_loss
from .surgery import surgery_
from .two_pass import GradientTap, two_pass_retention

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
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        two_pass: bool = False,
    ) -> None:
        if accelerator.scaler is not None:
            raise ValueError("fp16 mixed precision (a GradScaler) is not supported by the CRaFT step: use bf16")
        # plain runs have no R; T and R hold memory only from their backward on (see the module doc)
        self.bufs = GradBuffers(policy, retention=manifest is not None, piece_bytes=bucket_bytes, lazy=True)
        self.adapter, self.optimizer, self.scheduler, self.accelerator = adapter, optimizer, scheduler, accelerator
        self.manifest, self.distance = manifest, distance
        self.surgery_options = {"project": project, "tau": tau, "merge": merge, "max_norm": max_norm}
        self.device = self.bufs.task.device
        self.distributed = accelerator.num_processes > 1
        # replicated data parallel: T and R are summed over ranks during their backward; FSDP2 shards
        # (`craft_ext.trainer.sharding`) are reduce-scattered by FSDP itself
        replicated = self.distributed and not self.bufs.task.sharded
        self.reducer = BucketReducer(self.bufs, bucket_bytes=bucket_bytes) if replicated else None
        # R never stored (see the module doc): one process, unsharded, one anchor batch per step
        self.tap = None
        if two_pass and manifest is not None:
            if self.distributed:
                raise ValueError("--craft.two_pass_retention runs in one process only (its R is never stored, so it cannot be "
                                 "summed over processes): drop it, or use --craft.sharding=fsdp2 to divide the memory")
            self.tap = GradientTap(self.bufs)
        #: called once T is reduced, before the surgery, to add terms to the task gradient (the trainer
        #: sets it for the baselines that have one: L2-SP's T += S (theta - theta_0))
        self.before_surgery: Callable[[], None] | None = None

    def compute(
        self,
        batch: dict | Sequence[dict],
        anchors: AnchorBatch | Sequence[AnchorBatch] | None,
        lam: float,
        *,
        epsilon: float | None,
    ) -> StepOutput:
        """Backward passes and the merge: G is in T when this returns (nothing applied yet).

        `batch`: the step's preprocessed task batch, or its micro-batches (`split_frames`, then the
        preprocessor on each). `anchors`: None on steps without retention, else the step's anchor
        batch or batches (one per micro-batch). `epsilon` is this step's tolerance epsilon_t (the
        `active` projection compares L_ret with it on the device); None in plain runs.
        """
        batches = [batch] if isinstance(batch, dict) else list(batch)
        self.bufs.task.zero_()  # lazy: no memory until the backward reaches it
        loss_task = self._backward(batches, self.adapter.task_loss, self.adapter.task_loss_weight, "task")

        loss_ret = None
        if anchors is not None:
            if epsilon is None:
                raise ValueError("CraftStep.compute: a retention step needs epsilon (the step's tolerance)")
            anchors = [anchors] if isinstance(anchors, AnchorBatch) else list(anchors)
            if self.tap is not None:
                return self._two_pass(anchors, loss_task, lam, epsilon)
            self.bufs.retain.zero_()  # R's pieces appear during the anchor backward
            self.bufs.use("retain")
            loss_ret = self._backward(anchors, self._retention_loss, _rows, "retain")  # L_ret: a mean over rows
            self.bufs.use("task")
        retain = self.bufs.retain if loss_ret is not None else None
        if self.reducer is not None:
            self.reducer.wait()  # T and R are now sums over ranks of the shares: every rank holds the same G
        if self.before_surgery is not None:
            self.before_surgery()  # after the reduction: the term is added once, the same on every rank
        if not self.distributed:
            out = surgery_(self.bufs.task, retain, lam, loss_ret=loss_ret, epsilon=epsilon, **self.surgery_options)
        else:
            local = torch.stack([loss_task] + ([loss_ret] if loss_ret is not None else []))
            out, losses = distributed_surgery_(self.bufs.task, retain, lam, local, epsilon=epsilon, **self.surgery_options)
            loss_task, loss_ret = losses[0], losses[1] if loss_ret is not None else None
        if retain is not None:
            retain.release_()  # merged into T: R's memory is free again before the optimiser step
        return StepOutput(loss_task, loss_ret, out)

    def _two_pass(self, anchors: list[AnchorBatch], loss_task: torch.Tensor, lam: float, epsilon: float) -> StepOutput:
        """The retention half of a two-pass step: T is whole, R is computed twice and never stored."""
        if len(anchors) != 1:
            raise ValueError("--craft.two_pass_retention needs one anchor batch per step (--craft.gradient_accumulation_steps=1)")
        if self.before_surgery is not None:
            self.before_surgery()  # T's own terms first: the stats are of the final T
        with self.accelerator.autocast():
            loss_ret = self._retention_loss(anchors[0])
        out = two_pass_retention(self.bufs, self.tap, loss_ret, self.accelerator.backward, lam, epsilon=epsilon,
                                 **self.surgery_options)
        return StepOutput(loss_task, loss_ret.detach().float(), out)

    def _backward(self, parts: list, loss_of: Callable, terms_of: Callable, kind: str) -> torch.Tensor:
        """Forward and backward of each part into the `kind` buffer (which `param.grad` points at),
        its loss weighted by its share of the step's loss terms (`terms_of`), over all ranks in
        multi-process runs; the buffer is summed over ranks during the last part's backward. Returns
        the weighted loss sum (detached, float32): this rank's share of the step's loss."""
        shares = None
        if len(parts) > 1 or self.distributed:
            counts = torch.stack([_device_count(terms_of(part), self.device) for part in parts])
            shares = loss_shares(counts) if self.distributed else counts / counts.sum().clamp_min(1.0)
        storage = self.bufs.task if kind == "task" else self.bufs.retain
        total = None
        for i, part in enumerate(parts):
            with self.accelerator.autocast():
                loss = loss_of(part)
            if shares is not None:
                loss = loss * shares[i]
            if storage.sharded:
                storage.complete_()  # FSDP2 writes its shards with no hook before: allocated whole, from the backward on
            last = i == len(parts) - 1
            with self.reducer.reducing(storage, kind) if last and self.reducer is not None else contextlib.nullcontext():
                self.accelerator.backward(loss)
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        storage.complete_()  # the pieces no gradient reached: zeros, as in a buffer allocated whole
        return total

    def _retention_loss(self, anchors: AnchorBatch) -> torch.Tensor:
        return retention_loss(self.adapter, anchors, self.manifest, distance=self.distance)

    def finish(self, output: StepOutput, host: dict[str, float]) -> bool:
        """Apply G unless the step is non-finite. Returns True if the step was applied."""
        applied = host["found_inf"] == 0 and math.isfinite(host["loss_task"]) and math.isfinite(host.get("loss_ret", 0.0))
        if applied:
            self.optimizer.step()
        self.bufs.task.release_()  # T's memory is free until the next backward (lerobot frees its gradients here too)
        if self.scheduler is not None:
            self.scheduler.step()  # the schedule follows the step count, applied or not
        return applied


def split_frames(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """One collated loader batch as `parts` micro-batches of consecutive frames (slices: views, no
    copies). N*B frames give N micro-batches of B; a short last batch gives near-equal ones (sizes as
    `torch.tensor_split`, empty ones dropped). Values that are not per-frame are shared."""
    if parts == 1:
        return [batch]
    size = next(len(v) for v in batch.values() if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0))
    small, extra = divmod(size, parts)
    edges = [i * small + min(i, extra) for i in range(parts + 1)]
    return [
        {k: v[a:b] if _per_frame(v, size) else v for k, v in batch.items()}
        for a, b in zip(edges, edges[1:])
        if b > a
    ]


def _per_frame(value: Any, size: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == size
    return isinstance(value, (list, tuple)) and len(value) == size



def _rows(anchors: AnchorBatch) -> int:
    return anchors.hidden.shape[0]


def _device_count(count: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """A float32 0-d device tensor; a host number is filled in on the device (a copy would sync)."""
    return count.float() if isinstance(count, torch.Tensor) else torch.full((), float(count), device=device)
