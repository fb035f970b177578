// RMSprop update on CUDA (schema fastnn::rmsprop_step_ in csrc/library.cpp, semantics of
// fastnn/reference/rmsprop.py, per-element math in fastnn/rmsprop_math.h, launch machinery in
// fastnn/multi_tensor_apply.cuh, argument checks shared with csrc/cpu/rmsprop.cpp in
// fastnn/optim_host.h).
//
// Same plan as csrc/cuda/adam.cu: one multi-tensor launch per (param, state, grad dtype, master
// weights) group; thread 0 of each block checks found_inf and computes the coefficients (lr and
// grad_scale from device memory when they are device tensors) into shared memory; 16-byte vector
// updates with a scalar fallback.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fastnn/checks.h"
#include "fastnn/multi_tensor_apply.cuh"
#include "fastnn/optim_host.h"
#include "fastnn/rmsprop_math.h"

namespace fastnn::cuda {
namespace {

namespace om = fastnn::optim_math;
namespace oh = fastnn::optim_host;

constexpr const char* kOp = "rmsprop_step_";

struct NoExtra {};

// Lists: param, grad, square_avg, grad_avg, momentum_buffer, master.
constexpr int kLists = 6;
constexpr int kMaxTensors = mta::capacity<kLists, NoExtra>(256);
using RmspropChunks = mta::TensorChunks<kLists, NoExtra, kMaxTensors>;

struct RmspropLaunch {
  om::RmspropHyper hyper;
  mta::ScalarArg lr, grad_scale, found_inf;
  bool l2, centered, momentum;
  bool store_grads;  // a grad_scale was given: grads are written back as grad / grad_scale
};
static_assert(sizeof(RmspropChunks) + sizeof(RmspropLaunch) <= mta::kParamBytes,
              "rmsprop kernel parameters exceed the 32764-byte limit");

template <int K, typename P, typename S, typename G, typename M, bool kMaster>
__device__ __forceinline__ void update_elements(int64_t i, P* param, G* grad, S* sq, S* grad_avg,
                                                S* buf, float* master,
                                                const om::RmspropCoeffs<M>& c, bool l2,
                                                bool centered, bool momentum, bool store_grads) {
  M pr[K], gr[K], sr[K], ar[K], br[K];
  if constexpr (kMaster) {
    mta::load<K>(master + i, pr);
  } else {
    mta::load<K>(param + i, pr);
  }
  mta::load<K>(grad + i, gr);
  mta::load<K>(sq + i, sr);
#pragma unroll
  for (int j = 0; j < K; ++j) ar[j] = br[j] = M(0);
  if (centered) mta::load<K>(grad_avg + i, ar);
  if (momentum) mta::load<K>(buf + i, br);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    om::rmsprop_update(pr[j], gr[j], sr[j], ar[j], br[j], c, l2, centered, momentum);
  }
  if constexpr (kMaster) mta::store<K>(master + i, pr);
  mta::store<K>(param + i, pr);
  mta::store<K>(sq + i, sr);
  if (centered) mta::store<K>(grad_avg + i, ar);
  if (momentum) mta::store<K>(buf + i, br);
  if (store_grads) mta::store<K>(grad + i, gr);  // rmsprop_update left gr = grad / grad_scale
}

template <typename P, typename S, typename G, bool kMaster>
__global__ void __launch_bounds__(mta::kThreads, mta::kMinBlocks)
    rmsprop_kernel(const __grid_constant__ RmspropChunks chunks,
                   const __grid_constant__ RmspropLaunch a) {
  using M = std::conditional_t<std::is_same_v<P, double>, double, float>;
  constexpr int kVec = sizeof(P) == 8 ? 2 : 16 / int(sizeof(P));  // 16 bytes of params

  const mta::ChunkSpan span = mta::chunk_span(chunks);
  const int t = span.t;

  __shared__ om::RmspropCoeffs<M> coeffs;
  __shared__ bool skip;
  if (threadIdx.x == 0) {
    skip = a.found_inf.ptr != nullptr && mta::read(a.found_inf) != 0.0;
    if (!skip) coeffs = om::rmsprop_coeffs<M>(a.hyper, mta::read(a.lr), mta::read(a.grad_scale));
  }
  __syncthreads();
  if (skip) return;  // GradScaler found an inf / NaN: nothing is written
  const om::RmspropCoeffs<M> c = coeffs;

  const int64_t start = span.start;
  P* param = static_cast<P*>(chunks.ptr[0][t]) + start;
  G* grad = static_cast<G*>(chunks.ptr[1][t]) + start;
  S* sq = static_cast<S*>(chunks.ptr[2][t]) + start;
  S* grad_avg = a.centered ? static_cast<S*>(chunks.ptr[3][t]) + start : nullptr;
  S* buf = a.momentum ? static_cast<S*>(chunks.ptr[4][t]) + start : nullptr;
  float* master = kMaster ? static_cast<float*>(chunks.ptr[5][t]) + start : nullptr;

  const bool vec = mta::aligned<kVec>(param) && mta::aligned<kVec>(grad) &&
                   mta::aligned<kVec>(sq) && (!a.centered || mta::aligned<kVec>(grad_avg)) &&
                   (!a.momentum || mta::aligned<kVec>(buf)) &&
                   (!kMaster || mta::aligned<kVec>(master));
  mta::for_each_element<kVec>(span.n, vec, [&]<int K>(int64_t i) {
    update_elements<K, P, S, G, M, kMaster>(i, param, grad, sq, grad_avg, buf, master, c, a.l2,
                                            a.centered, a.momentum, a.store_grads);
  });
}

// ---- Op entry point -----------------------------------------------------------------------------

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers,
                       at::TensorList steps, at::TensorList master_params,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double lr, double alpha,
                       double eps, double weight_decay, double momentum, bool centered,
                       bool maximize) {
  const size_t n = params.size();
  const bool use_momentum = momentum > 0.0;
  oh::check_rmsprop_lists(n, grads, square_avgs, grad_avgs, momentum_buffers, steps, master_params,
                          centered, use_momentum);
  const bool has_master = !master_params.empty();
  if (n == 0) return;

  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep;
  RmspropLaunch a;
  // false: found_inf != 0 on the host, and nothing is written once the arguments pass the checks
  const bool skip =
      !mta::set_scalar_args(a, lr_tensor, lr, grad_scale, found_inf, device, kOp, keep);
  a.hyper = om::RmspropHyper{alpha, eps, weight_decay, momentum, maximize};
  a.l2 = weight_decay != 0.0;
  a.centered = centered;
  a.momentum = use_momentum;
  a.store_grads = has(grad_scale);

  std::vector<at::Tensor> grads_used(grads.begin(), grads.end());
  std::vector<mta::DtypeKey> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_same_device(p, "params[i]", params[0], "params[0]");
    TORCH_CHECK(p.is_cuda(), "fastnn: rmsprop_step_ (CUDA): params[", i, "] is on ", p.device());
    const at::Tensor& g = grads[i];
    oh::check_param_and_grad(kOp, i, p, g, "RMSprop does not support sparse gradients");
    grads_used[i] = oh::grad_in_param_layout(g, p);
    const c10::ScalarType st = oh::check_rmsprop_state(
        i, p, square_avgs, grad_avgs, momentum_buffers, master_params, centered, use_momentum);
    keys[i] = {int(p.scalar_type()), int(st), int(g.scalar_type()), has_master};
  }
  const bool steps_on_device = oh::check_steps(kOp, steps, device);
  if (skip) return;
  oh::count_steps(kOp, steps, steps_on_device,
                  a.found_inf.ptr != nullptr ? found_inf : std::nullopt);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  mta::for_each_dtype_group(
      keys, has_master,
      [&]<typename P, typename S, typename G, bool kMaster>(const std::vector<int64_t>& indices) {
        auto fill = [&](RmspropChunks& c, int slot, int64_t i) -> int64_t {
          c.ptr[0][slot] = params[i].data_ptr();
          c.ptr[1][slot] = grads_used[i].data_ptr();
          c.ptr[2][slot] = square_avgs[i].data_ptr();
          c.ptr[3][slot] = centered ? grad_avgs[i].data_ptr() : nullptr;
          c.ptr[4][slot] = use_momentum ? momentum_buffers[i].data_ptr() : nullptr;
          c.ptr[5][slot] = kMaster ? master_params[i].data_ptr() : nullptr;
          return params[i].numel();
        };
        auto launch = [&](const RmspropChunks& c, int64_t blocks) {
          rmsprop_kernel<P, S, G, kMaster><<<unsigned(blocks), mta::kThreads, 0, stream>>>(c, a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        mta::pack_and_launch<RmspropChunks>(indices, fill, launch);
      });
  if (a.store_grads) oh::write_back_grads(grads, grads_used);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("rmsprop_step_", &rmsprop_step_cuda);
  m.impl("rmsprop_step_keep_grads_", &oh::KeepGrads<&rmsprop_step_cuda>::call);
}

}  // namespace fastnn::cuda
