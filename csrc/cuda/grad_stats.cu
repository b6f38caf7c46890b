// CUDA grad_stats: (a.b, a.a, b.b) in one pass. Stage 1: grid-stride loop with 16-byte loads (see
// PackSplit for offset views),
// per-thread double accumulators, one partial per block. Stage 2: one block sums the partials in a
// fixed order. No atomics, so the result is bitwise reproducible; no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace craft::cuda {
namespace {

template <typename T>
__global__ void stats_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, PackSplit split,
                                     double* __restrict__ partial) {
  constexpr int V = 16 / sizeof(T);
  double acc[3] = {0.0, 0.0, 0.0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const auto* pa = reinterpret_cast<const Pack<T, V>*>(a + split.head);
  const auto* pb = reinterpret_cast<const Pack<T, V>*>(b + split.head);
  for (int64_t i = start; i < split.packs; i += stride) {
    const Pack<T, V> x = pa[i], y = pb[i];
    float ab = 0.f, aa = 0.f, bb = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float u = to_float(x.v[k]), w = to_float(y.v[k]);
      ab = fmaf(u, w, ab);
      aa = fmaf(u, u, aa);
      bb = fmaf(w, w, bb);
    }
    acc[0] += ab;
    acc[1] += aa;
    acc[2] += bb;
  }
  const int64_t scalars = split.scalars(n, V);
  for (int64_t j = start; j < scalars; j += stride) {
    const int64_t i = split.scalar_index(j, V);
    const double u = to_float(a[i]), w = to_float(b[i]);
    acc[0] += u * w;
    acc[1] += u * u;
    acc[2] += w * w;
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) partial[3 * blockIdx.x + k] = acc[k];
  }
}

__global__ void stats_final_kernel(const double* __restrict__ partial, int blocks, float* __restrict__ out) {
  double acc[3] = {0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < blocks; i += blockDim.x)
    for (int k = 0; k < 3; ++k) acc[k] += partial[3 * i + k];
  block_sum(acc);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) out[k] = static_cast<float>(acc[k]);
}

at::Tensor grad_stats_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_buffer_pair(a, b, "a", "b");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.numel();
  at::Tensor out = at::empty({3}, a.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_type(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* pa = a.const_data_ptr<T>();
    const T* pb = b.const_data_ptr<T>();
    const PackSplit split = split_for_packs<T>(pa, pb, n);
    const int blocks = n == 0 ? 0 : grid_for(std::max(split.packs, split.scalars(n, 16 / sizeof(T))), a.get_device());
    at::Tensor partial = at::empty({3 * std::max(blocks, 1)}, a.options().dtype(at::kDouble));
    if (blocks > 0) {
      stats_partial_kernel<T><<<blocks, kThreads, 0, stream>>>(pa, pb, n, split,
                                                                partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    stats_final_kernel<<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), blocks,
                                                   out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// grad_stats over the concatenation of pieces: stage 1 runs on each piece in turn, writing its blocks'
// partials into one array, and stage 2 sums them all in a fixed order. Deterministic, no host sync; the
// partials are per piece, so the result equals grad_stats of the concatenation to rounding, not bitwise.
at::Tensor grad_stats_pieces_cuda(at::TensorList a, at::TensorList b) {
  const int64_t pieces = static_cast<int64_t>(a.size());
  TORCH_CHECK(pieces >= 1, "craft: grad_stats_pieces needs at least one piece");
  TORCH_CHECK(static_cast<int64_t>(b.size()) == pieces, "craft: a and b must have the same number of pieces, got ",
              pieces, " and ", b.size());
  for (int64_t i = 0; i < pieces; ++i) {
    check_buffer_pair(a[i], b[i], "a[i]", "b[i]");
    TORCH_CHECK(a[i].scalar_type() == a[0].scalar_type() && a[i].device() == a[0].device(),
                "craft: every piece must have the dtype and device of the first (", a[0].scalar_type(), " on ",
                a[0].device(), "), piece ", i, " is ", a[i].scalar_type(), " on ", a[i].device());
  }
  const c10::cuda::CUDAGuard guard(a[0].device());
  at::Tensor out = at::empty({3}, a[0].options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_type(a[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    std::vector<PackSplit> splits(pieces);
    std::vector<int> blocks(pieces, 0);
    int64_t total = 0;
    for (int64_t i = 0; i < pieces; ++i) {
      const int64_t n = a[i].numel();
      splits[i] = split_for_packs<T>(a[i].const_data_ptr<T>(), b[i].const_data_ptr<T>(), n);
      blocks[i] = n == 0 ? 0 : grid_for(std::max(splits[i].packs, splits[i].scalars(n, 16 / sizeof(T))), a[0].get_device());
      total += blocks[i];
    }
    TORCH_CHECK(total <= std::numeric_limits<int>::max(), "craft: grad_stats_pieces: too many pieces");
    at::Tensor partial = at::empty({3 * std::max<int64_t>(total, 1)}, a[0].options().dtype(at::kDouble));
    double* pp = partial.mutable_data_ptr<double>();
    int64_t offset = 0;
    for (int64_t i = 0; i < pieces; ++i) {
      if (blocks[i] == 0) continue;
      stats_partial_kernel<T><<<blocks[i], kThreads, 0, stream>>>(a[i].const_data_ptr<T>(), b[i].const_data_ptr<T>(),
                                                                   a[i].numel(), splits[i], pp + 3 * offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset += blocks[i];
    }
    stats_final_kernel<<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), static_cast<int>(total),
                                                   out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace craft::cuda

TORCH_LIBRARY_IMPL(craft, CUDA, m) {
  m.impl("grad_stats", &craft::cuda::grad_stats_cuda);
  m.impl("grad_stats_pieces", &craft::cuda::grad_stats_pieces_cuda);
}
