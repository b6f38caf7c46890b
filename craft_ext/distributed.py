"""The CRaFT step on several processes, with torch.distributed (DESIGN.md §7).

DDP (replicated gradients): run both backwards under ``ddp.no_sync()`` so DDP does not reduce them,
then average each flat buffer once with ``all_reduce_mean_`` (one all-reduce per dtype group instead
of DDP's per-bucket reductions, and R is only reduced on steps that computed it). Every rank then
holds the same T and R, so ``surgery_`` gives the same G everywhere::

    with ddp.no_sync():
        ...task backward into bufs.task, retention backward into bufs.retain...
    all_reduce_mean_(bufs.task, bufs.retain)
    out = surgery_(bufs.task, bufs.retain, lam.value)

FSDP2 (``fully_shard``): FSDP2 reduce-scatters each backward's gradient into ``param.grad``, which
``GradBuffers`` points at the local shard of the active buffer. ``sharded_surgery_`` sums the three
scalars of the local stats over ranks (one 3-element all-reduce) and merges each local shard.

Either way, average the retention loss with ``mean_across_ranks`` before ``LagrangeMultiplier.update``
so lambda stays identical on every rank.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .surgery import FlatGrads, loss_scale, merge_, surgery_coefficients, surgery_stats

__all__ = ["all_reduce_mean_", "sharded_surgery_", "mean_across_ranks"]


def all_reduce_mean_(*buffers: Union[FlatGrads, torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Average gradient buffers across ranks in place: one all-reduce per flat buffer, all in flight at once.

    Each buffer is divided by the world size before the sum, as DDP does, so fp16/bf16 sums stay in range.
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
    project: bool = True,
    tau: float = 0.0,
    mode: str = "weighted",
    max_norm: Optional[float] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> dict[str, torch.Tensor]:
    """``surgery_`` for FSDP2 shards: global stats from the local ones (one 3-scalar all-reduce), local merge.

    Same arguments and returned metrics as ``craft_ext.surgery.surgery_``; the metrics are global (the
    same on every rank), so is the decision, and each rank writes G into its own shard of T.
    """
    stats = surgery_stats(task, retain)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    out = surgery_coefficients(
        stats, lam, project=project, tau=tau, mode=mode, max_norm=max_norm, grad_scale=loss_scale(scaler)
    )
    merge_(task, retain, out)
    return out


def mean_across_ranks(value: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> float:
    """The mean of a per-rank scalar (the retention loss) over ranks, as a host float for the dual update.

    With equal anchor counts per rank this is the loss of the whole anchor batch. The tensor's device
    must suit the backend (CUDA for NCCL); this reads the result on the host, once per step by design.
    """
    if value.numel() != 1:
        raise ValueError(f"value: expected a scalar tensor, got shape {tuple(value.shape)}")
    total = value.detach().to(torch.float32).reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.item() / dist.get_world_size(group)
