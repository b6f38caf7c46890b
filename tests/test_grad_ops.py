"""grad_stats and grad_combine_ against float64 references, opcheck, determinism, bad input."""

from __future__ import annotations

import pytest
import torch

import craft_ext  # noqa: F401  (loads the kernels)
from craft_ext import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4095, 2**20 + 3]


def _buffers(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g).to(dtype).to(device)
    b = (0.5 * torch.randn(n, generator=g) + 0.1).to(dtype).to(device)
    return a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_grad_stats_matches_float64(device, dtype, n):
    a, b = _buffers(n, dtype, device, seed=n)
    got = ops.grad_stats(a, b)
    ref = ops.grad_stats_reference(a, b)
    assert got.dtype == torch.float32 and got.shape == (3,) and got.device == a.device
    # The dot product can cancel, so its error is measured against |a||b|, the others relatively.
    scale = float((ref[1] * ref[2]).sqrt()) + 1e-30
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * scale
    torch.testing.assert_close(got[1:].cpu(), ref[1:].cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_grad_combine_matches_float64(device, dtype, n):
    a, b = _buffers(n, dtype, device, seed=n + 1)
    coef = torch.tensor([0.75, -1.3], device=device)
    expected = ops.grad_combine_reference(a, b, coef)
    ptr = a.data_ptr()
    ops.grad_combine_(a, b, coef)
    assert a.data_ptr() == ptr  # in place
    # computed in fp32 then rounded once to the buffer dtype: at most one ulp of the dtype off
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(a.float().cpu(), expected.float().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_stats_is_bitwise_deterministic(device):
    a, b = _buffers(3 * 2**18 + 11, torch.float32, device, seed=7)
    first = ops.grad_stats(a, b)
    for _ in range(5):
        assert torch.equal(ops.grad_stats(a, b), first)


def test_grad_stats_cpu_does_not_depend_on_thread_count():
    a, b = _buffers(5 * 2**16 + 5, torch.float32, "cpu", seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.grad_stats(a, b)
        torch.set_num_threads(max(2, threads))
        many = ops.grad_stats(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    a, b = _buffers(1031, dtype, device, seed=11)
    torch.library.opcheck(torch.ops.craft.grad_stats.default, (a, b))
    coef = torch.tensor([1.0, 0.25], device=device)
    torch.library.opcheck(torch.ops.craft.grad_combine_.default, (a.clone(), b, coef))


def test_nan_and_inf_propagate():
    a, b = _buffers(4099, torch.float32, "cpu", seed=5)
    a[17] = float("nan")
    b[4000] = float("inf")
    stats = ops.grad_stats(a, b)
    assert torch.isnan(stats[0]) and torch.isnan(stats[1]) and torch.isinf(stats[2])
    ops.grad_combine_(a, b, torch.tensor([1.0, 0.0]))
    assert torch.isnan(a[17]) and torch.isnan(a[4000])  # inf * 0 is nan: never silently dropped


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.zeros(4, 4), torch.zeros(4, 4)), "a must be a 1-D"),
        (lambda: (torch.zeros(4), torch.zeros(5)), "same number of elements"),
        (lambda: (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), "a must be float32"),
        (lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)), "same dtype"),
        (lambda: (torch.zeros(8)[::2], torch.zeros(4)), "a must be contiguous"),
        (lambda: (torch.zeros(4), torch.zeros(8)[::2]), "b must be contiguous"),
    ],
)
def test_bad_buffers_are_rejected_with_the_argument_named(make, message):
    a, b = make()
    with pytest.raises(RuntimeError, match=message):
        ops.grad_stats(a, b)
    with pytest.raises(RuntimeError, match=message):
        ops.grad_combine_(a, b, torch.ones(2))


@pytest.mark.parametrize(
    "coef, message",
    [
        (torch.ones(3), "coef must be a float32 tensor of shape \\[2\\]"),
        (torch.ones(2, dtype=torch.float64), "coef must be a float32"),
    ],
)
def test_bad_coef_is_rejected(coef, message):
    with pytest.raises(RuntimeError, match=message):
        ops.grad_combine_(torch.zeros(4), torch.zeros(4), coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_coef_must_live_on_the_buffers_device():
    a = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match="coef must be on a's device"):
        ops.grad_combine_(a, a.clone(), torch.ones(2))
    with pytest.raises(RuntimeError, match="same device"):
        ops.grad_stats(a, torch.zeros(4))
