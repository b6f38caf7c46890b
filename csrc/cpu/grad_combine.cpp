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
  for (int64_t i = 0; i < n; ++i) a[i] = static_cast<T>(c0 * to_float(a[i]) + c1 * to_float(b[i]));
}

// float16: blocks converted to float (F16C), combined by the float kernel, converted back.
template <>
void combine_range<c10::Half>(c10::Half* a, const c10::Half* b, float c0, float c1, int64_t n) {
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t len = std::min(kFlush, n - i);
    float x[kFlush], y[kFlush];
    half_to_float(a + i, x, len);
    half_to_float(b + i, y, len);
    combine_range(x, static_cast<const float*>(y), c0, c1, len);
    float_to_half(x, a + i, len);
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
