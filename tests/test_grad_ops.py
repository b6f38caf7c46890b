"""grad_stats and grad_combine_ against float64 references, opcheck, determinism, bad input.

Every case runs on the CPU and, where CUDA exists, on the GPU. CRAFT_TEST_SMALL=1 drops the large
cases (benchmarks/gpu_check.sh sets it under compute-sanitizer, where every access is instrumented).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import craft_ext  # noqa: F401  (loads the kernels)
from craft_ext import ops

SMALL = os.environ.get("CRAFT_TEST_SMALL") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4095] + ([] if SMALL else [2**20 + 3])


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


SENTINEL = 7.0


def _offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values in a view that starts `offset` elements into a larger buffer (so not 16-byte
    aligned for offset > 0); the elements before the view hold SENTINEL."""
    buf = torch.full((t.numel() + offset,), SENTINEL, dtype=t.dtype, device=t.device)
    buf[offset:] = t
    return buf[offset:]


# (offset of a, offset of b): both shifted alike (scalar head, then 16-byte packs) or differently (scalar)
OFFSETS = [(1, 1), (3, 3), (1, 0), (0, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", [5, 4099] + ([] if SMALL else [2**18 + 13]))
def test_unaligned_views_match_float64(device, dtype, offsets, n):
    a0, b0 = _buffers(n, dtype, device, seed=n + offsets[0])
    a, b = _offset(a0, offsets[0]), _offset(b0, offsets[1])
    assert a.data_ptr() % 16 != 0 or b.data_ptr() % 16 != 0
    got = ops.grad_stats(a, b)
    ref = ops.grad_stats_reference(a0, b0)
    scale = float((ref[1] * ref[2]).sqrt()) + 1e-30
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * scale
    torch.testing.assert_close(got[1:].cpu(), ref[1:].cpu(), rtol=1e-5, atol=0)

    coef = torch.tensor([0.75, -1.3], device=device)
    expected = ops.grad_combine_reference(a0, b0, coef)
    ops.grad_combine_(a, b, coef)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(a.float().cpu(), expected.float().cpu(), rtol=tol, atol=tol)
    assert torch.all(a._base[: offsets[0]] == SENTINEL)  # nothing written before the view
    torch.testing.assert_close(b, b0, rtol=0, atol=0)  # b is only read


@pytest.mark.parametrize("device", DEVICES)
def test_coef_may_be_any_float32_view(device):
    """A strided or expanded coef is read through its stride: same result on every device."""
    a = torch.ones(8, device=device)
    coef = torch.tensor([2.0, 99.0, 3.0, 99.0], device=device)[::2]
    assert not coef.is_contiguous()
    ops.grad_combine_(a, torch.ones(8, device=device), coef)
    torch.testing.assert_close(a, torch.full((8,), 5.0, device=device), rtol=0, atol=0)

    a = torch.ones(8, device=device)
    ops.grad_combine_(a, torch.ones(8, device=device), torch.tensor([0.25], device=device).expand(2))
    torch.testing.assert_close(a, torch.full((8,), 0.5, device=device), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.craft.grad_combine_.default, (a, a.clone(), coef))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_on_unaligned_views(device, dtype):
    a0, b0 = _buffers(1031, dtype, device, seed=12)
    a, b = _offset(a0, 1), _offset(b0, 1)
    torch.library.opcheck(torch.ops.craft.grad_stats.default, (a, b))
    coef = torch.tensor([1.0, 0.25], device=device)
    torch.library.opcheck(torch.ops.craft.grad_combine_.default, (_offset(a0, 3), b, coef))


def test_float16_conversions_round_like_torch():
    """Every float16 bit pattern through the CPU's float16 path (F16C where the CPU has it): values come
    back bitwise, NaN stays NaN, and a scaled value is rounded to nearest even exactly as torch rounds."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    nan = torch.isnan(values)
    for c0 in (1.0, 0.5, 3.0, -1.0 / 3.0):
        a = values.clone()
        ops.grad_combine_(a, torch.full_like(a, -0.0), torch.tensor([c0, 0.0]))  # + (-0) keeps -0 at -0
        expected = (values.float() * c0).half()
        assert torch.equal(torch.isnan(a), torch.isnan(expected))
        assert torch.equal(a[~nan].view(torch.int16), expected[~nan].view(torch.int16)), c0
    finite = values[torch.isfinite(values)]
    torch.testing.assert_close(ops.grad_stats(finite, finite), ops.grad_stats_reference(finite, finite), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(SMALL, reason="CRAFT_TEST_SMALL=1: large cases off")
def test_more_than_2_31_elements_on_cuda():
    """pi0-fast's flat gradient holds 3.45e9 elements: indices past 2^31 must be reached, exactly once."""
    n = 2**31 + 2**20 + 5
    need = 2 * n * 2 + n  # two bfloat16 buffers and a bool temporary
    if torch.cuda.mem_get_info()[0] < 1.2 * need:
        pytest.skip(f"needs {1.2 * need / 2**30:.1f} GiB of free GPU memory")
    far = torch.tensor([3, 2**31 - 1, 2**31, 2**31 + 7, n - 1], device="cuda")
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device="cuda", dtype=torch.bfloat16)
    a = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    b = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    a[far] = vals
    for x, y, count in ((a, b, n), (a[1:], b[1:], n - 1)):  # aligned, and the scalar head + packs path
        stats = ops.grad_stats(x, y).cpu()
        assert stats[0] == 15.0 and stats[1] == 55.0, stats
        torch.testing.assert_close(stats[2], torch.tensor(float(count)), rtol=1e-6, atol=0)
    ops.grad_combine_(a[1:], b[1:], torch.tensor([2.0, 0.5], device="cuda"))
    assert a[0] == 0  # before the view: untouched
    torch.testing.assert_close(a[far].float(), 2 * vals.float() + 0.5)
    assert int((a[1:] != 0.5).sum()) == len(far)
    del a, b
    torch.cuda.empty_cache()


def test_bad_input_is_rejected_alike_by_the_fake_kernels():
    """Under FakeTensor tracing (torch.compile) the fake kernels raise what the real ones raise."""
    cases = [
        ((torch.zeros(4, 4), torch.zeros(4, 4)), "a must be a 1-D"),
        ((torch.zeros(4), torch.zeros(5)), "same number of elements"),
        ((torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), "a must be float32"),
        ((torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)), "same dtype"),
        ((torch.zeros(8)[::2], torch.zeros(4)), "a must be contiguous"),
    ]
    coefs = [(torch.ones(3), "coef must be a float32 tensor of shape"), (torch.ones(2).double(), "coef must be a float32")]
    for fake in (False, True):
        mode = FakeTensorMode() if fake else contextlib.nullcontext()
        convert = mode.from_tensor if fake else (lambda t: t)
        for (a, b), message in cases:
            x, y, ones = convert(a), convert(b), convert(torch.ones(2))
            with mode:
                with pytest.raises(RuntimeError, match=message):
                    torch.ops.craft.grad_stats(x, y)
                with pytest.raises(RuntimeError, match=message):
                    torch.ops.craft.grad_combine_(x, y, ones)
        for coef, message in coefs:
            a, c = convert(torch.zeros(4)), convert(coef)
            with mode, pytest.raises(RuntimeError, match=message):
                torch.ops.craft.grad_combine_(a, a, c)


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
