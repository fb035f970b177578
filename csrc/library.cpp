// The fastnn operator library: every schema is declared here, once. Each device's kernels
// register themselves with TORCH_LIBRARY_IMPL(fastnn, CPU|CUDA, m) in the file that implements
// them (csrc/cpu/*.cpp, csrc/cuda/*.cu), so the dispatcher, not Python, routes by device.
// Fake (meta) kernels and autograd are registered once, in Python (fastnn/ops/).
//
// The Triton and reference backends register the same schemas under the names
// `fastnn::triton_<op>` and `fastnn::ref_<op>` (tests/test_registry.py keeps them identical).

#include <Python.h>
#include <torch/library.h>

#include <string>
#include <utility>

// Python module `fastnn._C`: importing it loads this library and its registrations. No Python
// functions live here; everything is reached through torch.ops.fastnn.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastnn, m) {
  // ---- Norms. `input` is 2-D [rows, N]; normalisation is over the last dim. --------------------
  // out has input's dtype; rstd (and mean) are fp32 [rows]. With `residual` (same shape and dtype
  // as input): s = input + residual rounded to input's dtype, out = norm(s), residual_out = s.
  // Without it residual_out is an empty tensor. weight / bias are 1-D [N], any float dtype.
  m.def(
      "rms_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // x is the tensor that was normalised (s when a residual was fused, else input).
  // grad_residual_out (optional) is the gradient flowing into residual_out; it is added to the
  // input gradient. Returns (grad_input, grad_weight); grad_weight is empty without weight.
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight,"
      " Tensor rstd) -> (Tensor, Tensor)");
  m.def(
      "layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");  // (out, residual_out, mean, rstd)
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight,"
      " Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");

  // ---- GLU family: out = act(gate) * up, elementwise. -------------------------------------------
  // activation: "silu" (SwiGLU), "gelu" (erf), "gelu_tanh", "relu", "sigmoid" (GLU).
  // gate and up have one shape; packed variants take gate_up [..., 2H] = [gate | up].
  m.def("glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("glu_bwd(Tensor grad_out, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)");
  m.def("glu_packed_fwd(Tensor gate_up, str activation) -> Tensor");
  m.def("glu_packed_bwd(Tensor grad_out, Tensor gate_up, str activation) -> Tensor");
  // The opt-in in-place backward (memory saving): grad_gate / grad_up written over gate / up.
  m.def("glu_bwd_(Tensor grad_out, Tensor(a!) gate, Tensor(b!) up, str activation) -> ()");
  m.def("glu_packed_bwd_(Tensor grad_out, Tensor(a!) gate_up, str activation) -> ()");

  // ---- Optimizer updates over lists of tensors (one multi-tensor pass). -------------------------
  // steps: per-parameter step counts (torch.optim's state["step"]: fp32 / fp64 scalars, on the
  // host or, when capturable, on the parameters' device), incremented by the op before it uses
  // them (and left as they were when found_inf != 0). lr_tensor, when given, overrides lr and
  // is read on the device. grad_scale / found_inf follow torch's fused optimizer protocol: grads
  // are divided by grad_scale inside the kernel and written back unscaled (torch's fused Adam
  // leaves .grad so), and with found_inf != 0 nothing is written.
  // master_params: fp32 copies updated in place of low-precision params (empty list: none).
  // The *_keep_grads_ twins take the same arguments but no grad_scale, and only read the grads
  // (their schema says so: see KeepGrads in optim_host.h for why it matters to torch.compile).
  using SuffixAndGrads = std::pair<std::string, std::string>;
  for (const auto& [suffix, grads] : {SuffixAndGrads{"", "Tensor(f!)[] grads"},
                                      SuffixAndGrads{"keep_grads_", "Tensor[] grads"}}) {
    const std::string adam =
        "adam_step_" + suffix + "(Tensor(a!)[] params, " + grads +
        ", Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs,"
        " Tensor(g!)[] steps, Tensor(e!)[] master_params, Tensor? lr_tensor,"
        " Tensor? grad_scale, Tensor? found_inf, *, float lr, float beta1, float beta2,"
        " float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad,"
        " bool maximize) -> ()";
    const std::string rmsprop =
        "rmsprop_step_" + suffix + "(Tensor(a!)[] params, " + grads +
        ", Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers,"
        " Tensor(g!)[] steps, Tensor(e!)[] master_params, Tensor? lr_tensor,"
        " Tensor? grad_scale, Tensor? found_inf, *, float lr, float alpha, float eps,"
        " float weight_decay, float momentum, bool centered, bool maximize) -> ()";
    m.def(adam.c_str());
    m.def(rmsprop.c_str());
  }
}

// ---- ADInplaceOrView: the ops that write their arguments bump those tensors' versions ----------
// Without a kernel at this key the dispatcher falls through and a tensor an op overwrote keeps
// its version, so autograd could not see that a tensor saved for backward changed (torch's own
// in-place ops and torch.library.custom_op's mutating ops, the Triton and torch backends', bump
// them). One boxed kernel for all: it reads the written arguments off the schema. In C++, not
// Python: an optimizer step over 39 tensors spends 36 us in a Python kernel, 2 here.
namespace {

void bump_version(const at::Tensor& t) {
  if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      bump_version(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) bump_version(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, ADInplaceOrView, m) {
  for (const char* op : {"glu_bwd_", "glu_packed_bwd_", "adam_step_", "rmsprop_step_",
                         "adam_step_keep_grads_", "rmsprop_step_keep_grads_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_arguments>());
  }
}
