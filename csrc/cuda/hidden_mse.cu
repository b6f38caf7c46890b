// CUDA hidden_mse and its backward. The problem is [B, R, T, D] (see checks.h). Every sample is split
// across blocks_x blocks, so a small batch still fills the device (B = 8 on a 132-SM H100 would
// otherwise keep 8 blocks busy):
// - unmasked: the sample is one flat range of elements, cut into blocks_x contiguous chunks;
// - masked: the sample's R*T rows of D values are cut into blocks_x runs of rows; each warp takes
//   whole rows, and the rows of masked-out tokens are skipped without being read.
// Loads are 16 bytes of the narrower dtype per thread (8 elements when the student or teacher is
// 16-bit, 4 for float/float) when the base pointers are 16-byte aligned and every row (unmasked: every
// sample) is a whole number of packs; otherwise one element at a time.
// Forward: each block writes one double partial, a second kernel sums a sample's partials in a fixed
// order and divides by the valid-element count (deterministic, no atomics). Backward: a small kernel
// computes scale_b = 2 grad_b / count_b, then the main kernel writes scale_b * (s - t) with the same
// split and vector width, zeros on masked rows (which are not read).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace craft::cuda {
namespace {

constexpr int kWarps = kThreads / 32;

// Elements per vector access: 16 bytes of the narrower of the two dtypes.
constexpr int vector_width(int64_t student_size, int64_t teacher_size) {
  return static_cast<int>(16 / (student_size < teacher_size ? student_size : teacher_size));
}

struct Geometry {
  int64_t per_sample;  // elements per sample
  int64_t rows, dim;   // masked: rows per sample, elements per row (one token of one layer)
  int64_t tokens;      // masked: tokens per layer; row r belongs to token r % tokens
  int64_t per_token;   // masked: elements per token over all layers (layers * dim)
  int64_t chunk;       // per block: packs of the sample (unmasked) or rows (masked)
  int64_t blocks_x;    // blocks per sample
};

// Sum of (s - t)^2 over the i-th packs of V values, in float. The packs are copied whole into
// registers first: that copy is what the compiler turns into 16-byte loads.
template <int V, typename S, typename T>
__device__ __forceinline__ float pack_squared_error(const Pack<S, V>* ps, const Pack<T, V>* pt, int64_t i) {
  const Pack<S, V> x = ps[i];
  const Pack<T, V> y = pt[i];
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float d = to_float(x.v[k]) - to_float(y.v[k]);
    acc = fmaf(d, d, acc);
  }
  return acc;
}

template <int V, typename S, typename T>
__global__ void mse_partial_kernel(const S* __restrict__ s, const T* __restrict__ t, const bool* __restrict__ mask,
                                   Geometry g, double* __restrict__ partial) {
  const int64_t b = blockIdx.x / g.blocks_x, x = blockIdx.x % g.blocks_x;
  const auto* ps = reinterpret_cast<const Pack<S, V>*>(s + b * g.per_sample);
  const auto* pt = reinterpret_cast<const Pack<T, V>*>(t + b * g.per_sample);
  double acc[1] = {0.0};
  if (mask == nullptr) {
    const int64_t end = min(g.per_sample / V, (x + 1) * g.chunk);
    for (int64_t i = x * g.chunk + threadIdx.x; i < end; i += blockDim.x) acc[0] += pack_squared_error<V>(ps, pt, i);
  } else {
    const int64_t packs_per_row = g.dim / V;
    const int64_t end = min(g.rows, (x + 1) * g.chunk);
    const int lane = threadIdx.x % 32;
    for (int64_t r = x * g.chunk + threadIdx.x / 32; r < end; r += kWarps) {
      if (!mask[b * g.tokens + r % g.tokens]) continue;
      float row = 0.f;
      for (int64_t i = r * packs_per_row + lane; i < (r + 1) * packs_per_row; i += 32)
        row += pack_squared_error<V>(ps, pt, i);
      acc[0] += row;
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

// Elements of sample b that count towards its mean, computed by the whole block (T is small).
__device__ double valid_elements(const bool* mask, int64_t b, const Geometry& g) {
  if (mask == nullptr) return static_cast<double>(g.per_sample);
  double n[1] = {0.0};
  for (int64_t t = threadIdx.x; t < g.tokens; t += blockDim.x) n[0] += mask[b * g.tokens + t] ? 1.0 : 0.0;
  block_sum(n);
  __shared__ double total;
  if (threadIdx.x == 0) total = n[0] * static_cast<double>(g.per_token);
  __syncthreads();
  return total;
}

__global__ void mse_final_kernel(const double* __restrict__ partial, const bool* __restrict__ mask, Geometry g,
                                 float* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const double count = valid_elements(mask, b, g);
  double acc[1] = {0.0};
  for (int64_t i = threadIdx.x; i < g.blocks_x; i += blockDim.x) acc[0] += partial[b * g.blocks_x + i];
  block_sum(acc);
  if (threadIdx.x == 0) out[b] = count > 0 ? static_cast<float>(acc[0] / count) : 0.f;
}

__global__ void mse_scale_kernel(const float* __restrict__ grad, const bool* __restrict__ mask, Geometry g,
                                 float* __restrict__ scale) {
  const int64_t b = blockIdx.x;
  const double count = valid_elements(mask, b, g);
  if (threadIdx.x == 0) scale[b] = count > 0 ? static_cast<float>(2.0 * grad[b] / count) : 0.f;
}

template <int V, typename S, typename T>
__device__ __forceinline__ Pack<S, V> pack_scaled_difference(const Pack<S, V>* ps, const Pack<T, V>* pt, int64_t i,
                                                             float scale) {
  const Pack<S, V> x = ps[i];
  const Pack<T, V> y = pt[i];
  Pack<S, V> out;
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = static_cast<S>(scale * (to_float(x.v[k]) - to_float(y.v[k])));
  return out;
}

template <int V, typename S, typename T>
__global__ void mse_backward_kernel(const float* __restrict__ scales, const S* __restrict__ s, const T* __restrict__ t,
                                    const bool* __restrict__ mask, Geometry g, S* __restrict__ out) {
  const int64_t b = blockIdx.x / g.blocks_x, x = blockIdx.x % g.blocks_x;
  const float scale = scales[b];
  const auto* ps = reinterpret_cast<const Pack<S, V>*>(s + b * g.per_sample);
  const auto* pt = reinterpret_cast<const Pack<T, V>*>(t + b * g.per_sample);
  auto* po = reinterpret_cast<Pack<S, V>*>(out + b * g.per_sample);
  if (mask == nullptr) {
    const int64_t end = min(g.per_sample / V, (x + 1) * g.chunk);
    for (int64_t i = x * g.chunk + threadIdx.x; i < end; i += blockDim.x)
      po[i] = pack_scaled_difference<V>(ps, pt, i, scale);
  } else {
    const int64_t packs_per_row = g.dim / V;
    const int64_t end = min(g.rows, (x + 1) * g.chunk);
    const int lane = threadIdx.x % 32;
    Pack<S, V> zero;
#pragma unroll
    for (int k = 0; k < V; ++k) zero.v[k] = static_cast<S>(0.f);
    for (int64_t r = x * g.chunk + threadIdx.x / 32; r < end; r += kWarps) {
      const bool kept = mask[b * g.tokens + r % g.tokens];
      for (int64_t i = r * packs_per_row + lane; i < (r + 1) * packs_per_row; i += 32)
        po[i] = kept ? pack_scaled_difference<V>(ps, pt, i, scale) : zero;  // masked rows are never read
    }
  }
}

struct Prepared {
  at::Tensor student, teacher, mask;
  MseShape shape;
  Geometry geometry;
  bool vectorised;  // 16-byte packs of vector_width() elements, else one element at a time
};

// Checks (before any dtype dispatch, so bad input gets the same message as on the CPU), contiguous
// inputs, and how the work is split.
Prepared prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask) {
  Prepared p;
  p.shape = check_hidden_mse(student, teacher, mask);
  TORCH_CHECK(student.is_cuda(), "craft: student must be a CUDA tensor for the CUDA kernel");
  p.student = student.contiguous();
  p.teacher = teacher.contiguous();
  if (mask.has_value()) p.mask = mask->contiguous();
  const MseShape& s = p.shape;
  const bool masked = p.mask.defined();
  const int vec = vector_width(p.student.element_size(), p.teacher.element_size());
  // A row (unmasked: the whole sample) must be whole packs so every sample and row starts aligned.
  const int64_t unit = masked ? s.dim : s.per_sample();
  p.vectorised = unit % vec == 0 && reinterpret_cast<uintptr_t>(p.student.const_data_ptr()) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(p.teacher.const_data_ptr()) % 16 == 0;
  const int v = p.vectorised ? vec : 1;
  // Work per sample: packs (unmasked) or rows (masked). Blocks per sample: enough to fill the device
  // across the batch, but at least a pack per thread (a row per warp) in every block. Depends only on
  // the device and the shape, so the reduction order is reproducible.
  const int64_t work = masked ? s.rows() : s.per_sample() / v;
  const int64_t min_per_block = masked ? kWarps : kThreads;
  const int64_t wanted = std::max<int64_t>(1, device_blocks(student.get_device()) / std::max<int64_t>(1, s.batch));
  int64_t blocks_x = std::max<int64_t>(1, std::min(wanted, (work + min_per_block - 1) / min_per_block));
  const int64_t chunk = (work + blocks_x - 1) / blocks_x;
  blocks_x = chunk == 0 ? 1 : (work + chunk - 1) / chunk;  // no block without work
  TORCH_CHECK(s.batch * blocks_x <= std::numeric_limits<int32_t>::max(),
              "craft: hidden_mse on CUDA supports at most 2^31 - 1 samples per call, got ", s.batch);
  p.geometry = Geometry{s.per_sample(), s.rows(), s.dim, s.tokens, s.layers * s.dim, chunk, blocks_x};
  return p;
}

// Calls f(std::integral_constant<int, V>) with the vector width V that prepare() chose.
template <int Vec, typename F>
void with_width(bool vectorised, F&& f) {
  if (vectorised) {
    f(std::integral_constant<int, Vec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

at::Tensor hidden_mse_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared p = prepare(student, teacher, mask);
  const MseShape& s = p.shape;
  at::Tensor out = at::empty({s.batch}, p.student.options().dtype(at::kFloat));
  if (s.batch == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* pm = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  const Geometry& g = p.geometry;
  at::Tensor partial = at::empty({s.batch * g.blocks_x}, out.options().dtype(at::kDouble));
  dispatch_mse_types(p.student.scalar_type(), p.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    constexpr int Vec = vector_width(sizeof(S), sizeof(T));
    with_width<Vec>(p.vectorised, [&](auto v) {
      mse_partial_kernel<decltype(v)::value, S, T><<<static_cast<unsigned>(s.batch * g.blocks_x), kThreads, 0, stream>>>(
          p.student.const_data_ptr<S>(), p.teacher.const_data_ptr<T>(), pm, g, partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  mse_final_kernel<<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(partial.const_data_ptr<double>(), pm, g,
                                                                             out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor hidden_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared p = prepare(student, teacher, mask);
  const MseShape& s = p.shape;
  check_hidden_mse_grad(grad, s, student);
  const at::Tensor gr = grad.contiguous();
  at::Tensor out = at::empty(p.student.sizes(), p.student.options());  // fresh, hence 16-byte aligned
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* pm = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  const Geometry& g = p.geometry;
  at::Tensor scales = at::empty({s.batch}, gr.options());
  mse_scale_kernel<<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(gr.const_data_ptr<float>(), pm, g,
                                                                            scales.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_mse_types(p.student.scalar_type(), p.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    constexpr int Vec = vector_width(sizeof(S), sizeof(T));
    with_width<Vec>(p.vectorised, [&](auto v) {
      mse_backward_kernel<decltype(v)::value, S, T><<<static_cast<unsigned>(s.batch * g.blocks_x), kThreads, 0, stream>>>(
          scales.const_data_ptr<float>(), p.student.const_data_ptr<S>(), p.teacher.const_data_ptr<T>(), pm, g,
          out.mutable_data_ptr<S>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace craft::cuda

TORCH_LIBRARY_IMPL(craft, CUDA, m) {
  m.impl("hidden_mse", &craft::cuda::hidden_mse_cuda);
  m.impl("hidden_mse_backward", &craft::cuda::hidden_mse_backward_cuda);
}
