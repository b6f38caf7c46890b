"""The CRaFT step on several processes, with torch.distributed (docs/architecture.md, "Many GPUs").

DDP (replicated gradients): run both backwards under ``ddp.no_sync()`` so DDP does not reduce them,
then average each flat buffer once with ``all_reduce_mean_`` (one all-reduce per dtype group instead
of DDP's per-bucket reductions, and R is only reduced on steps that computed it). Every rank then
holds the same T and R, so ``surgery_`` gives the same G everywhere::

    with ddp.no_sync():
        ...task backward into bufs.task, retention backward into bufs.retain...
    losses = torch.stack([loss_task.detach(), loss_ret.detach()]).float()
    all_reduce_mean_(bufs.task, bufs.retain, losses)  # one call, all in flight; losses now the means
    out = surgery_(bufs.task, bufs.retain, lam.value, loss_ret=losses[1], epsilon=eps)

FSDP2 (``fully_shard``): FSDP2 reduce-scatters each backward's gradient into ``param.grad``, which
``GradBuffers`` points at the local shard of the active buffer. ``sharded_surgery_`` sums the three
scalars of the local stats over ranks (one 3-element all-reduce) and merges each local shard.

Either way, average the retention loss over ranks on the device (``all_reduce_mean_`` of the step's
loss scalars, no host read) before the surgery and before ``LagrangeMultiplier.update``: the
``active`` projection and lambda must be the same on every rank. Read the means on the host together
with the step's other scalars, in the step's one host read.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .surgery import FlatGrads, merge_, surgery_coefficients, surgery_stats

__all__ = ["all_reduce_mean_", "sharded_surgery_"]


def all_reduce_mean_(*buffers: Union[FlatGrads, torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Average gradient buffers (and 1-D tensors of per-rank scalars, such as the step's losses) across
    ranks in place: one all-reduce per flat buffer, all in flight at once, no host read.

    Each buffer is divided by the world size before the sum, as DDP does, so fp16/bf16 sums stay in range.
    With equal batch and anchor counts per rank, averaged losses are the losses of the whole batch.
    """
    flats = [flat for b in buffers for flat in (b.flats if isinstance(b, FlatGrads) else (b,))]
    world = dist.get_world_size(group)
    works = []
    for flat in flats:
        flat.div_(world)
        works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True))
    for work in works:
        work.wait()


def sharded_surgery_(
    task: FlatGrads,
    retain: FlatGrads,
    lam: Union[float, torch.Tensor],
    *,
    project: str = "active",
    loss_ret: Union[float, torch.Tensor, None] = None,
    epsilon: Union[float, torch.Tensor, None] = None,
    tau: float = 0.0,
    mode: str = "weighted",
    max_norm: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> dict[str, torch.Tensor]:
    """``surgery_`` for FSDP2 shards: global stats from the local ones (one 3-scalar all-reduce), local merge.

    Same arguments and returned metrics as ``craft_ext.surgery.surgery_``; ``loss_ret`` must be the
    mean over ranks (``all_reduce_mean_``). The metrics are global (the same on every rank), so is
    the decision, and each rank writes G into its own shard of T.
    """
    stats = surgery_stats(task, retain)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    out = surgery_coefficients(
        stats, lam, project=project, loss_ret=loss_ret, epsilon=epsilon, tau=tau, mode=mode, max_norm=max_norm
    )
    merge_(task, retain, out)
    return out
