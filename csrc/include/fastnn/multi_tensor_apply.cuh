// Multi-tensor apply for the optimizer updates (csrc/cuda/adam.cu, csrc/cuda/rmsprop.cu): one
// launch updates many tensors.
//
// Each tensor is cut into chunks of kChunkSize elements and each block updates one chunk. The
// tensors' pointers, sizes and cumulative chunk counts travel in the kernel's parameters: since
// CUDA 12.1 a kernel on sm_70+ may take 32764 bytes of parameters (4 KB before), which holds a few
// hundred tensors, so a model's parameter list usually needs one launch per (device, dtype) group.
// A block finds its tensor by binary search over the cumulative chunk counts (about 9 steps for
// 400 tensors, all threads reading the same parameter word: a broadcast). Sizes and offsets are
// int64 throughout.
//
// Also here: the host side that packs tensors into launches, the scalar arguments that are either
// host values or device scalars (capturable: nothing on the host reads device memory), vector
// loads and stores, and the dispatch over the storage dtypes the optimizers accept.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastnn {
namespace mta {

// 64K elements per block: 512 threads x 16-byte vectors go over a chunk of fp32 in 32 steps,
// enough work per block to hide the per-block setup (tensor search, coefficients).
constexpr int64_t kChunkSize = 65536;
constexpr int kThreads = 512;
// Two resident blocks per SM (registers capped at 64): while one block's thread 0 computes its
// tensor's coefficients (a double pow for device-side steps), the other keeps memory busy.
constexpr int kMinBlocks = 2;
// Kernel parameter space on sm_70+ with CUDA >= 12.1 (the toolkit here is 13.0).
constexpr size_t kParamBytes = 32764;

// The tensors of one launch. ptr[l][t] is list l's tensor t at element 0 (all lists of tensor t
// share its size and dense layout); chunk_end[t] = chunks of tensors 0..t, so tensor t owns the
// blocks [chunk_end[t - 1], chunk_end[t]). Extra: per-tensor data of the op (e.g. Adam's step).
template <int kLists, typename Extra, int kMaxTensors>
struct TensorChunks {
  static constexpr int kCapacity = kMaxTensors;
  void* ptr[kLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_end[kMaxTensors];
  Extra extra[kMaxTensors];
  int num_tensors;
};

// How many tensors fit when `reserve` bytes of parameters go to the kernel's other arguments.
template <int kLists, typename Extra>
constexpr int capacity(size_t reserve) {
  return int((kParamBytes - reserve - 16) /
             (kLists * sizeof(void*) + 2 * sizeof(int64_t) + sizeof(Extra)));
}

// The tensor that block `block` works on, and its chunk within that tensor.
template <typename Chunks>
__device__ __forceinline__ void locate(const Chunks& c, int64_t block, int* tensor,
                                       int64_t* chunk) {
  int lo = 0, hi = c.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (c.chunk_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  *tensor = lo;
  *chunk = block - (lo == 0 ? 0 : c.chunk_end[lo - 1]);
}

// The elements of block `blockIdx.x`: tensor `t`, its elements [start, start + n).
struct ChunkSpan {
  int t;
  int64_t start;
  int64_t n;
};

template <typename Chunks>
__device__ __forceinline__ ChunkSpan chunk_span(const Chunks& c) {
  int t;
  int64_t chunk;
  locate(c, int64_t(blockIdx.x), &t, &chunk);
  const int64_t start = chunk * kChunkSize;
  const int64_t left = c.numel[t] - start;
  return {t, start, left < kChunkSize ? left : kChunkSize};
}

// The block's threads over elements [0, n): f.template operator()<kVec>(i) on kVec consecutive
// elements from i while whole vectors remain (only when `vec`: every pointer aligned), then
// f.template operator()<1>(i) on the rest.
template <int kVec, typename F>
__device__ __forceinline__ void for_each_element(int64_t n, bool vec, F&& f) {
  const int64_t n_vec = vec ? n / kVec * kVec : 0;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < n_vec; i += int64_t(blockDim.x) * kVec) {
    f.template operator()<kVec>(i);
  }
  for (int64_t i = n_vec + threadIdx.x; i < n; i += blockDim.x) f.template operator()<1>(i);
}

// Packs the tensors `indices` (in order, zero-size ones skipped) into as few launches as the
// parameter space allows. fill(chunks, slot, i) writes tensor i's pointers and extra into `slot`
// and returns its numel; launch(chunks, num_blocks) launches one kernel.
template <typename Chunks, typename Fill, typename Launch>
void pack_and_launch(const std::vector<int64_t>& indices, Fill&& fill, Launch&& launch) {
  Chunks c;  // about 30 KB, on the host stack
  c.num_tensors = 0;
  int64_t blocks = 0;
  for (const int64_t i : indices) {
    const int slot = c.num_tensors;
    const int64_t numel = fill(c, slot, i);
    if (numel == 0) continue;
    blocks += (numel + kChunkSize - 1) / kChunkSize;
    c.numel[slot] = numel;
    c.chunk_end[slot] = blocks;
    c.num_tensors = slot + 1;
    // grid.x is at most 2^31 - 1 blocks (1.4e14 elements): start a new launch well before.
    if (c.num_tensors == Chunks::kCapacity || blocks > (int64_t(1) << 30)) {
      launch(c, blocks);
      c.num_tensors = 0;
      blocks = 0;
    }
  }
  if (c.num_tensors > 0) launch(c, blocks);
}

// ---- Scalars that are host values or device scalars --------------------------------------------

// A scalar argument: `value` when ptr is null, else read in the kernel from device memory
// (float32 or float64), so a captured CUDA graph reads the current value on every replay.
struct ScalarArg {
  const void* ptr;
  double value;
  bool is_double;
};

__device__ __forceinline__ double read(const ScalarArg& s) {
  if (s.ptr == nullptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr)
                     : static_cast<double>(*static_cast<const float*>(s.ptr));
}

// `t` (optional one-element tensor) as a ScalarArg for kernels on `device`: a CPU tensor is read
// now (host memory, no synchronisation), a device tensor is passed by pointer (a float16 / bfloat16
// one is first widened to float32 on the device, kept alive in `keep`). Absent: `fallback`.
inline ScalarArg scalar_arg(const std::optional<at::Tensor>& t, double fallback,
                            const at::Device& device, const char* op, const char* name,
                            std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return {nullptr, fallback, false};
  TORCH_CHECK(t->numel() == 1, "fastnn: ", op, ": ", name, " must have one element, got shape ",
              t->sizes());
  if (t->device().is_cpu()) return {nullptr, t->item<double>(), false};
  TORCH_CHECK(t->device() == device, "fastnn: ", op, ": ", name, " is on ", t->device(),
              " but params are on ", device);
  at::Tensor x = *t;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) {
    x = x.to(at::kFloat);
    keep.push_back(x);
  }
  return {x.const_data_ptr(), 0.0, x.scalar_type() == at::kDouble};
}

// The scalar arguments every optimizer launch takes (found_inf, grad_scale, lr) set in `a`.
// Returns false when found_inf is a host value != 0 (GradScaler saw an inf / NaN): nothing to do.
template <typename Launch>
bool set_scalar_args(Launch& a, const std::optional<at::Tensor>& lr_tensor, double lr,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const at::Device& device,
                     const char* op, std::vector<at::Tensor>& keep) {
  // All three are checked before a skip, as the CPU ops check them: a bad grad_scale fails on
  // every step, not only on the steps without an inf.
  a.found_inf = scalar_arg(found_inf, 0.0, device, op, "found_inf", keep);
  a.grad_scale = scalar_arg(grad_scale, 1.0, device, op, "grad_scale", keep);
  a.lr = scalar_arg(lr_tensor, lr, device, op, "lr_tensor", keep);
  return a.found_inf.ptr != nullptr || a.found_inf.value == 0.0;
}

// ---- Vector loads and stores --------------------------------------------------------------------

// A vector access moves at most 16 bytes (sm_90's widest load): N elements of a wider dtype (8
// fp32 grads or state beside 16-bit params) are several 16-byte packs, so they need 16-byte
// alignment only, as a DDP bucket view of fp32 grads may have no more.
template <typename T, int N>
constexpr int kPackElems = int(sizeof(T)) * N > 16 ? 16 / int(sizeof(T)) : N;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kPackElems<T, N>) == 0;
}

template <typename T>
constexpr bool is_low_precision_v =
    std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

template <typename M, typename T>
__device__ __forceinline__ M to_math(T x) {
  if constexpr (is_low_precision_v<T>) {
    return static_cast<M>(static_cast<float>(x));
  } else {
    return static_cast<M>(x);
  }
}

template <typename T, typename M>
__device__ __forceinline__ T from_math(M x) {
  if constexpr (is_low_precision_v<T>) {
    return T(static_cast<float>(x));  // round to nearest even, as copy_ does
  } else {
    return static_cast<T>(x);
  }
}

// N elements from p (aligned<N>(p) when N > 1), widened to M.
template <int N, typename M, typename T>
__device__ __forceinline__ void load(const T* p, M (&out)[N]) {
  constexpr int kE = kPackElems<T, N>;
#pragma unroll
  for (int k = 0; k < N; k += kE) {
    const Pack<T, kE> pk = *reinterpret_cast<const Pack<T, kE>*>(p + k);
#pragma unroll
    for (int j = 0; j < kE; ++j) out[k + j] = to_math<M>(pk.v[j]);
  }
}

template <int N, typename M, typename T>
__device__ __forceinline__ void store(T* p, const M (&in)[N]) {
  constexpr int kE = kPackElems<T, N>;
#pragma unroll
  for (int k = 0; k < N; k += kE) {
    Pack<T, kE> pk;
#pragma unroll
    for (int j = 0; j < kE; ++j) pk.v[j] = from_math<T>(in[k + j]);
    *reinterpret_cast<Pack<T, kE>*>(p + k) = pk;
  }
}

// ---- Storage dtypes -----------------------------------------------------------------------------

// Calls f.template operator()<P, S, G, kMaster>() for params of dtype p, state of dtype s, grads
// of dtype g and (kMaster) fp32 master weights. The combinations the op entry points accept: fp32
// params with fp32 state and grads; fp64 params and grads with fp64 or fp32 state; fp16 / bf16
// params with state in their dtype or fp32, grads in their dtype or fp32 (Tensor.grad_dtype), with
// or without master weights. (19 instantiations per kernel.)
template <typename F>
void dispatch_dtypes(c10::ScalarType p, c10::ScalarType s, c10::ScalarType g, bool master, F&& f) {
  TORCH_INTERNAL_ASSERT(!master || p == at::kHalf || p == at::kBFloat16);
  auto low = [&]<typename P>() {
    TORCH_INTERNAL_ASSERT((s == p || s == at::kFloat) && (g == p || g == at::kFloat));
    auto with_state = [&]<typename S>() {
      if (g == at::kFloat) {
        return master ? f.template operator()<P, S, float, true>()
                      : f.template operator()<P, S, float, false>();
      }
      return master ? f.template operator()<P, S, P, true>()
                    : f.template operator()<P, S, P, false>();
    };
    return s == at::kFloat ? with_state.template operator()<float>()
                           : with_state.template operator()<P>();
  };
  switch (p) {
    case at::kFloat:
      TORCH_INTERNAL_ASSERT(s == at::kFloat && g == at::kFloat);
      return f.template operator()<float, float, float, false>();
    case at::kDouble:
      TORCH_INTERNAL_ASSERT(g == at::kDouble);
      return s == at::kDouble ? f.template operator()<double, double, double, false>()
                              : f.template operator()<double, float, double, false>();
    case at::kHalf:
      return low.template operator()<c10::Half>();
    case at::kBFloat16:
      return low.template operator()<c10::BFloat16>();
    default:
      TORCH_INTERNAL_ASSERT(false, "fastnn: unexpected param dtype ", p);
  }
}

// Tensor indices grouped by a key, in first-seen order (few groups: a plain vector).
template <typename Key>
std::vector<std::pair<Key, std::vector<int64_t>>> group_by(int64_t n,
                                                           const std::vector<Key>& keys) {
  std::vector<std::pair<Key, std::vector<int64_t>>> groups;
  for (int64_t i = 0; i < n; ++i) {
    auto it = groups.begin();
    while (it != groups.end() && !(it->first == keys[i])) ++it;
    if (it == groups.end()) {
      groups.push_back({keys[i], {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

// The tensors grouped by key (param dtype, state dtype, grad dtype, master weights), in first-seen
// order; per group, f.template operator()<P, S, G, kMaster>(indices) with its tensor indices.
using DtypeKey = std::tuple<int, int, int, bool>;

template <typename F>
void for_each_dtype_group(const std::vector<DtypeKey>& keys, bool has_master, F&& f) {
  for (const auto& [key, indices] : group_by<DtypeKey>(int64_t(keys.size()), keys)) {
    const auto pt = c10::ScalarType(std::get<0>(key));
    const auto st = c10::ScalarType(std::get<1>(key));
    const auto gt = c10::ScalarType(std::get<2>(key));
    dispatch_dtypes(pt, st, gt, has_master,
                    [&]<typename P, typename S, typename G, bool kMaster>() {
                      f.template operator()<P, S, G, kMaster>(indices);
                    });
  }
}

}  // namespace mta
}  // namespace fastnn
