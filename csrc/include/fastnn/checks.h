// Argument checks shared by the op entry points of every device. Messages name the argument,
// the expectation and what was passed, so a user sees exactly which input is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fastnn {

// An optional tensor argument that was given (Python None arrives as nullopt or undefined).
inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), "fastnn: ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "fastnn: ", a_name, " is on ", a.device(), " but ", b_name,
              " is on ", b.device());
}

// An optional tensor, checked against `ref` for device, and for 1-D length `n` when n >= 0.
inline void check_vector(const c10::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& ref, int64_t n) {
  if (!has(t)) return;
  check_float(*t, name);
  check_same_device(*t, name, ref, "input");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastnn: ", name, " must have shape [", n,
              "], got ", t->sizes());
}

}  // namespace fastnn
