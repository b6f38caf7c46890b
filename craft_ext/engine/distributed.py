"""The CRaFT step on several processes (docs/architecture.md, "Many GPUs").

Every rank weights its losses by its share of the whole step's loss terms (``loss_shares``), so the
*sum* over ranks of the local gradients and losses is the gradient and loss of the global batch:
every reduction here is a plain SUM (gloo has no AVG; NCCL sums without pre- or post-scaling).

Replicated parameters (data parallel): ``BucketReducer`` sums T (task backward) and R (retention
backward) over ranks while the backward still runs, DDP's reducer on the flat buffers. FSDP2
(``fully_shard``): FSDP's own reduce-scatter fills the local shard of T and R (with its divide
factor set to 1, craft_ext.trainer.sharding). Either way ``distributed_surgery_`` then takes the step's
decision from one small all-reduce: the losses (and, for shards, the three stats) travel together,
so the skip decision, the ``active`` projection and L_ret for the dual update are the same on every
rank. A non-finite value on any rank reaches every rank through the sums (NaN + x = NaN): that is
the skip flag, no separate vote is needed::

    reducer = BucketReducer(bufs, bucket_bytes=25 << 20)         # replicated parameters only
    bufs.use("task")
    with reducer.reducing(bufs.task, "task"):                    # last micro-batch only
        (task_loss * share).backward()
    bufs.use("retain")
    with reducer.reducing(bufs.retain, "retain"):
        (retention_loss * row_share).backward()
    bufs.use("task")
    reducer.wait()                                               # T, R: sums over ranks
    out, losses = distributed_surgery_(bufs.task, bufs.retain, lam, local_losses, epsilon=eps)

Why not ``DistributedDataParallel``: DDP reduces in gradient buckets of its own, one more
gradient's worth of memory beside T and R, or, with ``gradient_as_bucket_view``, makes ``param.grad``
alias those buckets, which conflicts with pointing ``param.grad`` at T for the task backward and at
R for the retention backward. It also arms its reducer in the wrapper's forward, which the CRaFT
step never calls (the task loss runs through the policy's inner model, the anchor pass through the
prefix only). Under ``no_sync`` it reduces nothing, and the whole buffer is reduced after the
backward, exposed: what the trainer did before this reducer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from .grad_buffers import FlatGrads, GradBuffers
from .surgery import merge_, surgery_coefficients, surgery_stats

__all__ = [
    "BucketReducer",
    "distributed_surgery_",
    "loss_shares",
]

#: DDP's default bucket size
DEFAULT_BUCKET_BYTES = 25 << 20


def loss_shares(counts: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Each local micro-batch's share of the whole step's loss terms: counts / (sum over micro-batches
    and ranks), on the device (one small all-reduce, no host read).

    Weighting each micro-batch's mean loss by its share makes the sum over ranks of the weighted
    losses (and gradients) exactly the loss (gradient) of the global batch, whatever the split.
    """
    total = counts.float().sum().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return counts.float() / total.clamp_min(1.0)


@dataclass
class _Bucket:
    piece: int  # index of the storage's piece (``FlatGrads.flats``)
    start: int
    stop: int
    params: list[int]


@dataclass
class _Plan:
    """What the first reduced backward of a kind taught: the parameters it never gives a gradient
    (on any rank) and the order in which its buckets are launched (rank 0's readiness order)."""

    unused: frozenset[int]
    order: list[int]  # bucket indices; buckets of unused parameters only are left out


@dataclass
class _Pass:
    """One reduced backward: the storage it fills and how far its buckets are."""

    storage: FlatGrads
    kind: str
    plan: Optional[_Plan]  # None: the first backward of this kind (learning)
    pending: list[int]
    fired: list[int]  # per parameter: its position in this backward's gradient order, -1 before
    count: int = 0  # gradients so far
    next: int = 0  # position in plan.order of the next bucket to launch
    launched_bytes: int = 0
    works: list = field(default_factory=list)


class BucketReducer:
    """Sums a ``GradBuffers`` storage over ranks while the backward that fills it still runs.

    Buckets are contiguous slices of each flat piece of at most ``bucket_bytes`` (a larger
    parameter is a bucket of its own), in parameter order, so their ranges are the same in T and R;
    storage cut into pieces of ``bucket_bytes`` (the step's) has one bucket per piece. A lazy
    storage's piece exists once a gradient of it arrived (``FlatGrads``), so before its bucket is
    ready; what no gradient reached is completed (zeros) when the backward ends.
    A post-accumulate-grad hook on each parameter counts down its bucket; once every parameter of a
    bucket has its gradient the bucket is ready, and ready buckets start their asynchronous
    all-reduce (SUM) in a fixed order while the backward goes on. Collectives must be issued in the
    same order on every rank, so that order is rank 0's readiness order, learned on the first
    backward of each kind ("task", "retain") as DDP's static graph learns it; the same step also
    learns which parameters get no gradient in that kind of backward on any rank (e.g. the LM head in
    the prefix-only retention pass): their slices are zero everywhere and are not reduced again.
    That first backward is reduced after it ends (one extra small all-reduce and host read, once).
    Whatever a backward leaves unlaunched (a parameter without a gradient this time) is launched
    when it ends, in order, before the next backward's buckets. A learned-unused parameter that
    later gets a gradient raises: each kind of backward must use the same parameters every step.
    """

    def __init__(self, bufs: GradBuffers, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, group: Optional[dist.ProcessGroup] = None):
        if bufs.task.sharded:
            raise ValueError("BucketReducer: these buffers hold FSDP2 shards; FSDP reduces their gradients itself")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes}: expected >= 1")
        self.names, self.group = bufs.names, group
        self.buckets = _buckets(bufs.task, bucket_bytes)
        self._bucket_of = [0] * len(bufs.params)
        for b, bucket in enumerate(self.buckets):
            for i in bucket.params:
                self._bucket_of[i] = b
        self._plans: dict[str, _Plan] = {}
        self._passes: list[_Pass] = []
        self._current: Optional[_Pass] = None
        for i, p in enumerate(bufs.params):
            p.register_post_accumulate_grad_hook(self._hook(i))

    @contextlib.contextmanager
    def reducing(self, storage: FlatGrads, kind: str) -> Iterator[None]:
        """Reduce ``storage`` (which ``param.grad`` must point at) during the backward run inside.

        Wrap the last backward into ``storage`` of the step (with gradient accumulation, the earlier
        micro-batches accumulate locally first), then call ``wait`` before reading it.
        """
        if self._current is not None:
            raise RuntimeError("BucketReducer.reducing: already reducing a backward")
        if any(p.storage is storage for p in self._passes):
            raise RuntimeError("BucketReducer.reducing: this storage is already being reduced; call wait() first")
        plan = self._plans.get(kind)
        unused = plan.unused if plan is not None else frozenset()
        pending = [sum(i not in unused for i in bucket.params) for bucket in self.buckets]
        current = _Pass(storage, kind, plan, pending, [-1] * len(self._bucket_of))
        self._passes.append(current)
        self._current = current
        try:
            yield
        finally:
            self._current = None
        storage.complete_()  # pieces no gradient reached (a lazy storage): zeros, reduced like the rest
        if current.plan is None:
            current.plan = self._plans[kind] = self._learn(current)
        self._launch_ready(current, everything=True)

    @property
    def launched_bytes(self) -> int:
        """Bytes whose all-reduce the backward being reduced has started so far (0 outside ``reducing``)."""
        return self._current.launched_bytes if self._current is not None else 0

    def wait(self) -> None:
        """Wait until every reduction started since the last ``wait`` is done (on CUDA the current
        stream waits; the host does not)."""
        passes, self._passes = self._passes, []
        for p in passes:
            for work in p.works:
                work.wait()

    def _hook(self, index: int):
        def hook(_param: torch.Tensor) -> None:
            current = self._current
            if current is None:  # a backward that is not reduced (an earlier micro-batch)
                return
            if current.plan is not None and index in current.plan.unused:
                raise RuntimeError(
                    f"{self.names[index]} got a gradient in the {current.kind} backward although it had none on "
                    "the first step: the overlapped reducer assumes every step's backward of a kind uses the same "
                    "parameters"
                )
            if current.fired[index] >= 0:
                raise RuntimeError(f"{self.names[index]} got two gradients in one reduced backward")
            current.fired[index], current.count = current.count, current.count + 1
            bucket = self._bucket_of[index]
            current.pending[bucket] -= 1
            if current.plan is not None and current.pending[bucket] == 0:
                self._launch_ready(current)

        return hook

    def _launch_ready(self, p: _Pass, everything: bool = False) -> None:
        """Launch the buckets of ``p.plan.order`` from ``p.next`` on while they are ready (all of them
        with ``everything``)."""
        order = p.plan.order
        while p.next < len(order) and (everything or p.pending[order[p.next]] == 0):
            bucket = self.buckets[order[p.next]]
            view = p.storage.piece(bucket.piece)[bucket.start : bucket.stop]
            p.works.append(dist.all_reduce(view, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
            p.launched_bytes += view.numel() * view.element_size()
            p.next += 1

    def _learn(self, p: _Pass) -> _Plan:
        """The plan of ``p.kind`` from its first backward: parameters without a gradient on every rank,
        and buckets ordered by when rank 0's backward completed them (its last gradient in them)."""
        fired = torch.tensor(p.fired, dtype=torch.float64, device=p.storage.device)
        anywhere = (fired >= 0).double()
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=self.group)
        dist.broadcast(fired, group=self.group, group_src=0)
        anywhere, rank0 = torch.stack([anywhere, fired]).tolist()
        unused = frozenset(i for i, got in enumerate(anywhere) if got == 0)
        last = float("inf")
        keys = {}
        for b, bucket in enumerate(self.buckets):
            used = [i for i in bucket.params if i not in unused]
            if used:  # a parameter rank 0 gave no gradient (another rank did) counts as last
                keys[b] = max(rank0[i] if rank0[i] >= 0 else last for i in used)
        return _Plan(unused, sorted(keys, key=lambda b: (keys[b], b)))


def _buckets(storage: FlatGrads, bucket_bytes: int) -> list[_Bucket]:
    """Contiguous slices of each flat piece, cut at parameter boundaries once ``bucket_bytes`` is reached
    (from the storage's layout: a lazy storage need not be allocated)."""
    buckets = []
    for k, (dtype, numel, members) in enumerate(storage.pieces):
        ends = [offset for _, offset in members[1:]] + [numel]
        current: Optional[_Bucket] = None
        for (i, offset), end in zip(members, ends):
            if current is None or (current.stop - current.start) * dtype.itemsize >= bucket_bytes:
                current = _Bucket(k, offset, offset, [])
                buckets.append(current)
            current.stop = end
            current.params.append(i)
    return buckets


def distributed_surgery_(
    task: FlatGrads,
    retain: Optional[FlatGrads],
    lam: Union[float, torch.Tensor],
    losses: torch.Tensor,
    *,
    project: str = "active",
    epsilon: Union[float, torch.Tensor, None] = None,
    tau: float = 0.0,
    merge: str = "weighted",
    max_norm: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``surgery_`` across ranks: one small all-reduce carries the decision, then the local merge.

    ``losses``: float32[1] (L_task) or [2] (L_task, L_ret) of this rank's weighted shares
    (``loss_shares``), which sum over ranks to the step's losses; ``retain``: None on a step without
    a retention gradient. Replicated buffers must already be summed (``BucketReducer.wait``): their
    stats are computed locally, the same on every rank. Sharded (FSDP2) buffers contribute their
    local stats to the all-reduce. Returns (metrics as ``surgery_``'s, the step's losses); both are
    the same on every rank, so is the decision to apply or skip (a NaN anywhere reaches every rank
    through the sums, and then ``found_inf`` is 1 and G is all NaN everywhere).
    """
    losses = losses.float().reshape(-1)
    sharded = task.sharded
    if sharded:
        vector = torch.cat([surgery_stats(task, retain), losses])
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
        stats, losses = vector[:3], vector[3:]
    else:
        losses = losses.clone()
        dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=group)
        stats = surgery_stats(task, retain)
    if retain is None:
        out = surgery_coefficients(stats, 0.0, project="never", max_norm=max_norm)
    else:
        out = surgery_coefficients(
            stats, lam, project=project, loss_ret=losses[1], epsilon=epsilon, tau=tau, merge=merge, max_norm=max_norm
        )
    merge_(task, retain, out)
    return out, losses
