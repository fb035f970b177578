// Adam / AdamW update on CUDA (schema fastnn::adam_step_ in csrc/library.cpp, semantics of
// fastnn/reference/adam.py, per-element math in fastnn/adam_math.h, launch machinery in
// fastnn/multi_tensor_apply.cuh, argument checks shared with csrc/cpu/adam.cpp in
// fastnn/optim_host.h).
//
// One multi-tensor launch per (param, state, grad dtype, master weights) group, more only past
// ~370 tensors: grads are in their param's dtype or, for fp16 / bf16 params, fp32. Each block:
// thread 0 finds nothing to do when found_inf != 0, else computes the tensor's coefficients in
// double (lr, step, grad_scale read from device memory when they are device tensors: capturable,
// no host synchronisation) into shared memory; then every thread updates 16 bytes of params at a
// time (scalar fallback for misaligned pointers and the tail).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fastnn/adam_math.h"
#include "fastnn/checks.h"
#include "fastnn/multi_tensor_apply.cuh"
#include "fastnn/optim_host.h"

namespace fastnn::cuda {
namespace {

namespace om = fastnn::optim_math;
namespace oh = fastnn::optim_host;

constexpr const char* kOp = "adam_step_";

// Per tensor: the device step counter (capturable), or the bias corrections computed on the host
// from a host step counter.
struct AdamExtra {
  const void* step;
  double bc1;
  double bc2_sqrt;
};

// Lists: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master.
constexpr int kLists = 6;
constexpr int kMaxTensors = mta::capacity<kLists, AdamExtra>(256);
using AdamChunks = mta::TensorChunks<kLists, AdamExtra, kMaxTensors>;

struct AdamLaunch {
  om::AdamHyper hyper;
  mta::ScalarArg lr, grad_scale, found_inf;
  bool l2, decoupled, amsgrad;
  bool store_grads;  // a grad_scale was given: grads are written back as grad / grad_scale
  bool steps_on_device, step_is_double;
};
static_assert(sizeof(AdamChunks) + sizeof(AdamLaunch) <= mta::kParamBytes,
              "adam kernel parameters exceed the 32764-byte limit");

// K consecutive elements from offset i (K > 1: vector loads, pointers aligned).
template <int K, typename P, typename S, typename G, typename M, bool kMaster>
__device__ __forceinline__ void update_elements(int64_t i, P* param, G* grad, S* m, S* v, S* v_max,
                                                float* master, const om::AdamCoeffs<M>& c, bool l2,
                                                bool decoupled, bool amsgrad, bool store_grads) {
  M pr[K], gr[K], mr[K], vr[K], xr[K];
  if constexpr (kMaster) {
    mta::load<K>(master + i, pr);
  } else {
    mta::load<K>(param + i, pr);
  }
  mta::load<K>(grad + i, gr);
  mta::load<K>(m + i, mr);
  mta::load<K>(v + i, vr);
  if (amsgrad) {
    mta::load<K>(v_max + i, xr);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) xr[j] = M(0);
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    om::adam_update(pr[j], gr[j], mr[j], vr[j], xr[j], c, l2, decoupled, amsgrad);
  }
  if constexpr (kMaster) mta::store<K>(master + i, pr);
  mta::store<K>(param + i, pr);
  mta::store<K>(m + i, mr);
  mta::store<K>(v + i, vr);
  if (amsgrad) mta::store<K>(v_max + i, xr);
  if (store_grads) mta::store<K>(grad + i, gr);  // adam_update left gr = grad / grad_scale
}

template <typename P, typename S, typename G, bool kMaster>
__global__ void __launch_bounds__(mta::kThreads, mta::kMinBlocks)
    adam_kernel(const __grid_constant__ AdamChunks chunks, const __grid_constant__ AdamLaunch a) {
  using M = std::conditional_t<std::is_same_v<P, double>, double, float>;
  constexpr int kVec = sizeof(P) == 8 ? 2 : 16 / int(sizeof(P));  // 16 bytes of params

  const mta::ChunkSpan span = mta::chunk_span(chunks);
  const int t = span.t;

  __shared__ om::AdamCoeffs<M> coeffs;
  __shared__ bool skip;
  if (threadIdx.x == 0) {
    skip = a.found_inf.ptr != nullptr && mta::read(a.found_inf) != 0.0;
    if (!skip) {
      const AdamExtra& e = chunks.extra[t];
      double bc1 = e.bc1, bc2_sqrt = e.bc2_sqrt;
      if (a.steps_on_device) {
        const double step = a.step_is_double
                                ? *static_cast<const double*>(e.step)
                                : static_cast<double>(*static_cast<const float*>(e.step));
        om::adam_bias_corrections(a.hyper.beta1, a.hyper.beta2, step, &bc1, &bc2_sqrt);
      }
      coeffs = om::adam_coeffs<M>(a.hyper, mta::read(a.lr), bc1, bc2_sqrt, mta::read(a.grad_scale));
    }
  }
  __syncthreads();
  if (skip) return;  // GradScaler found an inf / NaN: nothing is written
  const om::AdamCoeffs<M> c = coeffs;

  const int64_t start = span.start;
  P* param = static_cast<P*>(chunks.ptr[0][t]) + start;
  G* grad = static_cast<G*>(chunks.ptr[1][t]) + start;
  S* m = static_cast<S*>(chunks.ptr[2][t]) + start;
  S* v = static_cast<S*>(chunks.ptr[3][t]) + start;
  S* v_max = a.amsgrad ? static_cast<S*>(chunks.ptr[4][t]) + start : nullptr;
  float* master = kMaster ? static_cast<float*>(chunks.ptr[5][t]) + start : nullptr;

  const bool vec = mta::aligned<kVec>(param) && mta::aligned<kVec>(grad) && mta::aligned<kVec>(m) &&
                   mta::aligned<kVec>(v) && (!a.amsgrad || mta::aligned<kVec>(v_max)) &&
                   (!kMaster || mta::aligned<kVec>(master));
  mta::for_each_element<kVec>(span.n, vec, [&]<int K>(int64_t i) {
    update_elements<K, P, S, G, M, kMaster>(i, param, grad, m, v, v_max, master, c, a.l2,
                                            a.decoupled, a.amsgrad, a.store_grads);
  });
}

// ---- Op entry point -----------------------------------------------------------------------------

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, at::TensorList master_params,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                    bool amsgrad, bool maximize) {
  const size_t n = params.size();
  oh::check_adam_lists(n, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                       amsgrad);
  const bool has_master = !master_params.empty();
  if (n == 0) return;

  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep;  // temporaries that must outlive the launches' enqueueing
  AdamLaunch a;
  // false: found_inf != 0 on the host, and nothing is written once the arguments pass the checks
  const bool skip =
      !mta::set_scalar_args(a, lr_tensor, lr, grad_scale, found_inf, device, kOp, keep);
  a.hyper = om::AdamHyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  a.l2 = weight_decay != 0.0 && !decoupled_weight_decay;
  a.decoupled = weight_decay != 0.0 && decoupled_weight_decay;
  a.amsgrad = amsgrad;
  a.store_grads = has(grad_scale);
  a.steps_on_device = oh::check_steps(kOp, steps, device);
  a.step_is_double = steps[0].scalar_type() == at::kDouble;

  std::vector<at::Tensor> grads_used(grads.begin(), grads.end());
  std::vector<mta::DtypeKey> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_same_device(p, "params[i]", params[0], "params[0]");
    TORCH_CHECK(p.is_cuda(), "fastnn: adam_step_ (CUDA): params[", i, "] is on ", p.device());
    const at::Tensor& g = grads[i];
    oh::check_param_and_grad(kOp, i, p, g, "use torch.optim.SparseAdam for sparse gradients");
    grads_used[i] = oh::grad_in_param_layout(g, p);
    const c10::ScalarType st = exp_avgs[i].scalar_type();
    oh::check_state_dtype(kOp, "exp_avgs", i, st, p);
    oh::check_like(kOp, exp_avgs[i], "exp_avgs", i, p, st);
    oh::check_like(kOp, exp_avg_sqs[i], "exp_avg_sqs", i, p, st);
    if (amsgrad) oh::check_like(kOp, max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, st);
    if (has_master) {
      oh::check_master_param(kOp, i, p);
      oh::check_like(kOp, master_params[i], "master_params", i, p, at::kFloat);
    }
    keys[i] = {int(p.scalar_type()), int(st), int(g.scalar_type()), has_master};
  }
  if (skip) return;
  // Counted before the launches: host counts are read below, device ones by the kernel.
  oh::count_steps(kOp, steps, a.steps_on_device,
                  a.found_inf.ptr != nullptr ? found_inf : std::nullopt);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  mta::for_each_dtype_group(
      keys, has_master,
      [&]<typename P, typename S, typename G, bool kMaster>(const std::vector<int64_t>& indices) {
        auto fill = [&](AdamChunks& c, int slot, int64_t i) -> int64_t {
          c.ptr[0][slot] = params[i].data_ptr();
          c.ptr[1][slot] = grads_used[i].data_ptr();
          c.ptr[2][slot] = exp_avgs[i].data_ptr();
          c.ptr[3][slot] = exp_avg_sqs[i].data_ptr();
          c.ptr[4][slot] = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
          c.ptr[5][slot] = kMaster ? master_params[i].data_ptr() : nullptr;
          AdamExtra& e = c.extra[slot];
          e.step = nullptr;
          e.bc1 = e.bc2_sqrt = 1.0;
          if (a.steps_on_device) {
            e.step = steps[i].const_data_ptr();
          } else {  // a host counter (already counted): read it here (no device sync)
            om::adam_bias_corrections(beta1, beta2, oh::host_step(steps[i]), &e.bc1, &e.bc2_sqrt);
          }
          return params[i].numel();
        };
        auto launch = [&](const AdamChunks& c, int64_t blocks) {
          adam_kernel<P, S, G, kMaster><<<unsigned(blocks), mta::kThreads, 0, stream>>>(c, a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        mta::pack_and_launch<AdamChunks>(indices, fill, launch);
      });
  if (a.store_grads) oh::write_back_grads(grads, grads_used);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("adam_step_keep_grads_", &oh::KeepGrads<&adam_step_cuda>::call);
}

}  // namespace fastnn::cuda
