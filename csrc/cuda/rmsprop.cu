// RMSprop update on CUDA (schema fastnn::rmsprop_step_ in csrc/library.cpp, semantics of
// fastnn/reference/rmsprop.py, per-element math in fastnn/rmsprop_math.h, launch machinery in
// fastnn/multi_tensor_apply.cuh).
//
// Same plan as csrc/cuda/adam.cu: one multi-tensor launch per (param dtype, state dtype, master
// weights) group; thread 0 of each block checks found_inf and computes the coefficients (lr and
// grad_scale from device memory when they are device tensors) into shared memory; 16-byte vector
// updates with a scalar fallback.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fastnn/checks.h"
#include "fastnn/multi_tensor_apply.cuh"
#include "fastnn/rmsprop_math.h"

namespace fastnn::cuda {
namespace {

namespace om = fastnn::optim_math;

struct NoExtra {};

// Lists: param, grad, square_avg, grad_avg, momentum_buffer, master.
constexpr int kLists = 6;
constexpr int kMaxTensors = mta::capacity<kLists, NoExtra>(256);
using RmspropChunks = mta::TensorChunks<kLists, NoExtra, kMaxTensors>;

struct RmspropLaunch {
  om::RmspropHyper hyper;
  mta::ScalarArg lr, grad_scale, found_inf;
  bool l2, centered, momentum;
};
static_assert(sizeof(RmspropChunks) + sizeof(RmspropLaunch) <= mta::kParamBytes,
              "rmsprop kernel parameters exceed the 32764-byte limit");

template <int K, typename P, typename S, typename M, bool kMaster>
__device__ __forceinline__ void update_elements(int64_t i, P* param, const P* grad, S* sq,
                                                S* grad_avg, S* buf, float* master,
                                                const om::RmspropCoeffs<M>& c, bool l2,
                                                bool centered, bool momentum) {
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
}

template <typename P, typename S, bool kMaster>
__global__ void __launch_bounds__(mta::kThreads, mta::kMinBlocks)
    rmsprop_kernel(const __grid_constant__ RmspropChunks chunks,
                   const __grid_constant__ RmspropLaunch a) {
  using M = std::conditional_t<std::is_same_v<P, double>, double, float>;
  constexpr int kVec = sizeof(P) == 8 ? 2 : 16 / int(sizeof(P));  // 16 bytes of params

  int t;
  int64_t chunk;
  mta::locate(chunks, int64_t(blockIdx.x), &t, &chunk);

  __shared__ om::RmspropCoeffs<M> coeffs;
  __shared__ bool skip;
  if (threadIdx.x == 0) {
    skip = a.found_inf.ptr != nullptr && mta::read(a.found_inf) != 0.0;
    if (!skip) coeffs = om::rmsprop_coeffs<M>(a.hyper, mta::read(a.lr), mta::read(a.grad_scale));
  }
  __syncthreads();
  if (skip) return;  // GradScaler found an inf / NaN: nothing is written
  const om::RmspropCoeffs<M> c = coeffs;

  const int64_t start = chunk * mta::kChunkSize;
  const int64_t left = chunks.numel[t] - start;
  const int64_t n = left < mta::kChunkSize ? left : mta::kChunkSize;
  P* param = static_cast<P*>(chunks.ptr[0][t]) + start;
  const P* grad = static_cast<const P*>(chunks.ptr[1][t]) + start;
  S* sq = static_cast<S*>(chunks.ptr[2][t]) + start;
  S* grad_avg = a.centered ? static_cast<S*>(chunks.ptr[3][t]) + start : nullptr;
  S* buf = a.momentum ? static_cast<S*>(chunks.ptr[4][t]) + start : nullptr;
  float* master = kMaster ? static_cast<float*>(chunks.ptr[5][t]) + start : nullptr;

  const bool vec = mta::aligned<kVec>(param) && mta::aligned<kVec>(grad) &&
                   mta::aligned<kVec>(sq) && (!a.centered || mta::aligned<kVec>(grad_avg)) &&
                   (!a.momentum || mta::aligned<kVec>(buf)) &&
                   (!kMaster || mta::aligned<kVec>(master));
  const int64_t n_vec = vec ? n / kVec * kVec : 0;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < n_vec; i += int64_t(blockDim.x) * kVec) {
    update_elements<kVec, P, S, M, kMaster>(i, param, grad, sq, grad_avg, buf, master, c, a.l2,
                                            a.centered, a.momentum);
  }
  for (int64_t i = n_vec + threadIdx.x; i < n; i += blockDim.x) {
    update_elements<1, P, S, M, kMaster>(i, param, grad, sq, grad_avg, buf, master, c, a.l2,
                                         a.centered, a.momentum);
  }
}

// ---- Op entry point -----------------------------------------------------------------------------

bool same_layout(const at::Tensor& a, const at::Tensor& ref) {
  if (a.is_contiguous() && ref.is_contiguous()) return true;
  return a.is_non_overlapping_and_dense() && a.strides() == ref.strides();
}

void check_like(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param,
                c10::ScalarType dtype) {
  TORCH_CHECK(t.device() == param.device(), "fastnn: rmsprop_step_: ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), "fastnn: rmsprop_step_: ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastnn: rmsprop_step_: ", list, "[", i, "] is ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(same_layout(t, param), "fastnn: rmsprop_step_: ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides(),
              "; optimizer state must have its parameter's memory layout");
}

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers,
                       at::TensorList master_params, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double lr, double alpha,
                       double eps, double weight_decay, double momentum, bool centered,
                       bool maximize) {
  const size_t n = params.size();
  auto check_len = [&](at::TensorList list, const char* name) {
    TORCH_CHECK(list.size() == n, "fastnn: rmsprop_step_: ", name, " has ", list.size(),
                " tensors but params has ", n);
  };
  const bool use_momentum = momentum > 0.0;
  check_len(grads, "grads");
  check_len(square_avgs, "square_avgs");
  if (centered) check_len(grad_avgs, "grad_avgs (centered=True)");
  if (use_momentum) check_len(momentum_buffers, "momentum_buffers (momentum > 0)");
  const bool has_master = !master_params.empty();
  if (has_master) check_len(master_params, "master_params");
  if (n == 0) return;

  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep;
  RmspropLaunch a;
  a.found_inf = mta::scalar_arg(found_inf, 0.0, device, "rmsprop_step_", "found_inf", keep);
  if (a.found_inf.ptr == nullptr && a.found_inf.value != 0.0) return;  // host inf: no change
  a.grad_scale = mta::scalar_arg(grad_scale, 1.0, device, "rmsprop_step_", "grad_scale", keep);
  a.lr = mta::scalar_arg(lr_tensor, lr, device, "rmsprop_step_", "lr_tensor", keep);
  a.hyper = om::RmspropHyper{alpha, eps, weight_decay, momentum, maximize};
  a.l2 = weight_decay != 0.0;
  a.centered = centered;
  a.momentum = use_momentum;

  std::vector<at::Tensor> grads_used(grads.begin(), grads.end());
  std::vector<std::tuple<int, int, bool>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_same_device(p, "params[i]", params[0], "params[0]");
    TORCH_CHECK(p.is_cuda(), "fastnn: rmsprop_step_ (CUDA): params[", i, "] is on ", p.device());
    check_float(p, "params");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fastnn: rmsprop_step_: params[", i,
                "] must be dense (no gaps or overlaps), got strides ", p.strides());
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided, "fastnn: rmsprop_step_: grads[", i,
                "] is sparse; RMSprop does not support sparse gradients");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "fastnn: rmsprop_step_: grads[", i, "] is ",
                g.scalar_type(), " but params[", i, "] is ", p.scalar_type());
    TORCH_CHECK(g.device() == p.device() && g.sizes() == p.sizes(), "fastnn: rmsprop_step_: grads[",
                i, "] (", g.sizes(), " on ", g.device(), ") does not match params[", i, "] (",
                p.sizes(), " on ", p.device(), ")");
    if (!same_layout(g, p)) grads_used[i] = at::empty_like(p).copy_(g);  // read-only: relay out
    const c10::ScalarType st = square_avgs[i].scalar_type();
    TORCH_CHECK(st == p.scalar_type() || st == at::kFloat, "fastnn: rmsprop_step_: square_avgs[", i,
                "] is ", st, "; optimizer state must be float32 or its param's dtype (",
                p.scalar_type(), ")");
    check_like(square_avgs[i], "square_avgs", i, p, st);
    if (centered) check_like(grad_avgs[i], "grad_avgs", i, p, st);
    if (use_momentum) check_like(momentum_buffers[i], "momentum_buffers", i, p, st);
    if (has_master) {
      TORCH_CHECK(p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                  "fastnn: rmsprop_step_: master_params are fp32 copies of float16 / bfloat16 "
                  "params, but params[",
                  i, "] is ", p.scalar_type());
      check_like(master_params[i], "master_params", i, p, at::kFloat);
    }
    keys[i] = {int(p.scalar_type()), int(st), has_master};
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [key, indices] : mta::group_by<std::tuple<int, int, bool>>(int64_t(n), keys)) {
    const auto pt = c10::ScalarType(std::get<0>(key));
    const auto st = c10::ScalarType(std::get<1>(key));
    mta::dispatch_dtypes(pt, st, has_master, [&]<typename P, typename S, bool kMaster>() {
      auto fill = [&](RmspropChunks& c, int slot, int64_t i) -> int64_t {
        c.ptr[0][slot] = params[i].data_ptr();
        c.ptr[1][slot] = const_cast<void*>(grads_used[i].const_data_ptr());
        c.ptr[2][slot] = square_avgs[i].data_ptr();
        c.ptr[3][slot] = centered ? grad_avgs[i].data_ptr() : nullptr;
        c.ptr[4][slot] = use_momentum ? momentum_buffers[i].data_ptr() : nullptr;
        c.ptr[5][slot] = kMaster ? master_params[i].data_ptr() : nullptr;
        return params[i].numel();
      };
      auto launch = [&](const RmspropChunks& c, int64_t blocks) {
        rmsprop_kernel<P, S, kMaster><<<unsigned(blocks), mta::kThreads, 0, stream>>>(c, a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      mta::pack_and_launch<RmspropChunks>(indices, fill, launch);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) { m.impl("rmsprop_step_", &rmsprop_step_cuda); }

}  // namespace fastnn::cuda
