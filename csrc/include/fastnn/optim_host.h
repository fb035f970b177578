// Host-side argument checks of the optimizer entry points (adam_step_, rmsprop_step_), shared by
// the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) implementations so both reject the same
// inputs with the same messages. `op` is the schema name ("adam_step_"), printed as
// "fastnn: <op>: ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <optional>
#include <tuple>
#include <vector>

#include "fastnn/checks.h"

namespace fastnn::optim_host {

// Same elements in the same order: both contiguous, or both dense with equal strides.
inline bool same_layout(const at::Tensor& a, const at::Tensor& ref) {
  if (a.is_contiguous() && ref.is_contiguous()) return true;
  return a.is_non_overlapping_and_dense() && a.strides() == ref.strides();
}

// The grad as the kernels read it: itself, or a copy (in its own dtype) in its param's layout (a
// DDP bucket view of a transposed param, say). With a grad_scale the kernels write the unscaled
// grad into what they read, and write_back_grads then copies those copies back.
inline at::Tensor grad_in_param_layout(const at::Tensor& g, const at::Tensor& p) {
  return same_layout(g, p) ? g : at::empty_like(p, p.options().dtype(g.scalar_type())).copy_(g);
}

inline void write_back_grads(at::TensorList grads, const std::vector<at::Tensor>& used) {
  for (size_t i = 0; i < grads.size(); ++i)
    if (!used[i].is_same(grads[i])) grads[i].copy_(used[i]);
}

// A tensor list that must hold one tensor per param.
inline void check_len(const char* op, at::TensorList list, const char* name, size_t n) {
  TORCH_CHECK(list.size() == n, "fastnn: ", op, ": ", name, " has ", list.size(),
              " tensors but params has ", n);
}

// list[i] (optimizer state or master weights) against params[i]: device, shape, dtype (when
// `dtype` is given) and memory layout.
inline void check_like(const char* op, const at::Tensor& t, const char* list, size_t i,
                       const at::Tensor& param, std::optional<c10::ScalarType> dtype) {
  TORCH_CHECK(t.device() == param.device(), "fastnn: ", op, ": ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), "fastnn: ", op, ": ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, "fastnn: ", op, ": ", list, "[", i, "] is ",
                t.scalar_type(), ", expected ", *dtype);
  }
  TORCH_CHECK(same_layout(t, param), "fastnn: ", op, ": ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides(),
              "; optimizer state must have its parameter's memory layout");
}

// A grad in its param's dtype, or fp32 for an fp16 / bf16 param (torch's Tensor.grad_dtype, set
// to keep gradients of low-precision params in fp32): the kernels read either.
inline bool grad_dtype_ok(c10::ScalarType g, c10::ScalarType p) {
  return g == p || (g == at::kFloat && (p == at::kHalf || p == at::kBFloat16));
}

// params[i] (already checked to be on the right device) and grads[i]: a dense float param, a
// strided grad of its device and shape, in a dtype grad_dtype_ok takes. `sparse_hint` ends the
// sparse-gradient message.
inline void check_param_and_grad(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g,
                                 const char* sparse_hint) {
  check_float(p, "params");
  TORCH_CHECK(p.is_non_overlapping_and_dense(), "fastnn: ", op, ": params[", i,
              "] must be dense (no gaps or overlaps), got strides ", p.strides());
  TORCH_CHECK(g.layout() == at::kStrided, "fastnn: ", op, ": grads[", i, "] is sparse; ",
              sparse_hint);
  TORCH_CHECK(grad_dtype_ok(g.scalar_type(), p.scalar_type()), "fastnn: ", op, ": grads[", i,
              "] is ", g.scalar_type(), " but params[", i, "] is ", p.scalar_type(),
              "; a grad must have its param's dtype, or float32 for a float16 / bfloat16 param");
  TORCH_CHECK(g.device() == p.device() && g.sizes() == p.sizes(), "fastnn: ", op, ": grads[", i,
              "] (", g.sizes(), " on ", g.device(), ") does not match params[", i, "] (", p.sizes(),
              " on ", p.device(), ")");
}

// The state dtype `st` of list[i]: float32, or the param's own dtype.
inline void check_state_dtype(const char* op, const char* list, size_t i, c10::ScalarType st,
                              const at::Tensor& p) {
  TORCH_CHECK(st == p.scalar_type() || st == at::kFloat, "fastnn: ", op, ": ", list, "[", i,
              "] is ", st, "; optimizer state must be float32 or its param's dtype (",
              p.scalar_type(), ")");
}

// Master weights are only for float16 / bfloat16 params.
inline void check_master_param(const char* op, size_t i, const at::Tensor& p) {
  TORCH_CHECK(p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16, "fastnn: ", op,
              ": master_params are fp32 copies of float16 / bfloat16 params, but params[", i,
              "] is ", p.scalar_type());
}

// ---- Per op: the checks the CPU and CUDA entry points share
// ---------------------------------------

// adam_step_: one tensor per param in every list the options use.
inline void check_adam_lists(size_t n, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList steps, at::TensorList master_params, bool amsgrad) {
  const char* op = "adam_step_";
  check_len(op, grads, "grads", n);
  check_len(op, exp_avgs, "exp_avgs", n);
  check_len(op, exp_avg_sqs, "exp_avg_sqs", n);
  check_len(op, steps, "steps", n);
  if (amsgrad) check_len(op, max_exp_avg_sqs, "max_exp_avg_sqs (amsgrad=True)", n);
  if (!master_params.empty()) check_len(op, master_params, "master_params", n);
}

// rmsprop_step_: one tensor per param in every list the options use.
inline void check_rmsprop_lists(size_t n, at::TensorList grads, at::TensorList square_avgs,
                                at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                at::TensorList steps, at::TensorList master_params, bool centered,
                                bool use_momentum) {
  const char* op = "rmsprop_step_";
  check_len(op, grads, "grads", n);
  check_len(op, square_avgs, "square_avgs", n);
  check_len(op, steps, "steps", n);
  if (centered) check_len(op, grad_avgs, "grad_avgs (centered=True)", n);
  if (use_momentum) check_len(op, momentum_buffers, "momentum_buffers (momentum > 0)", n);
  if (!master_params.empty()) check_len(op, master_params, "master_params", n);
}

// rmsprop_step_: the state and master weights of params[i] (p); returns the state dtype.
inline c10::ScalarType check_rmsprop_state(size_t i, const at::Tensor& p,
                                           at::TensorList square_avgs, at::TensorList grad_avgs,
                                           at::TensorList momentum_buffers,
                                           at::TensorList master_params, bool centered,
                                           bool use_momentum) {
  const char* op = "rmsprop_step_";
  const c10::ScalarType st = square_avgs[i].scalar_type();
  check_state_dtype(op, "square_avgs", i, st, p);
  check_like(op, square_avgs[i], "square_avgs", i, p, st);
  if (centered) check_like(op, grad_avgs[i], "grad_avgs", i, p, st);
  if (use_momentum) check_like(op, momentum_buffers[i], "momentum_buffers", i, p, st);
  if (!master_params.empty()) {
    check_master_param(op, i, p);
    check_like(op, master_params[i], "master_params", i, p, at::kFloat);
  }
  return st;
}

// ---- Host scalars -------------------------------------------------------------------------------

// An optional one-element CPU tensor read on the host (CPU params); `fallback` when absent.
inline double host_scalar(const char* op, const std::optional<at::Tensor>& t, const char* name,
                          double fallback) {
  if (!t.has_value() || !t->defined()) return fallback;
  TORCH_CHECK(t->numel() == 1, "fastnn: ", op, ": ", name, " must have one element, got shape ",
              t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "fastnn: ", op, ": ", name,
              " must be a CPU tensor for CPU params, got ", t->device());
  return t->item<double>();
}

// ---- Step counts (torch.optim's state["step"]), counted by the ops -----------------------------

// steps[i]: one-element float32 / float64 tensors, all on the host, or (capturable, fused) all on
// the params' `device` in one dtype. Returns whether they are on the device.
inline bool check_steps(const char* op, at::TensorList steps, const at::Device& device) {
  const bool on_device = !steps.empty() && !steps[0].device().is_cpu();
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "fastnn: ", op, ": steps[", i,
                "] must be a one-element float32 / float64 tensor, got ", s.scalar_type(),
                " of shape ", s.sizes());
    if (on_device) {
      TORCH_CHECK(s.device() == device && s.scalar_type() == steps[0].scalar_type(), "fastnn: ", op,
                  ": steps[", i, "] is ", s.scalar_type(), " on ", s.device(), " but steps[0] is ",
                  steps[0].scalar_type(), " on ", steps[0].device(),
                  "; steps must all be on the host or all on the params' device, ", device);
    } else {
      TORCH_CHECK(s.device().is_cpu(), "fastnn: ", op, ": steps[", i, "] is on ", s.device(),
                  " but steps[0] is on the host; steps must all be on the host or all on ", device);
    }
  }
  return on_device;
}

// A host step counter (checked) as a double.
inline double host_step(const at::Tensor& s) {
  return s.scalar_type() == at::kFloat ? double(*s.const_data_ptr<float>())
                                       : *s.const_data_ptr<double>();
}

// The value host counter s holds after this step's += 1, in its dtype's arithmetic (torch's
// `step_t += 1`): the count the update uses.
inline double next_host_step(const at::Tensor& s) {
  return s.scalar_type() == at::kFloat ? double(*s.const_data_ptr<float>() + 1.0f)
                                       : *s.const_data_ptr<double>() + 1.0;
}

// steps += 1, called once every check has passed (a refused call changes nothing). Host counters
// are written here, device ones in one foreach add; with found_inf on the device (the fused
// GradScaler protocol) that adds (found_inf == 0), so a skipped step leaves them, with no sync.
// (A found_inf on the host is read before: when it is non-zero the op returns after its checks.)
inline void count_steps(const char* op, at::TensorList steps, bool on_device,
                        const std::optional<at::Tensor>& device_found_inf) {
  if (!on_device) {
    TORCH_CHECK(!device_found_inf.has_value() || steps.empty(), "fastnn: ", op,
                ": found_inf is on ", device_found_inf->device(),
                " but the step counts are on the host, where skipping a step would need a host "
                "sync; keep them on the params' device (capturable=True or fused=True)");
    for (const at::Tensor& s : steps) {
      if (s.scalar_type() == at::kFloat) {
        *s.mutable_data_ptr<float>() += 1.0f;
      } else {
        *s.mutable_data_ptr<double>() += 1.0;
      }
    }
  } else if (device_found_inf.has_value()) {
    // reshape: a one-element found_inf of any shape (the foreach add takes a 0-d tensor)
    at::_foreach_add_(steps, device_found_inf->reshape({}).eq(0).to(steps[0].scalar_type()));
  } else {
    at::_foreach_add_(steps, 1);
  }
}

// The *_keep_grads_ ops: an op entry point that reads the grads and leaves them as they are, as
// their schema declares (no (f!) on grads). torch.compile then sees grads as inputs only: with
// the grads of several params views into one buffer (FSDP2's reduce-scatter output, a DDP
// bucket view) and declared written, Inductor (torch 2.14) raised or silently read the wrong
// elements. A grad_scale would make the kernels write grad / grad_scale back: refused.
template <auto Step>
struct KeepGrads;

template <typename... Args, void (*Step)(Args...)>
struct KeepGrads<Step> {
  static void call(Args... args) {
    constexpr size_t kGradScale = 8;  // params, grads, 5 state lists, lr_tensor, grad_scale
    const std::optional<at::Tensor>& grad_scale = std::get<kGradScale>(std::tie(args...));
    TORCH_CHECK(!grad_scale.has_value(),
                "fastnn: the *_step_keep_grads_ ops leave the grads as they are and take no "
                "grad_scale; the *_step_ ops unscale the grads in place");
    Step(args...);
  }
};

}  // namespace fastnn::optim_host
