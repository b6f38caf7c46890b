// CUDA hidden_mse and its backward. The problem is [B, R, T, D] (see checks.h): R*T rows of D values
// per sample, rows of masked-out tokens are skipped without being read. Forward: grid (X, B), each
// block sums squared errors over a strided set of rows of one sample into a double partial; a second
// kernel sums each sample's partials in a fixed order and divides by the valid-element count
// (deterministic, no atomics). Backward: same grid, writes scale_b * (s - t) with
// scale_b = 2 grad_b / count_b, zeros on masked rows (which are not read).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace craft::cuda {
namespace {

constexpr int kVec = 4;  // elements per vector load (16 bytes of float32, 8 of 16-bit types)

struct Geometry {
  int64_t rows, tokens, dim;
  bool vectorised;  // dim % kVec == 0 and all base pointers aligned to a kVec pack
};

__device__ __forceinline__ bool row_kept(const bool* mask, int64_t b, int64_t r, int64_t tokens) {
  return mask == nullptr || mask[b * tokens + r % tokens];
}

template <typename S, typename T>
__device__ __forceinline__ float row_squared_error(const S* s, const T* t, int64_t dim, bool vectorised) {
  float acc = 0.f;
  if (vectorised) {
    const auto* ps = reinterpret_cast<const Pack<S, kVec>*>(s);
    const auto* pt = reinterpret_cast<const Pack<T, kVec>*>(t);
    for (int64_t i = threadIdx.x; i < dim / kVec; i += blockDim.x) {
      const Pack<S, kVec> x = ps[i];
      const Pack<T, kVec> y = pt[i];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = to_float(x.v[k]) - to_float(y.v[k]);
        acc = fmaf(d, d, acc);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float d = to_float(s[i]) - to_float(t[i]);
      acc = fmaf(d, d, acc);
    }
  }
  return acc;
}

template <typename S, typename T>
__global__ void mse_partial_kernel(const S* __restrict__ s, const T* __restrict__ t, const bool* __restrict__ mask,
                                   Geometry g, double* __restrict__ partial) {
  const int64_t b = blockIdx.y;
  double acc[1] = {0.0};
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    if (!row_kept(mask, b, r, g.tokens)) continue;
    const int64_t off = (b * g.rows + r) * g.dim;
    acc[0] += row_squared_error(s + off, t + off, g.dim, g.vectorised);
  }
  block_sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = acc[0];
}

// Valid elements of sample b, counted by the whole block (T is small).
__device__ double valid_elements(const bool* mask, int64_t b, const Geometry& g, int64_t layers) {
  if (mask == nullptr) return static_cast<double>(g.rows) * g.dim;
  double n[1] = {0.0};
  for (int64_t t = threadIdx.x; t < g.tokens; t += blockDim.x) n[0] += mask[b * g.tokens + t] ? 1.0 : 0.0;
  block_sum(n);
  __shared__ double total;
  if (threadIdx.x == 0) total = n[0] * layers * g.dim;
  __syncthreads();
  return total;
}

__global__ void mse_final_kernel(const double* __restrict__ partial, int parts, const bool* __restrict__ mask,
                                 Geometry g, int64_t layers, float* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const double count = valid_elements(mask, b, g, layers);
  double acc[1] = {0.0};
  for (int i = threadIdx.x; i < parts; i += blockDim.x) acc[0] += partial[b * parts + i];
  block_sum(acc);
  if (threadIdx.x == 0) out[b] = count > 0 ? static_cast<float>(acc[0] / count) : 0.f;
}

template <typename S, typename T>
__global__ void mse_backward_kernel(const float* __restrict__ grad, const S* __restrict__ s, const T* __restrict__ t,
                                    const bool* __restrict__ mask, Geometry g, int64_t layers, S* __restrict__ out) {
  const int64_t b = blockIdx.y;
  const double count = valid_elements(mask, b, g, layers);
  const float scale = count > 0 ? static_cast<float>(2.0 * grad[b] / count) : 0.f;
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    const int64_t off = (b * g.rows + r) * g.dim;
    if (!row_kept(mask, b, r, g.tokens)) {  // masked rows are never read: their gradient is 0
      for (int64_t i = threadIdx.x; i < g.dim; i += blockDim.x) out[off + i] = static_cast<S>(0.f);
      continue;
    }
    for (int64_t i = threadIdx.x; i < g.dim; i += blockDim.x)
      out[off + i] = static_cast<S>(scale * (to_float(s[off + i]) - to_float(t[off + i])));
  }
}

struct Prepared {
  at::Tensor student, teacher, mask;
  MseShape shape;
  Geometry geometry;
  int blocks_x;
};

Prepared prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask) {
  Prepared p;
  p.shape = check_hidden_mse(student, teacher, mask);
  TORCH_CHECK(student.is_cuda(), "craft: student must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(student.size(0) <= 65535, "craft: hidden_mse on CUDA supports at most 65535 samples per call, got ",
              student.size(0));
  p.student = student.contiguous();
  p.teacher = teacher.contiguous();
  if (mask.has_value()) p.mask = mask->contiguous();
  const MseShape& s = p.shape;
  const bool aligned = s.dim % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(p.student.const_data_ptr()) % (kVec * p.student.element_size()) == 0 &&
                       reinterpret_cast<uintptr_t>(p.teacher.const_data_ptr()) % (kVec * p.teacher.element_size()) == 0;
  p.geometry = Geometry{s.rows(), s.tokens, s.dim, aligned};
  // Blocks per sample: enough to fill the device across the batch, never more than the rows.
  const int64_t per_sample = std::max<int64_t>(1, device_blocks() / std::max<int64_t>(1, s.batch));
  p.blocks_x = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s.rows(), per_sample)));
  return p;
}

at::Tensor hidden_mse_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(student.device());
  Prepared p = prepare(student, teacher, mask);
  const MseShape& s = p.shape;
  at::Tensor out = at::empty({s.batch}, p.student.options().dtype(at::kFloat));
  if (s.batch == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* pm = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  at::Tensor partial = at::empty({s.batch * p.blocks_x}, out.options().dtype(at::kDouble));
  dispatch_mse_types(p.student.scalar_type(), p.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const dim3 grid(p.blocks_x, static_cast<unsigned>(s.batch));
    mse_partial_kernel<S, T><<<grid, kThreads, 0, stream>>>(p.student.const_data_ptr<S>(), p.teacher.const_data_ptr<T>(),
                                                            pm, p.geometry, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  mse_final_kernel<<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), p.blocks_x, pm, p.geometry, s.layers, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor hidden_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(student.device());
  Prepared p = prepare(student, teacher, mask);
  const MseShape& s = p.shape;
  check_hidden_mse_grad(grad, s, student);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty(p.student.sizes(), p.student.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* pm = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  dispatch_mse_types(p.student.scalar_type(), p.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const dim3 grid(p.blocks_x, static_cast<unsigned>(s.batch));
    mse_backward_kernel<S, T><<<grid, kThreads, 0, stream>>>(g.const_data_ptr<float>(), p.student.const_data_ptr<S>(),
                                                             p.teacher.const_data_ptr<T>(), pm, p.geometry, s.layers,
                                                             out.mutable_data_ptr<S>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace craft::cuda

TORCH_LIBRARY_IMPL(craft, CUDA, m) {
  m.impl("hidden_mse", &craft::cuda::hidden_mse_cuda);
  m.impl("hidden_mse_backward", &craft::cuda::hidden_mse_backward_cuda);
}
