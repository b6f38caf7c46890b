"""The Python face of the craft custom ops, and their pure-PyTorch references.

Kernels (CPU and CUDA) are registered by the compiled extension under ``torch.ops.craft``; this module
adds the fake (meta) kernels used by torch.compile / FakeTensor tracing and the autograd formula of
``hidden_mse``. The ``*_reference`` functions define the semantics: tests and benchmarks compare the
kernels against them.

Semantics:
- ``grad_stats(a, b)`` -> float32[3] = (a.b, a.a, b.b) over 1-D contiguous float32/bfloat16/float16
  buffers of equal length and dtype, accumulated in fp32 or better. Empty buffers give zeros.
- ``grad_combine_(a, b, coef)``: a <- coef[0] * a + coef[1] * b in place, computed in fp32; coef is a
  float32[2] tensor on a's device, read by the kernel (no host synchronisation).
- ``hidden_mse(student, teacher, mask=None)`` -> float32[B]: per-sample mean of (student - teacher)^2
  over all non-batch dims. With a bool mask [B, T] (student [B, T, D] or [B, L, T, D]) masked-out
  tokens are excluded from sum and count. A sample with nothing to compare has loss 0 and zero
  gradient. Differentiable in ``student`` only (the teacher is a fixed target).
NaN and Inf in the inputs propagate to the outputs; they are never silently dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C, require_extension

__all__ = [
    "grad_stats",
    "grad_combine_",
    "hidden_mse",
    "grad_stats_reference",
    "grad_combine_reference",
    "hidden_mse_reference",
]


# ---------------------------------------------------------------------------------------------
# References (float64 where it matters; used by tests and benchmarks)


def grad_stats_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.b, a.a, b.b) computed in float64, returned as float32[3]."""
    a64, b64 = a.double(), b.double()
    return torch.stack([a64 @ b64, a64 @ a64, b64 @ b64]).float()


def grad_combine_reference(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef[0] * a + coef[1] * b in float64, cast back to a's dtype (out of place)."""
    c = coef.double()
    return (c[0] * a.double() + c[1] * b.double()).to(a.dtype)


def hidden_mse_reference(
    student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample masked mean squared error in float64, returned as float32[B]; differentiable."""
    diff = student.double() - teacher.double()
    sq = diff * diff
    batch = student.shape[0]
    if mask is None:
        count = torch.full((batch,), sq[0].numel() if batch else 0, dtype=torch.float64, device=sq.device)
        total = sq.flatten(1).sum(dim=1)
    else:
        if student.dim() == 4:  # [B, L, T, D]: the mask selects tokens in every layer
            keep = mask[:, None, :, None]
            count = mask.sum(dim=1).double() * student.shape[1] * student.shape[3]
        else:  # [B, T, D]
            keep = mask[:, :, None]
            count = mask.sum(dim=1).double() * student.shape[2]
        total = torch.where(keep, sq, torch.zeros_like(sq)).flatten(1).sum(dim=1)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe, torch.zeros_like(total)).float()


# ---------------------------------------------------------------------------------------------
# The ops


def _op(name: str):
    require_extension()
    return getattr(torch.ops.craft, name)


def grad_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32[3] = (a.b, a.a, b.b) in one fused pass, on a's device, no host sync."""
    return _op("grad_stats")(a, b)


def grad_combine_(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> None:
    """a <- coef[0] * a + coef[1] * b, in place; coef is float32[2] on a's device."""
    _op("grad_combine_")(a, b, coef)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample (masked) mean squared error, float32[B], differentiable in ``student``."""
    return _op("hidden_mse")(student, teacher, mask)


if _C is not None:

    @torch.library.register_fake("craft::grad_stats")
    def _grad_stats_fake(a, b):
        torch._check(a.dim() == 1 and b.dim() == 1, lambda: "craft: a and b must be 1-D flat gradient buffers")
        torch._check(a.shape == b.shape, lambda: "craft: a and b must have the same number of elements")
        torch._check(a.dtype == b.dtype, lambda: "craft: a and b must have the same dtype")
        return a.new_empty((3,), dtype=torch.float32)

    @torch.library.register_fake("craft::grad_combine_")
    def _grad_combine_fake(a, b, coef):
        torch._check(a.shape == b.shape, lambda: "craft: a and b must have the same number of elements")
        return None

    @torch.library.register_fake("craft::hidden_mse")
    def _hidden_mse_fake(student, teacher, mask):
        torch._check(student.shape == teacher.shape, lambda: "craft: student and teacher must have the same shape")
        return student.new_empty((student.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("craft::hidden_mse_backward")
    def _hidden_mse_backward_fake(grad, student, teacher, mask):
        return torch.empty_like(student)

    def _hidden_mse_setup_context(ctx, inputs, output):
        student, teacher, mask = inputs
        ctx.save_for_backward(student, teacher, mask)

    def _hidden_mse_backward(ctx, grad):
        student, teacher, mask = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = torch.ops.craft.hidden_mse_backward(grad.contiguous(), student, teacher, mask)
        return grad_student, None, None

    torch.library.register_autograd(
        "craft::hidden_mse", _hidden_mse_backward, setup_context=_hidden_mse_setup_context
    )
