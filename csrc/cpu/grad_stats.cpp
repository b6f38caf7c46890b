// CPU grad_stats: (a.b, a.a, b.b) over two flat gradient buffers in one pass, double accumulation,
// deterministic (fixed chunks summed in order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "lanes.h"

namespace craft::cpu {
namespace {

template <typename T>
CRAFT_CPU_CLONES void stats_range(const T* a, const T* b, int64_t n, double* out) {
  double ab = 0, aa = 0, bb = 0;
  int64_t i = 0;
  for (; i + kFlush <= n; i += kFlush) {
    float bx[kFlush], by[kFlush];  // float16 only
    const auto* x = block(a + i, bx, kFlush);
    const auto* y = block(b + i, by, kFlush);
    float lab[kLanes] = {}, laa[kLanes] = {}, lbb[kLanes] = {};
    for (int64_t j = 0; j < kFlush; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float u = to_float(x[j + k]);
        const float w = to_float(y[j + k]);
        lab[k] += u * w;
        laa[k] += u * u;
        lbb[k] += w * w;
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      ab += lab[k];
      aa += laa[k];
      bb += lbb[k];
    }
  }
  if (i < n) {
    float bx[kFlush], by[kFlush];
    const auto* x = block(a + i, bx, n - i);
    const auto* y = block(b + i, by, n - i);
    for (int64_t j = 0; j < n - i; ++j) {
      const double u = to_float(x[j]);
      const double w = to_float(y[j]);
      ab += u * w;
      aa += u * u;
      bb += w * w;
    }
  }
  out[0] = ab;
  out[1] = aa;
  out[2] = bb;
}

at::Tensor grad_stats_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_buffer_pair(a, b, "a", "b");
  const int64_t n = a.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(3 * chunks, 0.0);
  dispatch_grad_type(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t lo = c * kChunk;
        const int64_t len = std::min(kChunk, n - lo);
        stats_range(pa + lo, pb + lo, len, &partial[3 * c]);
      }
    });
  });
  double total[3] = {0, 0, 0};
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < 3; ++k) total[k] += partial[3 * c + k];
  at::Tensor out = at::empty({3}, a.options().dtype(at::kFloat));
  float* po = out.mutable_data_ptr<float>();
  for (int k = 0; k < 3; ++k) po[k] = static_cast<float>(total[k]);
  return out;
}

}  // namespace
}  // namespace craft::cpu

TORCH_LIBRARY_IMPL(craft, CPU, m) { m.impl("grad_stats", &craft::cpu::grad_stats_cpu); }
