// CPU grad_combine_: a <- coef[0] * a + coef[1] * b, in place, computed in float.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"
#include "lanes.h"

namespace craft::cpu {
namespace {

template <typename T>
CRAFT_CPU_CLONES void combine_range(T* a, const T* b, float c0, float c1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = static_cast<T>(c0 * to_float(a[i]) + c1 * to_float(b[i]));
}

void grad_combine_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef) {
  check_buffer_pair(a, b, "a", "b");
  check_coef(coef, a);
  const float* c = coef.contiguous().const_data_ptr<float>();
  const float c0 = c[0], c1 = c[1];
  const int64_t n = a.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "craft::grad_combine_", [&] {
    scalar_t* pa = a.mutable_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      combine_range(pa + begin, pb + begin, c0, c1, end - begin);
    });
  });
}

}  // namespace
}  // namespace craft::cpu

TORCH_LIBRARY_IMPL(craft, CPU, m) { m.impl("grad_combine_", &craft::cpu::grad_combine_cpu); }
