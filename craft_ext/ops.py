"""The Python face of the craft custom ops, and their pure-PyTorch references.

Kernels (CPU and CUDA) are registered by the compiled extension under ``torch.ops.craft``; this module
adds the fake (meta) kernels used by torch.compile / FakeTensor tracing and the autograd formula of
``hidden_mse``. The ``*_reference`` functions define the semantics: tests and benchmarks compare the
kernels against them.

Semantics:
- ``grad_stats(a, b)`` -> float32[3] = (a.b, a.a, b.b) over 1-D contiguous float32/bfloat16/float16
  buffers of equal length and dtype, accumulated in fp32 or better. Empty buffers give zeros.
- ``grad_stats_pieces(a, b)`` -> float32[3]: ``grad_stats`` of the concatenations ``cat(a)`` and
  ``cat(b)`` of two lists of such buffers (a[i] and b[i] of equal length; one dtype and device),
  without concatenating them: gradient storage that comes in pieces. On the CPU the result is bitwise
  that of ``grad_stats(cat(a), cat(b))`` (the same chunks, partials and order); on CUDA it equals it to
  rounding (deterministic: partials per piece, summed in a fixed order).
- ``grad_combine_(a, b, coef)``: a <- coef[0] * a + coef[1] * b in place, computed in fp32; coef is a
  float32[2] tensor (any strides) on a's device, read by the kernel (no host synchronisation).
- ``hidden_mse(student, teacher, mask=None)`` -> float32[B]: per-sample mean of (student - teacher)^2
  over all non-batch dims. With a bool mask [B, T] (student [B, T, D] or [B, L, T, D]) masked-out
  tokens are excluded from sum and count. A sample with nothing to compare has loss 0 and zero
  gradient. Differentiable in ``student`` only (the teacher is a fixed target).
NaN and Inf in the inputs propagate to the outputs; they are never silently dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from .extension import _C, require_extension

__all__ = [
    "grad_stats",
    "grad_stats_pieces",
    "grad_combine_",
    "hidden_mse",
    "grad_stats_reference",
    "grad_stats_pieces_reference",
    "grad_combine_reference",
    "hidden_mse_reference",
]


# ---------------------------------------------------------------------------------------------
# References (float64 where it matters; used by tests and benchmarks)


def grad_stats_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.b, a.a, b.b) computed in float64, returned as float32[3]."""
    a64, b64 = a.double(), b.double()
    return torch.stack([a64 @ b64, a64 @ a64, b64 @ b64]).float()


def grad_stats_pieces_reference(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``grad_stats_reference`` of the concatenated pieces."""
    return grad_stats_reference(torch.cat(list(a)), torch.cat(list(b)))


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


def grad_stats_pieces(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """float32[3] = ``grad_stats(cat(a), cat(b))`` without the concatenation (bitwise on the CPU)."""
    a, b = list(a), list(b)
    if not a:  # an empty list has no device to dispatch on
        raise ValueError("craft: grad_stats_pieces needs at least one piece")
    return _op("grad_stats_pieces")(a, b)


def grad_combine_(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> None:
    """a <- coef[0] * a + coef[1] * b, in place; coef is float32[2] on a's device."""
    _op("grad_combine_")(a, b, coef)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample (masked) mean squared error, float32[B], differentiable in ``student``."""
    return _op("hidden_mse")(student, teacher, mask)


# ---------------------------------------------------------------------------------------------
# Argument checks of the fake (meta) kernels: the same conditions and messages as csrc/checks.h, so a
# mistake fails the same way under torch.compile / FakeTensor tracing as in eager mode.

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_grad_buffer(t: torch.Tensor, name: str) -> None:
    torch._check(t.dim() == 1, lambda: f"craft: {name} must be a 1-D flat gradient buffer, got a {t.dim()}-D tensor")
    torch._check(t.is_contiguous(), lambda: f"craft: {name} must be contiguous")
    torch._check(t.dtype in _GRAD_DTYPES, lambda: f"craft: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_buffer_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_grad_buffer(a, "a")
    _check_grad_buffer(b, "b")
    torch._check(
        a.numel() == b.numel(),
        lambda: f"craft: a and b must have the same number of elements, got {a.numel()} and {b.numel()}",
    )
    torch._check(a.dtype == b.dtype, lambda: f"craft: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    torch._check(a.device == b.device, lambda: f"craft: a and b must be on the same device, got {a.device} and {b.device}")


def _check_coef(coef: torch.Tensor, a: torch.Tensor) -> None:
    torch._check(
        coef.dtype == torch.float32 and coef.dim() == 1 and coef.numel() == 2,
        lambda: f"craft: coef must be a float32 tensor of shape [2], got {coef.dtype} {list(coef.shape)}",
    )
    torch._check(coef.device == a.device, lambda: f"craft: coef must be on a's device ({a.device}), got {coef.device}")


def _check_hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    torch._check(student.dim() >= 1, lambda: "craft: student must have a batch dimension, got a 0-D tensor")
    torch._check(
        student.shape == teacher.shape,
        lambda: f"craft: student and teacher must have the same shape, got {list(student.shape)} and {list(teacher.shape)}",
    )
    torch._check(
        student.dtype in (torch.float32, torch.bfloat16),
        lambda: f"craft: student must be float32 or bfloat16, got {student.dtype}",
    )
    torch._check(
        teacher.dtype in _GRAD_DTYPES, lambda: f"craft: teacher must be float32, bfloat16 or float16, got {teacher.dtype}"
    )
    torch._check(
        student.device == teacher.device,
        lambda: f"craft: student and teacher must be on the same device, got {student.device} and {teacher.device}",
    )
    if mask is None:
        return
    torch._check(
        student.dim() in (3, 4),
        lambda: f"craft: a mask needs student of shape [B, T, D] or [B, L, T, D], got {list(student.shape)}",
    )
    torch._check(mask.dtype == torch.bool, lambda: f"craft: mask must be bool, got {mask.dtype}")
    torch._check(
        mask.dim() == 2 and mask.shape[0] == student.shape[0] and mask.shape[1] == student.shape[-2],
        lambda: f"craft: mask must have shape [B, T] = [{student.shape[0]}, {student.shape[-2]}], got {list(mask.shape)}",
    )
    torch._check(
        mask.device == student.device,
        lambda: f"craft: mask must be on student's device ({student.device}), got {mask.device}",
    )


def _check_hidden_mse_grad(grad: torch.Tensor, student: torch.Tensor) -> None:
    torch._check(
        grad.dtype == torch.float32 and grad.dim() == 1 and grad.shape[0] == student.shape[0],
        lambda: f"craft: grad must be float32 of shape [{student.shape[0]}], got {grad.dtype} {list(grad.shape)}",
    )
    torch._check(grad.device == student.device, lambda: f"craft: grad must be on student's device, got {grad.device}")


if _C is not None:

    @torch.library.register_fake("craft::grad_stats")
    def _grad_stats_fake(a, b):
        _check_buffer_pair(a, b)
        return a.new_empty((3,), dtype=torch.float32)

    @torch.library.register_fake("craft::grad_stats_pieces")
    def _grad_stats_pieces_fake(a, b):
        torch._check(len(a) >= 1, lambda: "craft: grad_stats_pieces needs at least one piece")
        torch._check(
            len(b) == len(a), lambda: f"craft: a and b must have the same number of pieces, got {len(a)} and {len(b)}"
        )
        for x, y in zip(a, b):
            _check_buffer_pair(x, y)
            torch._check(
                x.dtype == a[0].dtype and x.device == a[0].device,
                lambda: f"craft: every piece must have the dtype and device of the first ({a[0].dtype} on {a[0].device})",
            )
        return a[0].new_empty((3,), dtype=torch.float32)

    @torch.library.register_fake("craft::grad_combine_")
    def _grad_combine_fake(a, b, coef):
        _check_buffer_pair(a, b)
        _check_coef(coef, a)
        return None

    # The real kernels return fresh contiguous tensors whatever the inputs' strides: so must these.
    @torch.library.register_fake("craft::hidden_mse")
    def _hidden_mse_fake(student, teacher, mask):
        _check_hidden_mse(student, teacher, mask)
        return student.new_empty((student.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("craft::hidden_mse_backward")
    def _hidden_mse_backward_fake(grad, student, teacher, mask):
        _check_hidden_mse(student, teacher, mask)
        _check_hidden_mse_grad(grad, student)
        return student.new_empty(student.shape)

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
