"""hidden_mse and its backward against the float64 reference, gradcheck, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import craft_ext  # noqa: F401
from craft_ext import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STUDENT = [torch.float32, torch.bfloat16]
TEACHER = [torch.float32, torch.bfloat16, torch.float16]
# (shape, masked): [B, T, D] and [B, L, T, D] with masks, arbitrary [B, ...] without; awkward sizes
SHAPES = [
    ((0, 3, 8), True),
    ((1, 1, 1), True),
    ((3, 7, 5), True),
    ((2, 2, 19, 64), True),
    ((5, 2, 2, 2048), True),
    ((4, 4095), False),
    ((2, 3, 7, 11), False),
    ((1, 2**20 + 3), False),
]


def _inputs(shape, masked, sdtype, tdtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g).to(sdtype).to(device)
    teacher = (student.float().cpu() + 0.3 * torch.randn(shape, generator=g)).to(tdtype).to(device)
    mask = None
    if masked:
        mask = (torch.rand(shape[0], shape[-2], generator=g) > 0.3).to(device)
        if shape[0] > 1:
            mask[-1] = False  # one sample with nothing to compare
    return student, teacher, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sdtype", STUDENT)
@pytest.mark.parametrize("tdtype", TEACHER)
@pytest.mark.parametrize("shape, masked", SHAPES)
def test_forward_and_backward_match_float64(device, sdtype, tdtype, shape, masked):
    student, teacher, mask = _inputs(shape, masked, sdtype, tdtype, device, seed=sum(shape))
    s = student.clone().requires_grad_(True)
    got = ops.hidden_mse(s, teacher, mask)
    r = student.clone().requires_grad_(True)
    ref = ops.hidden_mse_reference(r, teacher, mask)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    if shape[0] == 0:
        return
    w = torch.linspace(0.5, 2.0, shape[0], device=device)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    assert s.grad.dtype == sdtype and s.grad.shape == student.shape
    tol = 1e-5 if sdtype == torch.float32 else 1e-2
    torch.testing.assert_close(s.grad.float(), r.grad.float(), rtol=tol, atol=tol * float(r.grad.abs().max()))


def test_fully_masked_sample_has_zero_loss_and_gradient():
    student, teacher, _ = _inputs((3, 2, 5, 8), False, torch.float32, torch.float32, "cpu", seed=1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    s = student.clone().requires_grad_(True)
    loss = ops.hidden_mse(s, teacher, mask)
    loss.sum().backward()
    assert loss[1] == 0 and loss[0] > 0 and loss[2] > 0
    assert torch.all(s.grad[1] == 0) and torch.any(s.grad[0] != 0)


def test_masked_tokens_are_not_read():
    """Garbage (NaN) under masked-out tokens must not leak into the loss or gradient."""
    student, teacher, _ = _inputs((2, 3, 6, 16), False, torch.float32, torch.float32, "cpu", seed=2)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for b in range(2):
        teacher[b][:, ~mask[b]] = float("nan")
    s = student.clone().requires_grad_(True)
    loss = ops.hidden_mse(s, teacher, mask)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 2, 4, 5, generator=g, requires_grad=True)
    teacher = torch.randn(3, 2, 4, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    # float32 op: finite differences with a large enough step and float32-level tolerances
    assert torch.autograd.gradcheck(
        lambda s: ops.hidden_mse(s, teacher, mask), (student,), eps=1e-2, atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [True, False])
def test_opcheck(device, masked):
    student, teacher, mask = _inputs((3, 2, 5, 12), masked, torch.float32, torch.bfloat16, device, seed=4)
    torch.library.opcheck(torch.ops.craft.hidden_mse.default, (student.requires_grad_(True), teacher, mask))
    grad = torch.rand(3, device=device)
    torch.library.opcheck(torch.ops.craft.hidden_mse_backward.default, (grad, student.detach(), teacher, mask))


def test_nan_propagates_unmasked():
    student = torch.zeros(2, 10)
    teacher = torch.zeros(2, 10)
    teacher[0, 3] = float("nan")
    loss = ops.hidden_mse(student, teacher)
    assert torch.isnan(loss[0]) and loss[1] == 0


@pytest.mark.parametrize(
    "student, teacher, mask, message",
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), None, "same shape"),
        (torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4), None, "student must be float32 or bfloat16"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64), None, "teacher must be"),
        (torch.zeros(2, 12), torch.zeros(2, 12), torch.ones(2, 12, dtype=torch.bool), "a mask needs student of shape"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), "mask must have shape"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 3), "mask must be bool"),
        (torch.zeros(()), torch.zeros(()), None, "batch dimension"),
    ],
)
def test_bad_input_names_the_argument(student, teacher, mask, message):
    with pytest.raises(RuntimeError, match=message):
        ops.hidden_mse(student, teacher, mask)
