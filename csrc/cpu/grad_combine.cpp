// CPU grad_combine_: a <- coef[0] * a + coef[1] * b, in place, computed in float.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../dispatch.h"
#include "lanes.h"

namespace craft::cpu {
namespace {

template <typename T>
CRAFT_CPU_CLONES void combine_range(T* a, const T* b, float c0, float c1, int64_t n) {
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t len = std::min(kFlush, n - i);
    float bx[kFlush], by[kFlush];  // float16 only
    const auto* x = block(a + i, bx, len);
    const auto* y = block(b + i, by, len);
    store_block(a + i, len, [&](int64_t j) { return c0 * to_float(x[j]) + c1 * to_float(y[j]); });
  }
}

void grad_combine_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef) {
  check_buffer_pair(a, b, "a", "b");
  check_coef(coef, a);
  // coef may be any float32[2] view: read through its stride, no temporary copy
  const float* c = coef.const_data_ptr<float>();
  const float c0 = c[0], c1 = c[coef.stride(0)];
  const int64_t n = a.numel();
  dispatch_grad_type(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* pa = a.mutable_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      combine_range(pa + begin, pb + begin, c0, c1, end - begin);
    });
  });
}

}  // namespace
}  // namespace craft::cpu

TORCH_LIBRARY_IMPL(craft, CPU, m) { m.impl("grad_combine_", &craft::cpu::grad_combine_cpu); }
