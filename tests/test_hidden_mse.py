"""hidden_mse and its backward against the float64 reference, gradcheck, opcheck, torch.compile,
bad input. Every case runs on the CPU and, where CUDA exists, on the GPU; CRAFT_TEST_SMALL=1 drops the
large cases (benchmarks/gpu_check.sh sets it under compute-sanitizer)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import craft_ext  # noqa: F401
from craft_ext import ops

SMALL = os.environ.get("CRAFT_TEST_SMALL") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STUDENT = [torch.float32, torch.bfloat16]
TEACHER = [torch.float32, torch.bfloat16, torch.float16]
# (shape, masked): [B, T, D] and [B, L, T, D] with masks, arbitrary [B, ...] without; awkward sizes.
# Large samples are split across several blocks (CUDA) or work items (CPU): (1, 2**18) and
# (2, 2, 300, 64) take the 16-byte vector path, (1, 2**20 + 3) the scalar one.
SHAPES = [
    ((0, 3, 8), True),
    ((1, 1, 1), True),
    ((3, 7, 5), True),
    ((2, 2, 19, 64), True),
    ((5, 2, 2, 2048), True),
    ((2, 2, 300, 64), True),
    ((4, 4095), False),
    ((2, 3, 7, 11), False),
    ((3, 0), False),
    ((1, 2**18), False),
] + ([] if SMALL else [((1, 2**20 + 3), False)])


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
    scale = float(r.grad.abs().max()) if r.grad.numel() else 0.0
    torch.testing.assert_close(s.grad.float(), r.grad.float(), rtol=tol, atol=tol * scale)


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


def _offset(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """The same values, viewed `offset` elements into a larger buffer: not 16-byte aligned."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    buf[offset:] = t.reshape(-1)
    return buf[offset:].view(t.shape)


def _layouts(student, teacher, mask):
    """The same problem with inputs that are not fresh contiguous tensors: (name, student, teacher, mask)."""
    yield "offset", _offset(student), _offset(teacher, 3), mask
    # permuted: stored as [..., D, T] and transposed back (the student of a model that keeps D first)
    yield "permuted", student.transpose(-1, -2).contiguous().transpose(-1, -2), teacher, mask
    wide = torch.cat([teacher, teacher], dim=-1)
    yield "strided", student, wide[..., : teacher.shape[-1]], None if mask is None else mask.t().contiguous().t()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sdtype, tdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape, masked", [((3, 2, 5, 16), True), ((2, 6, 40), False), ((2, 2, 9, 24), True)])
def test_non_contiguous_and_unaligned_inputs(device, sdtype, tdtype, shape, masked):
    student, teacher, mask = _inputs(shape, masked, sdtype, tdtype, device, seed=len(shape))
    r = student.clone().requires_grad_(True)
    ref = ops.hidden_mse_reference(r, teacher, mask)
    w = torch.linspace(0.5, 2.0, shape[0], device=device)
    (ref * w).sum().backward()
    for name, st, te, m in _layouts(student, teacher, mask):
        assert not (st.is_contiguous() and te.is_contiguous() and st.data_ptr() % 16 == 0 and te.data_ptr() % 16 == 0)
        s = st.detach().requires_grad_(True)
        got = ops.hidden_mse(s, te, m)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)
        (got * w).sum().backward()
        tol = 1e-5 if sdtype == torch.float32 else 1e-2
        torch.testing.assert_close(s.grad.float(), r.grad.float(), rtol=tol, atol=tol * float(r.grad.abs().max()),
                                   msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [True, False])
def test_opcheck_on_permuted_strided_and_unaligned_inputs(device, masked):
    student, teacher, mask = _inputs((3, 2, 5, 16), masked, torch.float32, torch.bfloat16, device, seed=9)
    grad = torch.rand(3, device=device)
    for name, st, te, m in _layouts(student, teacher, mask):
        torch.library.opcheck(torch.ops.craft.hidden_mse.default, (st.detach().requires_grad_(True), te, m))
        torch.library.opcheck(torch.ops.craft.hidden_mse_backward.default, (grad, st.detach(), te, m))
        # opcheck compares shapes, not strides: the fake kernels must also give the real outputs' strides
        for op, args in ((torch.ops.craft.hidden_mse, (st, te, m)), (torch.ops.craft.hidden_mse_backward, (grad, st, te, m))):
            real = op(*args)
            mode = FakeTensorMode()
            fake_args = [None if a is None else mode.from_tensor(a) for a in args]
            with mode:
                fake = op(*fake_args)
            assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype), (name, op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [True, False])
def test_is_bitwise_deterministic(device, masked):
    student, teacher, mask = _inputs((2, 2, 64, 256), masked, torch.float32, torch.bfloat16, device, seed=6)
    first = ops.hidden_mse(student, teacher, mask)
    for _ in range(3):
        assert torch.equal(ops.hidden_mse(student, teacher, mask), first)


def test_cpu_result_does_not_depend_on_thread_count():
    student, teacher, _ = _inputs((1, 5 * 2**16 + 7), False, torch.float32, torch.float32, "cpu", seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hidden_mse(student, teacher)
        torch.set_num_threads(max(2, threads))
        many = ops.hidden_mse(student, teacher)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_a_permuted_student_matches_eager(device):
    """inductor checks the real kernel's output strides against the fake kernel's: the backward of a
    [B, D, T] student seen as [B, T, D] is where a fake returning the student's strides fails."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 8, 5, generator=g).to(device)  # [B, D, T]
    teacher = torch.randn(2, 5, 8, generator=g).to(device)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool, device=device)

    def loss(s, t, m):
        return ops.hidden_mse(s.transpose(1, 2), t, m).sum()

    grads = []
    # no graph caches: their keys do not cover the fake kernels, so a stale entry could hide a change
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for fn in (loss, torch.compile(loss, backend="inductor", fullgraph=True)):
            s = base.clone().requires_grad_(True)
            value = fn(s, teacher, mask)
            value.backward()
            grads.append((value.detach(), s.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=0)


BAD_INPUT = [
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), None, "same shape"),
    (torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4), None, "student must be float32 or bfloat16"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64), None, "teacher must be"),
    (torch.zeros(2, 12), torch.zeros(2, 12), torch.ones(2, 12, dtype=torch.bool), "a mask needs student of shape"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), "mask must have shape"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 3), "mask must be bool"),
    (torch.zeros(()), torch.zeros(()), None, "batch dimension"),
]


@pytest.mark.parametrize("kernel", ["fake"] + DEVICES)
@pytest.mark.parametrize("student, teacher, mask, message", BAD_INPUT)
def test_bad_input_names_the_argument(kernel, student, teacher, mask, message):
    """The CPU and CUDA kernels and the fake ones (torch.compile's tracing) reject the same input the
    same way."""
    fake = kernel == "fake"
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    convert = mode.from_tensor if fake else (lambda t: t.to(kernel))
    s, t, m = convert(student), convert(teacher), None if mask is None else convert(mask)
    with mode:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.craft.hidden_mse(s, t, m)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.craft.hidden_mse_backward(convert(torch.ones(2)), s, t, m)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_bad_backward_grad_is_rejected(fake):
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    convert = mode.from_tensor if fake else (lambda t: t)
    s = convert(torch.zeros(2, 3, 4))
    for grad in (torch.ones(3), torch.ones(2, dtype=torch.float64)):
        with mode, pytest.raises(RuntimeError, match="grad must be float32 of shape \\[2\\]"):
            torch.ops.craft.hidden_mse_backward(convert(grad), s, s, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(SMALL, reason="CRAFT_TEST_SMALL=1: large cases off")
@pytest.mark.parametrize("masked", [False, True])
def test_more_than_2_31_elements_on_cuda(masked):
    """Offsets past 2^31 elements (sample 1 starts beyond it) must be computed in 64 bits."""
    shape = (2, 2, 2**18 + 64, 2048) if masked else (2, 2**30 + 2**20)
    n = torch.Size(shape).numel()
    assert n > 2**31
    need = 3 * 2 * n + n  # bfloat16 student, teacher, gradient; a bool temporary
    if torch.cuda.mem_get_info()[0] < 1.2 * need:
        pytest.skip(f"needs {1.2 * need / 2**30:.1f} GiB of free GPU memory")
    student = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    teacher = torch.zeros_like(student)
    flat = teacher.view(-1)
    per_sample = n // 2
    far = torch.tensor([5, per_sample - 1, per_sample, n - 2**20, n - 1], device="cuda")
    flat[far] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device="cuda", dtype=torch.bfloat16)
    mask = None
    count = torch.tensor([per_sample, per_sample], dtype=torch.float64)
    if masked:
        mask = torch.ones(2, shape[2], dtype=torch.bool, device="cuda")
        mask[1, 3] = False  # a row of sample 1 that holds none of the far values
        count[1] -= shape[1] * shape[3]
    loss = ops.hidden_mse(student.requires_grad_(True), teacher, mask)
    expected = torch.tensor([1.0 + 4.0, 9.0 + 16.0 + 25.0], dtype=torch.float64) / count
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-6, atol=0)
    # grad_b = count_b / 2 makes the gradient s - t = -t exactly
    (grad,) = torch.autograd.grad(loss, student, (count / 2).float().cuda())
    torch.testing.assert_close(grad.view(-1)[far].float(), -flat[far].float())
    assert int((grad != 0).sum()) == len(far)


def test_nan_propagates_unmasked():
    student = torch.zeros(2, 10)
    teacher = torch.zeros(2, 10)
    teacher[0, 3] = float("nan")
    loss = ops.hidden_mse(student, teacher)
    assert torch.isnan(loss[0]) and loss[1] == 0
