"""Flat gradient buffers: T and R in contiguous 1-D pieces, every ``param.grad`` a view (docs/architecture.md,
"The step" and "Memory").

Why flat buffers: the task gradient T and the retention gradient R each live in a few contiguous 1-D
pieces per dtype group, and every ``param.grad`` is a view into the active storage. Switching between
T and R is re-pointing ``param.grad`` (no copy), and the surgery (craft_ext.engine.surgery) is two fused
passes over a few big pieces instead of a Python loop over hundreds of parameters. FSDP2's sharded
parameters get DTensor gradients wrapping the views of their local shards, so FSDP2 accumulates into
the storage too.

A storage is cut into pieces: runs of consecutive parameters of one dtype, closed once they hold
``piece_bytes`` (a larger parameter is a piece of its own); without ``piece_bytes``, one piece per dtype
group. The ops run over the pieces (``grad_stats_pieces`` gives bitwise on the CPU what ``grad_stats``
gives over the concatenation), so how a storage is cut never changes a result.

Lifetimes. An eager storage (``lazy=False``, the default) is allocated at construction and lives as
long as the object. A lazy one (``lazy=True``, what the step uses) holds no memory until a backward
reaches it: a hook on each parameter, which runs when the parameter's gradient arrives and before
autograd accumulates it, allocates the parameter's piece (zero-filled) and points ``param.grad`` of all
its parameters at their views, so autograd accumulates into the view exactly as into an eager buffer.
Pieces thus appear bucket by bucket as the backward frees the activations, like lerobot's
per-parameter gradients. ``complete_`` adds the pieces no gradient reached (zeros), ``release_`` frees
the storage (``param.grad`` becomes None). FSDP2 writes its shards' gradients in its reduce-scatter,
with no hook before it writes: a lazy sharded storage is allocated whole by ``complete_`` before the
backward (the step does so), a 1/N-size shard.

Zero with ``FlatGrads.zero_`` rather than ``optimizer.zero_grad()``, whose default sets ``param.grad`` to
None: a backward would then allocate fresh gradients outside the buffers (``use`` raises if so).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional, Union

import torch
from torch import nn

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # pragma: no cover - torch builds without distributed
    DTensor = ()

__all__ = ["FlatGrads", "GradBuffers"]


class FlatGrads:
    """One gradient-sized storage: contiguous 1-D pieces per dtype group and a view per parameter.

    ``flats`` are the pieces the ops work on (``groups``: the same, per dtype group); ``grads`` are what
    ``param.grad`` gets (the views, or DTensors wrapping them for FSDP2's sharded parameters). Both need
    the whole storage allocated (always, unless ``lazy``; see the module doc).
    """

    def __init__(self, params: list[nn.Parameter], *, piece_bytes: Optional[int] = None, lazy: bool = False) -> None:
        if piece_bytes is not None and piece_bytes < 1:
            raise ValueError(f"piece_bytes={piece_bytes}: expected >= 1 (or None: one piece per dtype group)")
        self._params = list(params)
        locals_ = [_local(p) for p in self._params]
        self.sharded = isinstance(self._params[0], DTensor)
        self.lazy = lazy
        self.device: torch.device = locals_[0].device
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(locals_):
            groups.setdefault(t.dtype, []).append(i)
        #: per piece: (dtype, numel, [(param index, offset)]); per parameter: its piece
        self._layout: list[tuple[torch.dtype, int, list[tuple[int, int]]]] = []
        self._piece_of = [0] * len(self._params)
        piece_groups = []
        for dtype, members in groups.items():
            element = dtype.itemsize
            indices: list[int] = []
            current: Optional[list[tuple[int, int]]] = None
            size = 0
            for i in members:
                if current is None or (piece_bytes is not None and size * element >= piece_bytes):
                    current, size = [], 0
                    indices.append(len(self._layout))
                    self._layout.append((dtype, 0, current))
                current.append((i, size))
                self._piece_of[i] = indices[-1]
                size += locals_[i].numel()
                self._layout[indices[-1]] = (dtype, size, current)
            piece_groups.append(tuple(indices))
        #: piece indices per dtype group, in the order of the parameters' first dtype appearance
        self.piece_groups: tuple[tuple[int, ...], ...] = tuple(piece_groups)
        self._pieces: list[Optional[torch.Tensor]] = [None] * len(self._layout)
        self._grads: list[Optional[torch.Tensor]] = [None] * len(self._params)
        #: True while ``param.grad`` points at this storage (set by ``GradBuffers``): pieces allocated
        #: meanwhile are bound at once, a release unbinds
        self.bound = False
        #: if set, a context entered around each piece's allocation (benchmarks/memory.py counts the
        #: piece as T or R from its first byte)
        self.allocation_context: Optional[Callable[[], ContextManager]] = None
        if not lazy:
            self.complete_()

    @property
    def allocated(self) -> bool:
        """Whether every piece exists (always, for an eager storage)."""
        return all(piece is not None for piece in self._pieces)

    @property
    def flats(self) -> tuple[torch.Tensor, ...]:
        """The pieces, dtype group after dtype group (one per group without ``piece_bytes``)."""
        self._require("flats")
        return tuple(self._pieces)

    @property
    def groups(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The pieces of each dtype group (their concatenation is the group's flat buffer)."""
        self._require("groups")
        return tuple(tuple(self._pieces[k] for k in group) for group in self.piece_groups)

    @property
    def grads(self) -> tuple[torch.Tensor, ...]:
        """Per parameter, what ``param.grad`` gets."""
        self._require("grads")
        return tuple(self._grads)

    @property
    def pieces(self) -> tuple[tuple[torch.dtype, int, tuple[tuple[int, int], ...]], ...]:
        """The layout, allocated or not: per piece (dtype, numel, ((param index, offset), ...))."""
        return tuple((dtype, numel, tuple(members)) for dtype, numel, members in self._layout)

    def piece(self, index: int) -> torch.Tensor:
        """Piece ``index`` (raises if it is not allocated)."""
        piece = self._pieces[index]
        if piece is None:
            raise RuntimeError(f"FlatGrads: piece {index} is not allocated (no gradient reached it yet)")
        return piece

    def allocated_pieces(self) -> tuple[torch.Tensor, ...]:
        """The pieces allocated now (all of them, for an eager or a completed storage)."""
        return tuple(piece for piece in self._pieces if piece is not None)

    def grad(self, index: int) -> Optional[torch.Tensor]:
        """What ``param.grad`` of parameter ``index`` gets, or None while its piece is not allocated."""
        return self._grads[index]

    def reach(self, index: int) -> None:
        """Allocate parameter ``index``'s piece if it is not (zeros; bound at once if ``bound``)."""
        k = self._piece_of[index]
        if self._pieces[k] is None:
            self._allocate(k)

    def complete_(self) -> None:
        """Allocate every piece not allocated yet (zeros): the storage is then whole."""
        for k, piece in enumerate(self._pieces):
            if piece is None:
                self._allocate(k)

    def zero_(self) -> None:
        """Make the storage all zeros: one fill per piece, or, for a lazy storage, a release (its pieces
        come back zero-filled when a backward reaches them, or with ``complete_``)."""
        if self.lazy:
            self.release_()
            return
        for piece in self._pieces:
            piece.zero_()

    def release_(self) -> None:
        """Free a lazy storage's memory (``param.grad`` becomes None where it pointed here); an eager
        storage keeps its memory."""
        if not self.lazy:
            return
        if self.bound:
            for p in self._params:
                p.grad = None
        self._pieces = [None] * len(self._layout)
        self._grads = [None] * len(self._params)

    def numel(self) -> int:
        """Elements in this storage (the local shard's, for sharded parameters), allocated or not."""
        return sum(numel for _, numel, _ in self._layout)

    def _allocate(self, k: int) -> None:
        dtype, numel, members = self._layout[k]
        with self.allocation_context() if self.allocation_context is not None else contextlib.nullcontext():
            flat = torch.zeros(numel, dtype=dtype, device=self.device)
        self._pieces[k] = flat
        for i, offset in members:
            p = self._params[i]
            local = _local(p)
            self._grads[i] = _grad_for(p, flat[offset : offset + local.numel()].view(local.shape))
            if self.bound:
                p.grad = self._grads[i]

    def _require(self, what: str) -> None:
        if not self.allocated:
            raise RuntimeError(
                f"FlatGrads.{what}: the storage is not whole (a lazy storage between backwards); call complete_() first"
            )


class GradBuffers:
    """Task (T) and retention (R) gradient storage for a module's trainable parameters.

    Frozen parameters (``requires_grad=False``) are skipped and tied parameters appear once; with
    ``retention=False`` only T exists (``retain`` is None: plain fine-tuning). ``piece_bytes`` and
    ``lazy``: see the module doc (the step uses lazy storage cut like its gradient buckets). The
    storage is built for the parameters' dtypes and devices at construction: after ``model.to(...)``
    build a new ``GradBuffers`` (``use`` says so if you forget).
    """

    def __init__(
        self,
        params: Union[nn.Module, Iterable[nn.Parameter]],
        *,
        retention: bool = True,
        piece_bytes: Optional[int] = None,
        lazy: bool = False,
    ) -> None:
        named = _trainable(params)
        if not named:
            raise ValueError("GradBuffers: no trainable parameters (all frozen, or an empty module)")
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.params: tuple[nn.Parameter, ...] = tuple(p for _, p in named)
        _check_layout(self.names, self.params)
        self.task = FlatGrads(list(self.params), piece_bytes=piece_bytes, lazy=lazy)
        # Without retention (plain fine-tuning) there is no R: no second gradient's worth of memory.
        self.retain = FlatGrads(list(self.params), piece_bytes=piece_bytes, lazy=lazy) if retention else None
        self._built_for = tuple((p.dtype, p.device) for p in self.params)
        self._active = self.task
        self._bind(self.task)
        if lazy and not self.task.sharded:  # FSDP2 shards never pass through autograd: see the module doc
            for i, p in enumerate(self.params):
                p.register_hook(self._reach_hook(i))

    def use(self, which: str) -> None:
        """Point every ``param.grad`` at the ``"task"`` or ``"retain"`` storage (backward accumulates there;
        None where a lazy storage has no piece yet), or at ``"none"``: no storage, every ``param.grad``
        None, so a backward makes plain per-parameter gradients, which the caller consumes and drops
        (``param.grad = None``) before the next switch (craft_ext.engine.two_pass).

        Raises if a ``param.grad`` was replaced since the last switch (the gradients would then not be
        in the buffers) or the parameters changed dtype/device (``model.to``) since construction.
        """
        if which not in ("task", "retain", "none"):
            raise ValueError(f"which={which!r}: expected 'task', 'retain' or 'none'")
        if which == "retain" and self.retain is None:
            raise ValueError("GradBuffers was built with retention=False: it has no retention storage")
        for i, (name, p, built_for) in enumerate(zip(self.names, self.params, self._built_for)):
            if p.grad is not None and (self._active is None or p.grad is not self._active.grad(i)):
                raise RuntimeError(
                    f"GradBuffers: {name}.grad was replaced, so its gradient is not in the buffers (did "
                    "optimizer.zero_grad() set it to None before a backward, or backward use create_graph=True?)"
                )
            if (p.dtype, p.device) != built_for:
                raise RuntimeError(
                    f"GradBuffers: parameter {name!r} is now {p.dtype} on {p.device} but the buffers were built "
                    f"for {built_for[0]} on {built_for[1]}; build a new GradBuffers after model.to(...)"
                )
        self._bind({"task": self.task, "retain": self.retain, "none": None}[which])

    def _bind(self, storage: Optional[FlatGrads]) -> None:
        if self._active is not None:
            self._active.bound = False
        self._active = storage
        if storage is not None:
            storage.bound = True
        for i, p in enumerate(self.params):
            p.grad = storage.grad(i) if storage is not None else None

    def _reach_hook(self, index: int):
        def hook(_grad: torch.Tensor) -> None:
            # runs before autograd accumulates the gradient: with param.grad pointing at a zero-filled
            # view, the accumulation is the in-place add an eager buffer gets
            if self._active is not None and self.params[index].grad is None:
                self._active.reach(index)

        return hook


def _trainable(params) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of the trainable parameters, each tensor once (tied weights share one slot)."""
    if isinstance(params, nn.Module):
        named = params.named_parameters()  # already de-duplicates tied parameters
    else:
        named = ((f"params[{i}]", p) for i, p in enumerate(params))
    seen: set[int] = set()
    out = []
    for name, p in named:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _check_layout(names, params) -> None:
    devices = {_local(p).device for p in params}
    if len(devices) > 1:
        raise ValueError(f"GradBuffers: trainable parameters span several devices {sorted(map(str, devices))}")
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded) and not all(sharded):
        plain = names[sharded.index(False)]
        raise ValueError(
            f"GradBuffers: parameter {plain!r} is not sharded while others are FSDP2 DTensors; "
            "apply fully_shard to every module with trainable parameters"
        )


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _grad_for(p: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return view
