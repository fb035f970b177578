// RMSprop update on the CPU (schema fastnn::rmsprop_step_ in csrc/library.cpp, semantics of
// fastnn/reference/rmsprop.py, per-element math in fastnn/rmsprop_math.h).
//
// Same plan as csrc/cpu/adam.cpp: one pass, the tensors laid end to end and the concatenated
// index space split evenly over the threads; tiles of kTile elements, fp16 / bf16 widened to fp32
// in a tile buffer (fp32 / fp64 used in place), the shared update over 16-byte host vectors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // F16C conversions
#endif

#include "fastnn/checks.h"
#include "fastnn/rmsprop_math.h"

namespace fastnn::cpu {
namespace {

namespace om = fastnn::optim_math;

constexpr int64_t kTile = 512;     // five fp32 tile buffers: 10 KB, inside L1
constexpr int64_t kGrain = 32768;  // below this a second thread costs more than it saves
constexpr int kVecBytes = 16;

struct RmspropWork {
  void* param;
  const void* grad;
  void* square_avg;
  void* grad_avg;  // nullptr unless centered
  void* buf;       // nullptr unless momentum > 0
  float* master;   // nullptr without master weights
  c10::ScalarType param_dtype, state_dtype;
};

// ---- Tiles: storage dtype <-> math type M -------------------------------------------------------

template <typename S, typename M>
void widen(const S* __restrict src, M* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<M>(static_cast<float>(src[i]));
}

template <typename S, typename M>
void narrow(const M* __restrict src, S* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(static_cast<float>(src[i]));
}

// bf16 <-> fp32 by bit operations, which GCC vectorises (the c10::BFloat16 conversions stay
// scalar): widening is a 16-bit shift; narrowing rounds to nearest even with NaN -> 0x7FC0,
// bit for bit as c10::BFloat16(float) does.
inline void widen(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(s[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

inline void narrow(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
  uint16_t* __restrict d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    const uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    d[i] = src[i] != src[i] ? uint16_t(0x7FC0) : rounded;
  }
}

// fp16 <-> fp32: c10::Half's conversions are scalar bit manipulation (about 10x slower than the
// update itself); x86 CPUs since 2012 convert 8 values per instruction (F16C, round to nearest
// even, as c10 does), chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void narrow_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

bool has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

inline void widen(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_f16c()) return widen_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void narrow(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_f16c()) return narrow_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

template <typename M>
constexpr c10::ScalarType scalar_type_of() {
  return std::is_same_v<M, double> ? at::kDouble : at::kFloat;
}

template <typename M>
M* load_tile(const void* base, c10::ScalarType st, int64_t off, int64_t n, M* buf) {
  if (st == scalar_type_of<M>()) return const_cast<M*>(static_cast<const M*>(base)) + off;
  switch (st) {
    case at::kFloat:
      widen(static_cast<const float*>(base) + off, buf, n);
      break;
    case at::kHalf:
      widen(static_cast<const c10::Half*>(base) + off, buf, n);
      break;
    case at::kBFloat16:
      widen(static_cast<const c10::BFloat16*>(base) + off, buf, n);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "fastnn: rmsprop_step_ tile of ", st);
  }
  return buf;
}

template <typename M>
void store_tile(const M* tile, void* base, c10::ScalarType st, int64_t off, int64_t n) {
  if (st == scalar_type_of<M>() && tile == static_cast<const M*>(base) + off) return;
  switch (st) {
    case at::kFloat:
      narrow(tile, static_cast<float*>(base) + off, n);
      break;
    case at::kHalf:
      narrow(tile, static_cast<c10::Half*>(base) + off, n);
      break;
    case at::kBFloat16:
      narrow(tile, static_cast<c10::BFloat16*>(base) + off, n);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "fastnn: rmsprop_step_ tile of ", st);
  }
}

// ---- The update over arrays ---------------------------------------------------------------------

template <bool kL2, bool kCentered, bool kMomentum, typename M>
void update_arrays(M* __restrict p, const M* __restrict g, M* __restrict sq, M* __restrict ga,
                   M* __restrict buf, int64_t n, const om::RmspropCoeffs<M>& c) {
  using V = typename om::host_vec<M, kVecBytes>::type;
  constexpr int64_t kLanes = kVecBytes / sizeof(M);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V pv, gv, sv, av = {}, bv = {};
    std::memcpy(&pv, p + i, kVecBytes);
    std::memcpy(&gv, g + i, kVecBytes);
    std::memcpy(&sv, sq + i, kVecBytes);
    if (kCentered) std::memcpy(&av, ga + i, kVecBytes);
    if (kMomentum) std::memcpy(&bv, buf + i, kVecBytes);
    om::rmsprop_update(pv, gv, sv, av, bv, c, kL2, kCentered, kMomentum);
    std::memcpy(p + i, &pv, kVecBytes);
    std::memcpy(sq + i, &sv, kVecBytes);
    if (kCentered) std::memcpy(ga + i, &av, kVecBytes);
    if (kMomentum) std::memcpy(buf + i, &bv, kVecBytes);
  }
  for (; i < n; ++i) {
    M a = kCentered ? ga[i] : M(0);
    M b = kMomentum ? buf[i] : M(0);
    om::rmsprop_update(p[i], g[i], sq[i], a, b, c, kL2, kCentered, kMomentum);
    if (kCentered) ga[i] = a;
    if (kMomentum) buf[i] = b;
  }
}

// Elements [lo, hi) of one tensor.
template <bool kL2, bool kCentered, bool kMomentum, typename M>
void update_range(const RmspropWork& w, const om::RmspropCoeffs<M>& c, int64_t lo, int64_t hi) {
  alignas(64) M pb[kTile], gb[kTile], sb[kTile], ab[kTile], bb[kTile];
  const c10::ScalarType pt = w.param_dtype, st = w.state_dtype;
  for (int64_t off = lo; off < hi; off += kTile) {
    const int64_t n = std::min(kTile, hi - off);
    M* p = w.master ? load_tile<M>(w.master, at::kFloat, off, n, pb)
                    : load_tile<M>(w.param, pt, off, n, pb);
    const M* g = load_tile<M>(w.grad, pt, off, n, gb);
    M* sq = load_tile<M>(w.square_avg, st, off, n, sb);
    M* ga = kCentered ? load_tile<M>(w.grad_avg, st, off, n, ab) : nullptr;
    M* buf = kMomentum ? load_tile<M>(w.buf, st, off, n, bb) : nullptr;
    update_arrays<kL2, kCentered, kMomentum>(p, g, sq, ga, buf, n, c);
    if (w.master) store_tile<M>(p, w.master, at::kFloat, off, n);
    store_tile<M>(p, w.param, pt, off, n);
    store_tile<M>(sq, w.square_avg, st, off, n);
    if (kCentered) store_tile<M>(ga, w.grad_avg, st, off, n);
    if (kMomentum) store_tile<M>(buf, w.buf, st, off, n);
  }
}

struct Coeffs {
  om::RmspropCoeffs<float> f;
  om::RmspropCoeffs<double> d;
};

template <bool kL2, bool kCentered, bool kMomentum>
void update_tensor(const RmspropWork& w, const Coeffs& c, int64_t lo, int64_t hi) {
  if (w.param_dtype == at::kDouble) {
    update_range<kL2, kCentered, kMomentum>(w, c.d, lo, hi);
  } else {
    update_range<kL2, kCentered, kMomentum>(w, c.f, lo, hi);
  }
}

using UpdateFn = void (*)(const RmspropWork&, const Coeffs&, int64_t, int64_t);

template <bool kL2>
UpdateFn pick(bool centered, bool momentum) {
  if (centered) {
    return momentum ? &update_tensor<kL2, true, true> : &update_tensor<kL2, true, false>;
  }
  return momentum ? &update_tensor<kL2, false, true> : &update_tensor<kL2, false, false>;
}

// ---- Op entry point -----------------------------------------------------------------------------

bool same_layout(const at::Tensor& a, const at::Tensor& ref) {
  if (a.is_contiguous() && ref.is_contiguous()) return true;
  return a.is_non_overlapping_and_dense() && a.strides() == ref.strides();
}

void check_state(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param,
                 c10::ScalarType st) {
  TORCH_CHECK(t.device() == param.device(), "fastnn: rmsprop_step_: ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), "fastnn: rmsprop_step_: ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(t.scalar_type() == st, "fastnn: rmsprop_step_: ", list, "[", i, "] is ",
              t.scalar_type(), ", expected ", st);
  TORCH_CHECK(same_layout(t, param), "fastnn: rmsprop_step_: ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides(),
              "; optimizer state must have its parameter's memory layout");
}

double host_scalar(const std::optional<at::Tensor>& t, const char* name, double fallback) {
  if (!t.has_value() || !t->defined()) return fallback;
  TORCH_CHECK(t->numel() == 1, "fastnn: rmsprop_step_: ", name,
              " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "fastnn: rmsprop_step_: ", name,
              " must be a CPU tensor for CPU params, got ", t->device());
  return t->item<double>();
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
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

  if (host_scalar(found_inf, "found_inf", 0.0) != 0.0) return;  // nothing is written
  const double scale = host_scalar(grad_scale, "grad_scale", 1.0);
  if (lr_tensor.has_value() && lr_tensor->defined()) lr = host_scalar(lr_tensor, "lr_tensor", lr);

  const om::RmspropHyper hyper{alpha, eps, weight_decay, momentum, maximize};
  const Coeffs coeffs{om::rmsprop_coeffs<float>(hyper, lr, scale),
                      om::rmsprop_coeffs<double>(hyper, lr, scale)};
  std::vector<RmspropWork> work;
  std::vector<int64_t> ends;  // cumulative element counts
  std::vector<at::Tensor> relaid;
  work.reserve(n);
  ends.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "fastnn: rmsprop_step_ (CPU): params[", i, "] is on ",
                p.device());
    check_float(p, "params");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fastnn: rmsprop_step_: params[", i,
                "] must be dense (no gaps or overlaps), got strides ", p.strides());
    const at::Tensor& g_in = grads[i];
    TORCH_CHECK(g_in.layout() == at::kStrided, "fastnn: rmsprop_step_: grads[", i,
                "] is sparse; RMSprop does not support sparse gradients");
    TORCH_CHECK(g_in.scalar_type() == p.scalar_type(), "fastnn: rmsprop_step_: grads[", i, "] is ",
                g_in.scalar_type(), " but params[", i, "] is ", p.scalar_type());
    TORCH_CHECK(g_in.device() == p.device() && g_in.sizes() == p.sizes(),
                "fastnn: rmsprop_step_: grads[", i, "] (", g_in.sizes(), " on ", g_in.device(),
                ") does not match params[", i, "] (", p.sizes(), " on ", p.device(), ")");
    at::Tensor g = g_in;
    if (!same_layout(g, p)) {
      relaid.push_back(at::empty_like(p).copy_(g));  // read-only: copy into the param's layout
      g = relaid.back();
    }
    const c10::ScalarType st = square_avgs[i].scalar_type();
    TORCH_CHECK(st == p.scalar_type() || st == at::kFloat, "fastnn: rmsprop_step_: square_avgs[", i,
                "] is ", st, "; optimizer state must be float32 or its param's dtype (",
                p.scalar_type(), ")");
    check_state(square_avgs[i], "square_avgs", i, p, st);
    if (centered) check_state(grad_avgs[i], "grad_avgs", i, p, st);
    if (use_momentum) check_state(momentum_buffers[i], "momentum_buffers", i, p, st);
    if (has_master) {
      TORCH_CHECK(p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                  "fastnn: rmsprop_step_: master_params are fp32 copies of float16 / bfloat16 "
                  "params, but params[",
                  i, "] is ", p.scalar_type());
      check_state(master_params[i], "master_params", i, p, at::kFloat);
    }
    if (p.numel() == 0) continue;
    RmspropWork w;
    w.param = p.data_ptr();
    w.grad = g.const_data_ptr();
    w.square_avg = square_avgs[i].data_ptr();
    w.grad_avg = centered ? grad_avgs[i].data_ptr() : nullptr;
    w.buf = use_momentum ? momentum_buffers[i].data_ptr() : nullptr;
    w.master = has_master ? master_params[i].data_ptr<float>() : nullptr;
    w.param_dtype = p.scalar_type();
    w.state_dtype = st;
    work.push_back(w);
    total += p.numel();
    ends.push_back(total);
  }
  if (total == 0) return;

  const UpdateFn fn = weight_decay != 0.0 ? pick<true>(centered, use_momentum)
                                          : pick<false>(centered, use_momentum);
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    for (; begin < end; ++t) {
      const int64_t start = t == 0 ? 0 : ends[t - 1];
      const int64_t stop = std::min(end, ends[t]);
      fn(work[t], coeffs, begin - start, stop - start);
      begin = stop;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) { m.impl("rmsprop_step_", &rmsprop_step_cpu); }

}  // namespace fastnn::cpu
