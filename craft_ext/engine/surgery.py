"""The CRaFT gradient surgery on flat gradient buffers (docs/architecture.md, "The step").

The surgery is two fused passes over the flat pieces of craft_ext.engine.grad_buffers
(``grad_stats`` / ``grad_stats_pieces`` per dtype group, then ``grad_combine_`` per piece) instead of a
Python loop over hundreds of parameters. How the buffers are cut into pieces changes no result: the
stats of a group's pieces are bitwise (on the CPU) those of its concatenation, the combine is
elementwise.

Why no host synchronisation: the conflict test, the projection and the merge weights are computed
from the three scalars of ``grad_stats`` (and the step's L_ret) with tensor ops on the device, so a
step never waits for the GPU. Non-finite gradients are reported as a 0/1 tensor for the caller to act
on, and the merged gradient is then made all-NaN so it can never be applied silently.

Usage, one step (``GradBuffers`` from craft_ext.engine.grad_buffers)::

    bufs = GradBuffers(model)                     # after model.to(...); rebuild after any later .to()
    bufs.task.zero_(); bufs.use("task");   task_loss.backward()
    bufs.retain.zero_(); bufs.use("retain"); retention_loss.backward()
    bufs.use("task")                              # the optimiser reads param.grad = T's views
    out = surgery_(bufs.task, bufs.retain, lam.value, loss_ret=retention_loss.detach(), epsilon=eps,
                   max_norm=1.0)                  # G written into T
    optimizer.step()

On a step without a retention gradient pass ``retain=None``: G = T (clipped), one pass over T.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import ops
from .grad_buffers import FlatGrads

__all__ = [
    "surgery_",
    "surgery_stats",
    "surgery_coefficients",
    "merge_",
    "clip_coefficient",
]

MERGES = ("weighted", "equal", "task_priority")
PROJECT_MODES = ("active", "always", "never")
_CLIP_EPS = 1e-6  # the epsilon of torch.nn.utils.clip_grad_norm_, so clipping matches it exactly


def surgery_(
    task: Union[FlatGrads, torch.Tensor],
    retain: Union[FlatGrads, torch.Tensor, None],
    lam: Union[float, torch.Tensor],
    *,
    project: str = "active",
    loss_ret: Union[float, torch.Tensor, None] = None,
    epsilon: Union[float, torch.Tensor, None] = None,
    tau: float = 0.0,
    merge: str = "weighted",
    max_norm: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Merge T and R into G = alpha T + beta R, written into ``task`` in place; no host sync.

    ``task``/``retain``: ``FlatGrads`` or 1-D tensors of equal size and dtype. ``retain=None`` is a step
    without a retention gradient (plain fine-tuning, or a CRaFT step between retention steps): G = T,
    clipped, in one pass over T. ``lam``: the multiplier, a float or a 0-d tensor on the buffers' device.

    The merge is G0 = T + b R, with b by ``merge``: ``weighted`` lam, ``equal`` 1, ``task_priority``
    min(lam, 1). T keeps weight 1 in every merge, as on steps without retention, so G is continuous in
    R: G -> T as R -> 0 (an ``equal`` of (T + R) / 2 would halve the step on every retention step
    with a small R). ``equal`` is the Lagrangian step with the multiplier pinned at 1.

    ``project`` says when the part of the step that raises L_ret is removed:

    - ``active`` (default): only while the constraint is violated (``loss_ret > epsilon``, compared on
      the device) and the merged step would still raise L_ret to first order (G0.R < 0); then G is G0
      without its component along R (A-GEM's projection of the Lagrangian step), i.e. G = T - (T.R /
      |R|^2) R. With slack it is the plain Lagrangian step, so the constrained optimum, where G0 = 0, is
      a fixed point of the iteration. (Projecting T instead, as ``always`` does, while violated
      removes the task pull only on one side of the boundary: on the toy problem x then chatters in
      [0.89, 1.1] and lambda settles near 1, not 2.) Needs ``loss_ret`` (this step's L_ret, a 0-d device
      tensor or a float) and ``epsilon``.
    - ``always``: PCGrad on T whenever cos(T, R) < ``tau``, slack or not: G = T - (T.R/|R|^2) R + b R.
      At an active constraint's optimum T and R are anti-parallel, so T' + lam R cannot vanish there:
      the iteration ends at a feasible point with lambda -> 0 and gives away task loss (on
      min (x-3)^2 s.t. x^2 <= 1: x ~ 0.3, lambda = 0 instead of x = 1, lambda = 2).
    - ``never``: G = G0.

    ``tau`` is the cosine threshold of ``always`` and of the ``conflict`` metric; the other rules need
    tau = 0. ``max_norm`` clips G like ``clip_grad_norm_`` at no extra cost (folded into alpha and beta).

    Returns 0-d float32 device tensors: ``cos``, ``conflict`` (0/1: cos(T, R) < tau), ``projected``
    (0/1: this step removed a component along R), ``alpha``, ``beta``, ``task_norm``, ``retain_norm``,
    ``grad_norm`` (|G| before clipping, from the stats) and ``found_inf`` (0/1: T or R had NaN/Inf; G is
    then all NaN, so skip the step). Sharded (FSDP2) buffers need
    ``craft_ext.engine.distributed.distributed_surgery_`` (the stats must be summed over ranks).
    """
    if isinstance(task, FlatGrads) and task.sharded:
        raise ValueError("surgery_: these buffers hold FSDP2 shards; use craft_ext.engine.distributed.distributed_surgery_")
    stats = surgery_stats(task, retain)
    if retain is None:
        _check_options(lam, tau, merge, project)
        out = surgery_coefficients(stats, 0.0, project="never", max_norm=max_norm)  # nothing to weigh: G = T
    else:
        out = surgery_coefficients(
            stats, lam, project=project, loss_ret=loss_ret, epsilon=epsilon, tau=tau, merge=merge, max_norm=max_norm
        )
    merge_(task, retain, out)
    return out


def surgery_stats(task: Union[FlatGrads, torch.Tensor], retain: Union[FlatGrads, torch.Tensor, None]) -> torch.Tensor:
    """float32[3] = (T.R, |T|^2, |R|^2) summed over the dtype groups, on the buffers' device
    ((0, |T|^2, 0) when ``retain`` is None)."""
    if retain is None:
        only_tt = None
        for t in _groups(task, "task"):
            tt = _group_stats(t, t)[1]
            only_tt = tt if only_tt is None else only_tt + tt
        zero = torch.zeros_like(only_tt)
        return torch.stack([zero, only_tt, zero])
    _pairs(task, retain)  # validates the pieces pairwise
    groups = list(zip(_groups(task, "task"), _groups(retain, "retain")))
    stats = _group_stats(*groups[0])
    for t, r in groups[1:]:
        stats = stats + _group_stats(t, r)
    return stats


def _group_stats(t: tuple[torch.Tensor, ...], r: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The stats of one dtype group: of its one buffer, or of its pieces' concatenation (bitwise the same on the CPU)."""
    return ops.grad_stats(t[0], r[0]) if len(t) == 1 else ops.grad_stats_pieces(t, r)


def surgery_coefficients(
    stats: torch.Tensor,
    lam: Union[float, torch.Tensor],
    *,
    project: str = "active",
    loss_ret: Union[float, torch.Tensor, None] = None,
    epsilon: Union[float, torch.Tensor, None] = None,
    tau: float = 0.0,
    merge: str = "weighted",
    max_norm: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """The surgery's decisions and merge weights from the stats (and L_ret) alone, on device (see
    ``surgery_``, whose arguments these are)."""
    _check_options(lam, tau, merge, project)
    if project == "active" and (loss_ret is None or epsilon is None):
        raise ValueError(
            "project='active' projects only while the constraint is violated: pass loss_ret (this step's "
            "retention loss) and epsilon, or choose project='always' or 'never'"
        )
    stats = stats.float()
    dot, tt, rr = stats.unbind()
    found_inf = (~torch.isfinite(stats).all()).float()
    task_norm, retain_norm = tt.sqrt(), rr.sqrt()
    both = (task_norm > 0) & (retain_norm > 0)
    cos = torch.where(both, dot / torch.where(both, task_norm * retain_norm, 1.0), 0.0).clamp(-1.0, 1.0)
    conflict = both & (cos < tau)

    lam_t = _device_scalar(lam, stats.device)
    if merge == "weighted":
        b = lam_t
    elif merge == "equal":
        b = torch.ones_like(dot)
    else:  # task_priority
        b = lam_t.clamp(max=1.0)
    # G = T + beta R. Removing R's component from a vector V: V - (V.R / |R|^2) R.
    along = dot / torch.where(rr > 0, rr, 1.0)  # T.R / |R|^2
    if project == "always":  # V = T: G = T' + b R
        projected = conflict
        beta = torch.where(projected, b - along, b)
    elif project == "active":  # V = G0 = T + b R, while the constraint is violated: G = T'
        violated = _device_scalar(loss_ret, stats.device) > _device_scalar(epsilon, stats.device)
        projected = violated & (rr > 0) & (dot + b * rr < 0)
        beta = torch.where(projected, -along, b)
    else:
        projected = torch.zeros_like(conflict)
        beta = b
    alpha = torch.ones_like(dot)

    grad_norm = (tt + 2.0 * beta * dot + beta * beta * rr).clamp_min(0.0).sqrt()
    if max_norm is not None:
        clip = clip_coefficient(grad_norm, max_norm)
        alpha, beta = alpha * clip, beta * clip
    alpha = torch.where(found_inf > 0, torch.nan, alpha)  # never apply a non-finite step silently
    return {
        "cos": cos,
        "conflict": conflict.float(),
        "projected": projected.float(),
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
    """T <- alpha T + beta R in place, one fused pass per piece (T <- alpha T without R)."""
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


def _pairs(task, retain) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (T, R) flat pieces, validated on metadata only."""
    ts, rs = _flats(task, "task"), _flats(retain, "retain")
    t_cut, r_cut = [len(g) for g in _groups(task, "task")], [len(g) for g in _groups(retain, "retain")]
    if t_cut != r_cut:
        raise ValueError(f"task has {t_cut} pieces per dtype group but retain has {r_cut}")
    for i, (t, r) in enumerate(zip(ts, rs)):
        if t.shape != r.shape or t.dtype != r.dtype or t.device != r.device:
            raise ValueError(
                f"piece {i}: task is {t.dtype}[{t.numel()}] on {t.device}, retain is {r.dtype}[{r.numel()}] on "
                f"{r.device}; they must match"
            )
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"the buffers span several devices {sorted(map(str, devices))}; use one set per device")
    return list(zip(ts, rs))


def _groups(x, name: str) -> tuple[tuple[torch.Tensor, ...], ...]:
    if isinstance(x, FlatGrads):
        return x.groups
    return tuple((t,) for t in _flats(x, name))


def _flats(x, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, FlatGrads):
        return x.flats
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"{name}: expected a 1-D contiguous tensor, got shape {tuple(x.shape)}")
        return (x,)
    raise TypeError(f"{name}: expected FlatGrads or a 1-D tensor, got {type(x).__name__}")


def _check_options(lam, tau: float, merge: str, project: str) -> None:
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r}: expected one of {MERGES}")
    if project not in PROJECT_MODES:
        raise ValueError(f"project={project!r}: expected one of {PROJECT_MODES}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau!r}: a cosine threshold must be in [-1, 1]")
    if tau != 0.0 and project != "always":
        raise ValueError(f"tau={tau!r} applies only to project='always' (project={project!r} needs tau=0)")
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam: expected a float or a 0-d tensor, got shape {tuple(lam.shape)}")
    elif not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam={lam!r}: expected a finite number >= 0")


def _device_scalar(x: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A float32 0-d tensor on ``device`` without a host read (a float is filled in, not copied)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar tensor, got shape {tuple(x.shape)}")
        return x.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(x), dtype=torch.float32, device=device)
