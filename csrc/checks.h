// Input validation shared by the CPU and CUDA kernels: every message names the argument at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace craft {

// A flat gradient buffer: 1-D, contiguous, float32 / bfloat16 / float16.
inline void check_grad_buffer(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, "craft: ", name, " must be a 1-D flat gradient buffer, got a ", t.dim(),
              "-D tensor");
  TORCH_CHECK(t.is_contiguous(), "craft: ", name, " must be contiguous");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "craft: ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_buffer_pair(const at::Tensor& a, const at::Tensor& b, const char* an,
                              const char* bn) {
  check_grad_buffer(a, an);
  check_grad_buffer(b, bn);
  TORCH_CHECK(a.numel() == b.numel(), "craft: ", an, " and ", bn,
              " must have the same number of elements, got ", a.numel(), " and ", b.numel());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "craft: ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "craft: ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_coef(const at::Tensor& coef, const at::Tensor& a) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 1 && coef.numel() == 2,
              "craft: coef must be a float32 tensor of shape [2], got ", coef.scalar_type(), " ",
              coef.sizes());
  TORCH_CHECK(coef.device() == a.device(), "craft: coef must be on a's device (", a.device(),
              "), got ", coef.device());
}

// Shape of a hidden_mse problem seen as [B, R, T, D]: R*T rows of D values per sample, the mask
// selecting tokens t. Unmasked inputs of any shape [B, ...] are [B, 1, 1, numel/B].
struct MseShape {
  int64_t batch = 0, layers = 1, tokens = 1, dim = 0;
  int64_t rows() const { return layers * tokens; }
  int64_t per_sample() const { return layers * tokens * dim; }
};

inline MseShape check_hidden_mse(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(student.dim() >= 1, "craft: student must have a batch dimension, got a 0-D tensor");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "craft: student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  const auto ss = student.scalar_type();
  TORCH_CHECK(ss == at::kFloat || ss == at::kBFloat16, "craft: student must be float32 or bfloat16, got ", ss);
  const auto ts = teacher.scalar_type();
  TORCH_CHECK(ts == at::kFloat || ts == at::kBFloat16 || ts == at::kHalf,
              "craft: teacher must be float32, bfloat16 or float16, got ", ts);
  TORCH_CHECK(student.device() == teacher.device(), "craft: student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  MseShape s;
  s.batch = student.size(0);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(student.dim() == 3 || student.dim() == 4,
                "craft: a mask needs student of shape [B, T, D] or [B, L, T, D], got ", student.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool, "craft: mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.batch && m.size(1) == student.size(-2),
                "craft: mask must have shape [B, T] = [", s.batch, ", ", student.size(-2), "], got ", m.sizes());
    TORCH_CHECK(m.device() == student.device(), "craft: mask must be on student's device (", student.device(),
                "), got ", m.device());
    s.layers = student.dim() == 4 ? student.size(1) : 1;
    s.tokens = student.size(-2);
    s.dim = student.size(-1);
  } else {
    s.dim = s.batch == 0 ? 0 : student.numel() / s.batch;
  }
  return s;
}

inline void check_hidden_mse_grad(const at::Tensor& grad, const MseShape& s, const at::Tensor& student) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 1 && grad.size(0) == s.batch,
              "craft: grad must be float32 of shape [", s.batch, "], got ", grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(grad.device() == student.device(), "craft: grad must be on student's device, got ", grad.device());
}

}  // namespace craft
