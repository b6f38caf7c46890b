"""The retention step in two backward passes, without storing R (docs/architecture.md, "Memory").

Why: the merge G = alpha T + beta R needs the stats (T.R, |T|^2, |R|^2) of all of R before any
coefficient is known, so the one-pass step holds T and R whole at once in its surgery. Where that is
the step's peak (gradient checkpointing with a fused AdamW, whose optimizer step needs no scratch),
it is about one gradient buffer above lerobot's own step, whose gradients never all coexist with
anything that large.

Here the anchor backward runs twice over the same graph (``retain_graph``), with no storage bound
(``GradBuffers.use("none")``): each parameter's retention gradient is handed over as soon as autograd
has made it (a post-accumulate-grad hook; autograd hands over its own tensor, no copy) and dropped
right after. The first pass adds each one's share of (T.R, |R|^2) to the stats; the coefficients
follow from them (``surgery_coefficients``, on the device); the second pass writes alpha T + beta R
into each parameter's slice of T. So R is never stored: at any time only the gradients the backward
is making exist, as in lerobot's own backward. The cost is a second anchor backward per retention step
(with gradient checkpointing it also recomputes the anchor pass's checkpointed layers) and per-parameter
instead of per-piece kernels on retention steps. The result equals the one-pass surgery's up to the
stats' summation order.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from .. import ops
from .grad_buffers import GradBuffers
from .surgery import surgery_coefficients, surgery_stats

__all__ = ["GradientTap", "two_pass_retention"]


class GradientTap:
    """Inside ``tapping(on_grad)``, hands every parameter's gradient to ``on_grad(index, grad)`` once the
    backward has accumulated it, then drops it (``param.grad = None``); yields the indices handed over.
    Outside, it does nothing (the task backward accumulates into T as usual)."""

    def __init__(self, bufs: GradBuffers) -> None:
        self._params = bufs.params
        self._on_grad: Optional[Callable[[int, torch.Tensor], None]] = None
        self._seen: set[int] = set()
        for i, p in enumerate(bufs.params):
            p.register_post_accumulate_grad_hook(self._hook(i))

    @contextlib.contextmanager
    def tapping(self, on_grad: Callable[[int, torch.Tensor], None]) -> Iterator[set[int]]:
        if self._on_grad is not None:
            raise RuntimeError("GradientTap.tapping: already tapping a backward")
        self._on_grad, self._seen = on_grad, set()
        try:
            yield self._seen
        finally:
            self._on_grad = None

    def _hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if self._on_grad is None:
                return
            self._seen.add(index)
            self._on_grad(index, param.grad.reshape(-1))
            param.grad = None

        return hook


def two_pass_retention(
    bufs: GradBuffers,
    tap: GradientTap,
    loss_ret: torch.Tensor,
    backward: Callable[..., None],
    lam: float,
    *,
    epsilon: float,
    **options,
) -> dict[str, torch.Tensor]:
    """Merge R = d loss_ret / d theta into T (which holds the whole task gradient) without storing R;
    returns ``surgery_coefficients``' outputs. ``backward(loss, **kwargs)`` runs a backward (the
    accelerator's); ``options``: the surgery's (project, tau, merge, max_norm). ``param.grad`` points at
    T again on return."""
    task = bufs.task
    slices = [g.reshape(-1) for g in task.grads]  # each parameter's slice of T (views)
    shares: list[torch.Tensor] = []

    def reduce(i: int, r: torch.Tensor) -> None:  # pass 1: this parameter's share of T.R and |R|^2
        shares.append(ops.grad_stats(slices[i], r))

    bufs.use("none")
    with tap.tapping(reduce):
        backward(loss_ret, retain_graph=True)
    whole_t = surgery_stats(task, None)  # (0, |T|^2, 0) over the pieces: T is read once more, whole
    found = torch.stack(shares).sum(dim=0) if shares else torch.zeros_like(whole_t)
    stats = torch.stack([found[0], whole_t[1], found[2]])
    out = surgery_coefficients(stats, lam, loss_ret=loss_ret.detach(), epsilon=epsilon, **options)
    coef = torch.stack([out["alpha"], out["beta"]]).float()

    def merge(i: int, r: torch.Tensor) -> None:  # pass 2: G's slice = alpha T + beta R
        ops.grad_combine_(slices[i], r, coef)

    with tap.tapping(merge) as merged:
        backward(loss_ret)
    for i in set(range(len(slices))) - merged:  # no retention gradient there: G = alpha T
        slices[i].mul_(out["alpha"])
    bufs.use("task")
    return out
