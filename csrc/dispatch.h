// dtype dispatch for hidden_mse: student float32/bfloat16 x teacher float32/bfloat16/float16.
// f is called with two value tags; use decltype to get the element types.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace craft {

template <typename S, typename F>
void dispatch_teacher(c10::ScalarType teacher, F&& f) {
  switch (teacher) {
    case c10::kFloat: f(S{}, float{}); break;
    case c10::kBFloat16: f(S{}, c10::BFloat16{}); break;
    case c10::kHalf: f(S{}, c10::Half{}); break;
    default: TORCH_CHECK(false, "craft: unsupported teacher dtype ", teacher);
  }
}

template <typename F>
void dispatch_mse_types(c10::ScalarType student, c10::ScalarType teacher, F&& f) {
  switch (student) {
    case c10::kFloat: dispatch_teacher<float>(teacher, f); break;
    case c10::kBFloat16: dispatch_teacher<c10::BFloat16>(teacher, f); break;
    default: TORCH_CHECK(false, "craft: unsupported student dtype ", student);
  }
}

// Flat gradient buffers: float32 / bfloat16 / float16; f gets one value tag.
template <typename F>
void dispatch_grad_type(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::kFloat: f(float{}); break;
    case c10::kBFloat16: f(c10::BFloat16{}); break;
    case c10::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "craft: unsupported gradient dtype ", t);
  }
}

}  // namespace craft
