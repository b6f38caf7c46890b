"""The ``grad_stats_pieces`` op: ``grad_stats`` of the concatenation of two lists of flat pieces without
concatenating them (the gradient storage of the step comes in pieces: craft_ext.engine.grad_buffers).
On the CPU it is bitwise ``grad_stats`` of the concatenation (the same chunks, partials and order), so
how T and R are cut changes no result; on CUDA it equals it to rounding, deterministically.
"""

from __future__ import annotations

import pytest
import torch

import craft_ext
from craft_ext import ops

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="craft_ext._C is not built")

CHUNK = 1 << 16  # the CPU kernels' fixed reduction chunk (csrc/cpu/lanes.h kChunk)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pieces(sizes, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(device=device, dtype=dtype) for n in sizes]


#: piece sizes around the chunk boundaries: straddling ones, empty ones, a chunk-sized one, a tail
SIZES = [
    [5],
    [CHUNK + 7, 0, 3, 2 * CHUNK + 5, CHUNK, 1],
    [1] * 40 + [CHUNK - 20],
    [0, CHUNK, 0],
    [3 * CHUNK + 11, CHUNK - 11, 0],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_grad_stats_pieces_is_bitwise_grad_stats_of_the_concatenation_on_cpu(sizes, dtype):
    a, b = _pieces(sizes, dtype, seed=1), _pieces(sizes, dtype, seed=2)
    got = ops.grad_stats_pieces(a, b)
    assert torch.equal(got, ops.grad_stats(torch.cat(a), torch.cat(b)))
    assert torch.equal(ops.grad_stats_pieces(a, a), ops.grad_stats(torch.cat(a), torch.cat(a)))
    torch.testing.assert_close(got, ops.grad_stats_pieces_reference(a, b), rtol=1e-5, atol=1e-3)


def test_grad_stats_pieces_of_nothing_is_zero_and_threads_change_nothing():
    assert ops.grad_stats_pieces([torch.empty(0)], [torch.empty(0)]).tolist() == [0.0, 0.0, 0.0]
    a, b = _pieces(SIZES[1], torch.float32, seed=3), _pieces(SIZES[1], torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ops.grad_stats_pieces(a, b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_grad_stats_pieces_refuses_mismatched_pieces():
    a = [torch.ones(3), torch.ones(4)]
    with pytest.raises(RuntimeError, match="same number of pieces"):
        ops.grad_stats_pieces(a, a[:1])
    with pytest.raises(RuntimeError, match="same number of elements"):
        ops.grad_stats_pieces(a, [torch.ones(3), torch.ones(5)])
    with pytest.raises(RuntimeError, match="dtype and device of the first"):
        mixed = [torch.ones(3), torch.ones(4, dtype=torch.bfloat16)]
        ops.grad_stats_pieces(mixed, mixed)
    with pytest.raises(ValueError, match="at least one piece"):
        ops.grad_stats_pieces([], [])


def test_grad_stats_pieces_has_a_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = [torch.empty(5), torch.empty(7)]
        out = ops.grad_stats_pieces(a, a)
    assert out.shape == (3,) and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_stats_pieces_on_cuda_is_the_concatenation_to_rounding(dtype):
    sizes = SIZES[1] + [10**6 + 3]
    a, b = _pieces(sizes, dtype, "cuda", seed=5), _pieces(sizes, dtype, "cuda", seed=6)
    a[2] = torch.randn(8, device="cuda").to(dtype)[1:4]  # an unaligned piece
    got = ops.grad_stats_pieces(a, b)
    torch.testing.assert_close(got, ops.grad_stats(torch.cat(a), torch.cat(b)), rtol=1e-5, atol=1e-3)
    assert torch.equal(got, ops.grad_stats_pieces(a, b))  # deterministic
