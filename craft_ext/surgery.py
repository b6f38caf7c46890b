"""Flat gradient buffers and the CRaFT gradient surgery (DESIGN.md §2, steps 1-6).

Why flat buffers: the task gradient T and the retention gradient R each live in one contiguous 1-D
buffer per dtype group, and every ``param.grad`` is a view into the active one. Switching between T and
R is re-pointing ``param.grad`` (no copy), and the surgery is two fused passes over a few big buffers
(``grad_stats`` then ``grad_combine_``) instead of a Python loop over hundreds of parameters. The only
memory beyond plain training is R.

Why no host synchronisation: the conflict test, the projection and the merge weights are computed
from the three scalars of ``grad_stats`` with tensor ops on the device, so a step never waits for the
GPU. Non-finite gradients are reported as a 0/1 tensor (like GradScaler's ``found_inf``) for the caller
to act on, and the merged gradient is then made all-NaN so it can never be applied silently.

Usage, one step::

    bufs = GradBuffers(model)                     # after model.to(...); rebuild after any later .to()
    bufs.task.zero_(); bufs.use("task");   task_loss.backward()
    bufs.retain.zero_(); bufs.use("retain"); retention_loss.backward()
    bufs.use("task")                              # the optimiser reads param.grad = T's views
    out = surgery_(bufs.task, bufs.retain, lam.value, max_norm=1.0)   # G written into T
    optimizer.step()

Zero with ``FlatGrads.zero_`` rather than ``optimizer.zero_grad()``, whose default sets ``param.grad`` to
None: a backward would then allocate fresh gradients outside the buffers (``use`` raises if so).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import nn

from . import ops

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # pragma: no cover - torch builds without distributed
    DTensor = ()

__all__ = [
    "FlatGrads",
    "GradBuffers",
    "surgery_",
    "surgery_stats",
    "surgery_coefficients",
    "merge_",
    "clip_coefficient",
    "loss_scale",
]

MODES = ("weighted", "equal", "task_priority")
_CLIP_EPS = 1e-6  # the epsilon of torch.nn.utils.clip_grad_norm_, so clipping matches it exactly


class FlatGrads:
    """One gradient-sized storage: a contiguous 1-D buffer per dtype group and a view per parameter.

    ``flats`` are the buffers the ops work on; ``grads`` are what ``param.grad`` gets (the views, or
    DTensors wrapping them for FSDP2's sharded parameters, so FSDP2 accumulates into the buffer).
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(_local(p).dtype, []).append(i)
        views: list[Optional[torch.Tensor]] = [None] * len(params)
        flats = []
        for dtype, members in groups.items():
            locals_ = [_local(params[i]) for i in members]
            flat = torch.zeros(sum(t.numel() for t in locals_), dtype=dtype, device=locals_[0].device)
            offset = 0
            for i, t in zip(members, locals_):
                views[i] = flat[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
            flats.append(flat)
        self.flats: tuple[torch.Tensor, ...] = tuple(flats)
        self.sharded = isinstance(params[0], DTensor)
        self.grads: tuple[torch.Tensor, ...] = tuple(_grad_for(p, v) for p, v in zip(params, views))

    def zero_(self) -> None:
        """Zero the whole storage (one fill per dtype group)."""
        for flat in self.flats:
            flat.zero_()

    def numel(self) -> int:
        """Elements in this storage (the local shard's, for sharded parameters)."""
        return sum(flat.numel() for flat in self.flats)


class GradBuffers:
    """Task (T) and retention (R) gradient storage for a module's trainable parameters.

    Frozen parameters (``requires_grad=False``) are skipped and tied parameters appear once; with
    ``retention=False`` only T is allocated (``retain`` is None: plain fine-tuning). The
    buffers are built for the parameters' dtypes and devices at construction: after ``model.to(...)``
    build a new ``GradBuffers`` (``use`` says so if you forget).
    """

    def __init__(self, params: Union[nn.Module, Iterable[nn.Parameter]], *, retention: bool = True) -> None:
        named = _trainable(params)
        if not named:
            raise ValueError("GradBuffers: no trainable parameters (all frozen, or an empty module)")
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.params: tuple[nn.Parameter, ...] = tuple(p for _, p in named)
        _check_layout(self.names, self.params)
        self.task = FlatGrads(list(self.params))
        # Without retention (plain fine-tuning) there is no R: no second gradient's worth of memory.
        self.retain = FlatGrads(list(self.params)) if retention else None
        self._built_for = tuple((p.dtype, p.device) for p in self.params)
        self._active = self.task
        self._bind(self.task)

    def use(self, which: str) -> None:
        """Point every ``param.grad`` at the ``"task"`` or ``"retain"`` storage (backward accumulates there).

        Raises if a ``param.grad`` was replaced since the last switch (the gradients would then not be
        in the buffers) or the parameters changed dtype/device (``model.to``) since construction.
        """
        if which not in ("task", "retain"):
            raise ValueError(f"which={which!r}: expected 'task' or 'retain'")
        if which == "retain" and self.retain is None:
            raise ValueError("GradBuffers was built with retention=False: it has no retention storage")
        for name, p, bound, built_for in zip(self.names, self.params, self._active.grads, self._built_for):
            if p.grad is not None and p.grad is not bound:
                raise RuntimeError(
                    f"GradBuffers: {name}.grad was replaced, so its gradient is not in the buffers (did "
                    "optimizer.zero_grad() set it to None before a backward, or backward use create_graph=True?)"
                )
            if (p.dtype, p.device) != built_for:
                raise RuntimeError(
                    f"GradBuffers: parameter {name!r} is now {p.dtype} on {p.device} but the buffers were built "
                    f"for {built_for[0]} on {built_for[1]}; build a new GradBuffers after model.to(...)"
                )
        self._active = self.task if which == "task" else self.retain
        self._bind(self._active)

    def _bind(self, storage: FlatGrads) -> None:
        for p, g in zip(self.params, storage.grads):
            p.grad = g


def surgery_(
    task: Union[FlatGrads, torch.Tensor],
    retain: Union[FlatGrads, torch.Tensor, None],
    lam: Union[float, torch.Tensor],
    *,
    project: bool = True,
    tau: float = 0.0,
    mode: str = "weighted",
    max_norm: Optional[float] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> dict[str, torch.Tensor]:
    """Merge T and R into G = alpha T + beta R, written into ``task`` in place; no host sync.

    ``task``/``retain``: ``FlatGrads`` or 1-D tensors of equal size and dtype. ``lam``: the multiplier,
    a float or a 0-d tensor on the buffers' device. Conflict means cos(T, R) < ``tau``; with ``project``
    a conflicting T is replaced by its projection orthogonal to R (PCGrad) before the merge. ``mode``:
    ``weighted`` G = T' + lam R, ``equal`` G = (T' + R) / 2, ``task_priority`` G = T' + min(lam, 1) R.
    R == 0 gives G = T exactly in every mode; ``retain=None`` means no retention gradient at all (plain
    fine-tuning without an R buffer): G = T, clipped, in one scaling pass. ``max_norm`` clips G like ``clip_grad_norm_`` at no extra
    cost (folded into alpha and beta). With a ``scaler`` (both losses scaled by it) the stats are
    unscaled and G stays scaled for ``scaler.step``/``scaler.unscale_``, which also skip a non-finite G.

    Returns 0-d float32 device tensors: ``cos``, ``conflict`` (0/1), ``alpha``, ``beta``, ``task_norm``,
    ``retain_norm``, ``grad_norm`` (|G| before clipping, from the stats) and ``found_inf`` (0/1: T or R
    had NaN/Inf; G is then all NaN, so skip the step). Sharded (FSDP2) buffers need
    ``craft_ext.distributed.sharded_surgery_`` (the stats must be summed over ranks).
    """
    if isinstance(task, FlatGrads) and task.sharded:
        raise ValueError("surgery_: these buffers hold FSDP2 shards; use craft_ext.distributed.sharded_surgery_")
    stats = surgery_stats(task, retain)
    out = surgery_coefficients(
        stats, lam, project=project, tau=tau, mode=mode, max_norm=max_norm, grad_scale=loss_scale(scaler)
    )
    merge_(task, retain, out)
    return out


def surgery_stats(task: Union[FlatGrads, torch.Tensor], retain: Union[FlatGrads, torch.Tensor, None]) -> torch.Tensor:
    """float32[3] = (T.R, |T|^2, |R|^2) summed over the dtype groups, on the buffers' device
    ((0, |T|^2, 0) when ``retain`` is None)."""
    if retain is None:
        only_tt = None
        for t in _flats(task, "task"):
            tt = ops.grad_stats(t, t)[1]
            only_tt = tt if only_tt is None else only_tt + tt
        zero = torch.zeros_like(only_tt)
        return torch.stack([zero, only_tt, zero])
    pairs = _pairs(task, retain)
    stats = ops.grad_stats(*pairs[0])
    for t, r in pairs[1:]:
        stats = stats + ops.grad_stats(t, r)
    return stats


def surgery_coefficients(
    stats: torch.Tensor,
    lam: Union[float, torch.Tensor],
    *,
    project: bool = True,
    tau: float = 0.0,
    mode: str = "weighted",
    max_norm: Optional[float] = None,
    grad_scale: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """The surgery's decisions and merge weights from the stats alone (see ``surgery_``), on device.

    ``grad_scale`` is the loss scale both gradients carry; the stats are unscaled by it, while alpha and
    beta (scale-free ratios, times the clip factor) leave G with the same scale as T and R.
    """
    _check_options(lam, tau, mode)
    stats = stats.float()
    if grad_scale is not None:
        stats = stats * grad_scale.float().reciprocal().square()
    dot, tt, rr = stats.unbind()
    found_inf = (~torch.isfinite(stats).all()).float()
    task_norm, retain_norm = tt.sqrt(), rr.sqrt()
    both = (task_norm > 0) & (retain_norm > 0)
    cos = torch.where(both, dot / torch.where(both, task_norm * retain_norm, 1.0), 0.0).clamp(-1.0, 1.0)
    conflict = both & (cos < tau)

    if isinstance(lam, torch.Tensor):
        lam_t = lam.detach().to(device=stats.device, dtype=torch.float32)
    else:
        lam_t = torch.full((), float(lam), dtype=torch.float32, device=stats.device)
    if mode == "weighted":
        a, b = torch.ones_like(dot), lam_t
    elif mode == "equal":
        a, b = torch.full_like(dot, 0.5), torch.full_like(dot, 0.5)
    else:  # task_priority
        a, b = torch.ones_like(dot), lam_t.clamp(max=1.0)
    # T' = T - p R with p = T.R / |R|^2 on a conflict, so G = a T' + b R = a T + (b - a p) R.
    proj = torch.where(conflict, dot / torch.where(both, rr, 1.0), 0.0) if project else torch.zeros_like(dot)
    has_retain = rr > 0
    alpha = torch.where(has_retain, a, 1.0)
    beta = torch.where(has_retain, b - a * proj, 0.0)

    grad_norm = (alpha * alpha * tt + 2.0 * alpha * beta * dot + beta * beta * rr).clamp_min(0.0).sqrt()
    if max_norm is not None:
        clip = clip_coefficient(grad_norm, max_norm)
        alpha, beta = alpha * clip, beta * clip
    alpha = torch.where(found_inf > 0, torch.nan, alpha)  # never apply a non-finite step silently
    return {
        "cos": cos,
        "conflict": conflict.float(),
        "alpha": alpha,
        "beta": beta,
        "task_norm": task_norm,
        "retain_norm": retain_norm,
        "grad_norm": grad_norm,
        "found_inf": found_inf,
    }


def merge_(
    task: Union[FlatGrads, torch.Tensor],
    retain: Union[FlatGrads, torch.Tensor, None],
    coefficients: dict[str, torch.Tensor],
) -> None:
    """T <- alpha T + beta R in place, one fused pass per dtype group (T <- alpha T without R)."""
    if retain is None:
        for t in _flats(task, "task"):
            t.mul_(coefficients["alpha"])
        return
    coef = torch.stack([coefficients["alpha"], coefficients["beta"]]).float()
    for t, r in _pairs(task, retain):
        ops.grad_combine_(t, r, coef)


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (|G| + 1e-6)) as a device tensor: ``clip_grad_norm_``'s factor, from a known norm."""
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r}: expected a number > 0")
    return (max_norm / (grad_norm + _CLIP_EPS)).clamp(max=1.0)


def loss_scale(scaler: Optional[torch.amp.GradScaler]) -> Optional[torch.Tensor]:
    """The scaler's current scale as a device tensor (no host read), or None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()  # the public get_scale() would read it on the host
    if scale is None:
        raise ValueError("scaler: it has not scaled a loss yet; call scaler.scale(loss).backward() first")
    return scale


def _pairs(task, retain) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (T, R) flat buffers, validated on metadata only."""
    ts, rs = _flats(task, "task"), _flats(retain, "retain")
    if len(ts) != len(rs):
        raise ValueError(f"task has {len(ts)} dtype groups but retain has {len(rs)}")
    for i, (t, r) in enumerate(zip(ts, rs)):
        if t.shape != r.shape or t.dtype != r.dtype or t.device != r.device:
            raise ValueError(
                f"group {i}: task is {t.dtype}[{t.numel()}] on {t.device}, retain is {r.dtype}[{r.numel()}] on "
                f"{r.device}; they must match"
            )
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"the buffers span several devices {sorted(map(str, devices))}; use one set per device")
    return list(zip(ts, rs))


def _flats(x, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, FlatGrads):
        return x.flats
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"{name}: expected a 1-D contiguous tensor, got shape {tuple(x.shape)}")
        return (x,)
    raise TypeError(f"{name}: expected FlatGrads or a 1-D tensor, got {type(x).__name__}")


def _check_options(lam, tau: float, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau!r}: a cosine threshold must be in [-1, 1]")
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam: expected a float or a 0-d tensor, got shape {tuple(lam.shape)}")
    elif not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam={lam!r}: expected a finite number >= 0")


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
