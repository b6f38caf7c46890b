// CUDA grad_combine_: a <- coef[0] a + coef[1] b in place; coef is read from device memory, so the
// coefficients computed on the GPU are used without a host round trip. 16-byte loads and stores
// (after a scalar head when both buffers sit at the same offset from 16 bytes), grid-stride loop,
// scalar tail.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace craft::cuda {
namespace {

template <typename T>
__global__ void combine_kernel(T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ coef,
                               int64_t coef_stride, int64_t n, PackSplit split) {
  constexpr int V = 16 / sizeof(T);
  const float c0 = coef[0], c1 = coef[coef_stride];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto* pa = reinterpret_cast<Pack<T, V>*>(a + split.head);
  const auto* pb = reinterpret_cast<const Pack<T, V>*>(b + split.head);
  for (int64_t i = start; i < split.packs; i += stride) {
    Pack<T, V> x = pa[i];
    const Pack<T, V> y = pb[i];
#pragma unroll
    for (int k = 0; k < V; ++k) x.v[k] = static_cast<T>(fmaf(c0, to_float(x.v[k]), c1 * to_float(y.v[k])));
    pa[i] = x;
  }
  const int64_t scalars = split.scalars(n, V);
  for (int64_t j = start; j < scalars; j += stride) {
    const int64_t i = split.scalar_index(j, V);
    a[i] = static_cast<T>(fmaf(c0, to_float(a[i]), c1 * to_float(b[i])));
  }
}

void grad_combine_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef) {
  check_buffer_pair(a, b, "a", "b");
  check_coef(coef, a);  // any float32[2] view: read through its stride
  const int64_t n = a.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_type(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* pa = a.mutable_data_ptr<T>();
    const T* pb = b.const_data_ptr<T>();
    const PackSplit split = split_for_packs<T>(pa, pb, n);
    const int blocks = grid_for(std::max(split.packs, split.scalars(n, 16 / sizeof(T))), a.get_device());
    combine_kernel<T><<<blocks, kThreads, 0, stream>>>(pa, pb, coef.const_data_ptr<float>(), coef.stride(0), n, split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace craft::cuda

TORCH_LIBRARY_IMPL(craft, CUDA, m) { m.impl("grad_combine_", &craft::cuda::grad_combine_cuda); }
