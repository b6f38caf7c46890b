// CPU hidden_mse and its backward: per-sample mean squared error between student and teacher
// hidden states over all non-batch dims, masked tokens excluded. A sample with nothing to compare
// (every token masked out, or no elements) has loss 0 and zero gradient.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "lanes.h"

namespace craft::cpu {
namespace {

// Number of elements that count towards sample b's mean.
int64_t valid_elements(const MseShape& s, const bool* mask, int64_t b) {
  if (mask == nullptr) return s.per_sample();
  int64_t valid = 0;
  for (int64_t t = 0; t < s.tokens; ++t) valid += mask[b * s.tokens + t] ? 1 : 0;
  return valid * s.layers * s.dim;
}

template <typename S, typename T>
CRAFT_CPU_CLONES double squared_error(const S* x, const T* y, int64_t n) {
  double total = 0;
  int64_t i = 0;
  for (; i + kFlush <= n; i += kFlush) {
    float lane[kLanes] = {};
    for (int64_t j = 0; j < kFlush; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float d = to_float(x[i + j + k]) - to_float(y[i + j + k]);
        lane[k] += d * d;
      }
    }
    for (int k = 0; k < kLanes; ++k) total += lane[k];
  }
  for (; i < n; ++i) {
    const double d = static_cast<double>(to_float(x[i])) - static_cast<double>(to_float(y[i]));
    total += d * d;
  }
  return total;
}

// A float16 teacher: blocks converted to float (F16C), then the float-teacher kernel on each.
template <typename S>
double squared_error(const S* x, const c10::Half* y, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t len = std::min(kFlush, n - i);
    float t[kFlush];
    half_to_float(y + i, t, len);
    total += squared_error(x + i, static_cast<const float*>(t), len);
  }
  return total;
}

// out = scale * (s - t) over one row of n values.
template <typename S, typename T>
CRAFT_CPU_CLONES void scaled_difference(const S* s, const T* t, float scale, int64_t n, S* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(scale * (to_float(s[i]) - to_float(t[i])));
}

template <typename S>
void scaled_difference(const S* s, const c10::Half* t, float scale, int64_t n, S* out) {
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t len = std::min(kFlush, n - i);
    float y[kFlush];
    half_to_float(t + i, y, len);
    scaled_difference(s + i, static_cast<const float*>(y), scale, len, out + i);
  }
}

// How a sample is cut into work: rows of row_len elements. Masked problems use their real rows (a
// token of one layer), so a masked-out row is skipped whole; unmasked samples are cut into rows of
// kChunk elements (the last one shorter), so one large sample still spreads over every thread. The
// cut depends only on the shape: the reduction order, hence the result, never depends on threads.
struct Rows {
  int64_t per_sample, row_len, count;
  int64_t len(int64_t r) const { return std::min(row_len, per_sample - r * row_len); }
};

Rows rows_of(const MseShape& s, bool masked) {
  const int64_t per_sample = s.per_sample();
  if (masked) return {per_sample, s.dim, s.rows()};
  const int64_t row_len = std::max<int64_t>(1, std::min(per_sample, kChunk));
  return {per_sample, row_len, (per_sample + row_len - 1) / row_len};
}

// Rows per work item: about kChunk elements, so work splits evenly whatever B and D are.
int64_t rows_per_item(const Rows& rows) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, rows.row_len)); }

bool row_kept(const MseShape& s, const bool* mask, int64_t b, int64_t r) {
  return mask == nullptr || mask[b * s.tokens + r % s.tokens];
}

at::Tensor hidden_mse_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                          const std::optional<at::Tensor>& mask_in) {
  const MseShape s = check_hidden_mse(student_in, teacher_in, mask_in);
  TORCH_CHECK(student_in.device().is_cpu(), "craft: student must be on the CPU for the CPU kernel");
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool* pm = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  const Rows rows = rows_of(s, pm != nullptr);
  const int64_t per_item = rows_per_item(rows);
  const int64_t items_per_sample = (rows.count + per_item - 1) / per_item;
  std::vector<double> partial(s.batch * items_per_sample, 0.0);

  dispatch_mse_types(student.scalar_type(), teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const S* ps = student.const_data_ptr<S>();
    const T* pt = teacher.const_data_ptr<T>();
    const int64_t item_elements = std::max<int64_t>(1, std::min(per_item * rows.row_len, rows.per_sample));
    const int64_t grain = std::max<int64_t>(1, kGrain / item_elements);
    at::parallel_for(0, s.batch * items_per_sample, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / items_per_sample;
        const int64_t r0 = (item % items_per_sample) * per_item;
        const int64_t r1 = std::min(rows.count, r0 + per_item);
        double acc = 0;
        for (int64_t r = r0; r < r1; ++r) {
          if (!row_kept(s, pm, b, r)) continue;
          const int64_t off = b * rows.per_sample + r * rows.row_len;
          acc += squared_error(ps + off, pt + off, rows.len(r));
        }
        partial[item] = acc;
      }
    });
  });

  at::Tensor out = at::empty({s.batch}, student.options().dtype(at::kFloat));
  float* po = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < s.batch; ++b) {
    double total = 0;
    for (int64_t k = 0; k < items_per_sample; ++k) total += partial[b * items_per_sample + k];
    const int64_t count = valid_elements(s, pm, b);
    po[b] = count == 0 ? 0.0f : static_cast<float>(total / static_cast<double>(count));
  }
  return out;
}

at::Tensor hidden_mse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& student_in,
                                   const at::Tensor& teacher_in, const std::optional<at::Tensor>& mask_in) {
  const MseShape s = check_hidden_mse(student_in, teacher_in, mask_in);
  check_hidden_mse_grad(grad_in, s, student_in);
  TORCH_CHECK(student_in.device().is_cpu(), "craft: student must be on the CPU for the CPU kernel");
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool* pm = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty(student.sizes(), student.options());
  const Rows rows = rows_of(s, pm != nullptr);
  const float* pg = grad.const_data_ptr<float>();

  std::vector<float> scale(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t count = valid_elements(s, pm, b);
    scale[b] = count == 0 ? 0.0f : static_cast<float>(2.0 * pg[b] / static_cast<double>(count));
  }
  dispatch_mse_types(student.scalar_type(), teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const S* ps = student.const_data_ptr<S>();
    const T* pt = teacher.const_data_ptr<T>();
    S* po = out.mutable_data_ptr<S>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, rows.row_len));  // in rows
    at::parallel_for(0, s.batch * rows.count, grain, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br) {
        const int64_t b = br / rows.count, r = br % rows.count;
        const int64_t off = b * rows.per_sample + r * rows.row_len;
        const int64_t len = rows.len(r);
        if (!row_kept(s, pm, b, r)) {  // masked rows are never read: whatever they hold, their gradient is 0
          std::fill(po + off, po + off + len, S(0.0f));
          continue;
        }
        scaled_difference(ps + off, pt + off, scale[b], len, po + off);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace craft::cpu

TORCH_LIBRARY_IMPL(craft, CPU, m) {
  m.impl("hidden_mse", &craft::cpu::hidden_mse_cpu);
  m.impl("hidden_mse_backward", &craft::cpu::hidden_mse_backward_cpu);
}
