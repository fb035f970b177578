// Host-side pieces of the GLU ops shared by the CPU (csrc/cpu/glu.cpp) and CUDA (csrc/cuda/glu.cu)
// entry points: argument checks, the grad_out preparation, and the in-place backward's logic
// around each device's kernel launch.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "fastnn/checks.h"

namespace fastnn::glu_host {

inline void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  check_float(gate, "gate");
  check_float(up, "up");
  check_same_device(up, "up", gate, "gate");
  TORCH_CHECK(gate.sizes() == up.sizes(), "fastnn: gate of shape ", gate.sizes(),
              " and up of shape ", up.sizes(), " differ");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "fastnn: gate has dtype ", gate.scalar_type(),
              " but up has ", up.scalar_type());
}

inline void check_packed(const at::Tensor& gate_up) {
  check_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "fastnn: packed gate_up of shape ",
              gate_up.sizes(), " needs an even last dim holding [gate | up]");
}

// grad_out: the output's shape, any float dtype (cast to `like`'s dtype), made contiguous.
inline at::Tensor prepare_grad(const at::Tensor& grad_out, const at::Tensor& like,
                               at::IntArrayRef out_shape) {
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", like, "gate");
  TORCH_CHECK(grad_out.sizes() == out_shape, "fastnn: grad_out of shape ", grad_out.sizes(),
              " does not match the output shape ", out_shape);
  return grad_out.to(like.scalar_type()).contiguous();
}

inline std::vector<int64_t> packed_out_shape(const at::Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

// The in-place backward (opt-in memory saving): grad_gate / grad_up written over gate / up.
// Contiguous inputs: launch(dh, gate, up) runs the device's kernel with the outputs aliasing
// the inputs (each element is read before it is written). Others go through
// out_of_place(dh, gate, up) -> (grad_gate, grad_up) and a copy. Overlapping arguments would
// make the result depend on the order of the writes: refused.
template <typename OutOfPlace, typename Launch>
void bwd_inplace(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                 const OutOfPlace& out_of_place, const Launch& launch) {
  check_pair(gate, up);
  at::assert_no_overlap(gate, up);
  const at::Tensor dh = prepare_grad(grad_out, gate, gate.sizes());
  at::assert_no_overlap(dh, gate);
  at::assert_no_overlap(dh, up);
  if (gate.numel() == 0) return;
  if (gate.is_contiguous() && up.is_contiguous()) {
    launch(dh, gate, up);
    return;
  }
  const auto [dg, du] = out_of_place(dh, gate, up);
  gate.copy_(dg);
  up.copy_(du);
}

// The packed form: grad of [gate | up] written over gate_up.
template <typename OutOfPlace, typename Launch>
void packed_bwd_inplace(const at::Tensor& grad_out, const at::Tensor& gate_up,
                        const OutOfPlace& out_of_place, const Launch& launch) {
  check_packed(gate_up);
  const at::Tensor dh = prepare_grad(grad_out, gate_up, packed_out_shape(gate_up));
  at::assert_no_overlap(dh, gate_up);
  if (dh.numel() == 0) return;
  if (gate_up.is_contiguous()) {
    launch(dh, gate_up);
    return;
  }
  gate_up.copy_(out_of_place(dh, gate_up));
}

}  // namespace fastnn::glu_host
