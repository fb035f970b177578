// Adam / AdamW update on the CPU (schema fastnn::adam_step_ in csrc/library.cpp, semantics of
// fastnn/reference/adam.py, per-element math in fastnn/adam_math.h).
//
// One pass over every element of every tensor. The tensors are laid end to end and the
// concatenated index space is split evenly over the threads (at::parallel_for), so hundreds of
// small tensors do not serialise and one large tensor still uses every core. Each thread walks its
// range in tiles of kTile elements: fp16 / bf16 values are widened to fp32 into a tile buffer
// (fp32 and fp64 arrays are used in place), the shared update runs over host vectors of 16 bytes,
// and the results are rounded back. Per-tensor coefficients (bias corrections from the host-side
// step counts) are computed once, in double, before the pass.
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

#include "fastnn/adam_math.h"
#include "fastnn/checks.h"

namespace fastnn::cpu {
namespace {

namespace om = fastnn::optim_math;

// 512 elements: five fp32 tile buffers take 10 KB, well inside a 32 KB L1.
constexpr int64_t kTile = 512;
// Below about 32K elements a second thread costs more than it saves (OpenMP wake-up ~ 10 us).
constexpr int64_t kGrain = 32768;
constexpr int kVecBytes = 16;

// One tensor's pointers (all at element 0, same dense layout) and coefficients.
struct AdamWork {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr without amsgrad
  float* master;         // nullptr without master weights
  c10::ScalarType param_dtype, state_dtype;
  om::AdamCoeffs<float> cf;
  om::AdamCoeffs<double> cd;
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

// Elements [off, off + n) of `base` (dtype st) as M values: the array itself when st is M,
// else widened into buf.
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
      TORCH_INTERNAL_ASSERT(false, "fastnn: adam_step_ tile of ", st);
  }
  return buf;
}

// Writes a tile back when it was widened (an in-place array needs nothing).
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
      TORCH_INTERNAL_ASSERT(false, "fastnn: adam_step_ tile of ", st);
  }
}

// ---- The update over arrays ---------------------------------------------------------------------

template <bool kL2, bool kDecoupled, bool kAmsgrad, typename M>
void update_arrays(M* __restrict p, const M* __restrict g, M* __restrict m, M* __restrict v,
                   M* __restrict v_max, int64_t n, const om::AdamCoeffs<M>& c) {
  using V = typename om::host_vec<M, kVecBytes>::type;
  constexpr int64_t kLanes = kVecBytes / sizeof(M);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V pv, gv, mv, vv, xv = {};
    std::memcpy(&pv, p + i, kVecBytes);
    std::memcpy(&gv, g + i, kVecBytes);
    std::memcpy(&mv, m + i, kVecBytes);
    std::memcpy(&vv, v + i, kVecBytes);
    if (kAmsgrad) std::memcpy(&xv, v_max + i, kVecBytes);
    om::adam_update(pv, gv, mv, vv, xv, c, kL2, kDecoupled, kAmsgrad);
    std::memcpy(p + i, &pv, kVecBytes);
    std::memcpy(m + i, &mv, kVecBytes);
    std::memcpy(v + i, &vv, kVecBytes);
    if (kAmsgrad) std::memcpy(v_max + i, &xv, kVecBytes);
  }
  for (; i < n; ++i) {
    M x = kAmsgrad ? v_max[i] : M(0);
    om::adam_update(p[i], g[i], m[i], v[i], x, c, kL2, kDecoupled, kAmsgrad);
    if (kAmsgrad) v_max[i] = x;
  }
}

// Elements [lo, hi) of one tensor.
template <bool kL2, bool kDecoupled, bool kAmsgrad, typename M>
void update_range(const AdamWork& w, const om::AdamCoeffs<M>& c, int64_t lo, int64_t hi) {
  alignas(64) M pb[kTile], gb[kTile], mb[kTile], vb[kTile], xb[kTile];
  const c10::ScalarType pt = w.param_dtype, st = w.state_dtype;
  for (int64_t off = lo; off < hi; off += kTile) {
    const int64_t n = std::min(kTile, hi - off);
    M* p = w.master ? load_tile<M>(w.master, at::kFloat, off, n, pb)
                    : load_tile<M>(w.param, pt, off, n, pb);
    const M* g = load_tile<M>(w.grad, pt, off, n, gb);
    M* m = load_tile<M>(w.exp_avg, st, off, n, mb);
    M* v = load_tile<M>(w.exp_avg_sq, st, off, n, vb);
    M* x = kAmsgrad ? load_tile<M>(w.max_exp_avg_sq, st, off, n, xb) : nullptr;
    update_arrays<kL2, kDecoupled, kAmsgrad>(p, g, m, v, x, n, c);
    if (w.master) store_tile<M>(p, w.master, at::kFloat, off, n);
    store_tile<M>(p, w.param, pt, off, n);
    store_tile<M>(m, w.exp_avg, st, off, n);
    store_tile<M>(v, w.exp_avg_sq, st, off, n);
    if (kAmsgrad) store_tile<M>(x, w.max_exp_avg_sq, st, off, n);
  }
}

template <bool kL2, bool kDecoupled, bool kAmsgrad>
void update_tensor(const AdamWork& w, int64_t lo, int64_t hi) {
  if (w.param_dtype == at::kDouble) {
    update_range<kL2, kDecoupled, kAmsgrad>(w, w.cd, lo, hi);
  } else {
    update_range<kL2, kDecoupled, kAmsgrad>(w, w.cf, lo, hi);
  }
}

using UpdateFn = void (*)(const AdamWork&, int64_t, int64_t);

template <bool kL2, bool kDecoupled>
UpdateFn pick(bool amsgrad) {
  return amsgrad ? &update_tensor<kL2, kDecoupled, true> : &update_tensor<kL2, kDecoupled, false>;
}

// ---- Op entry point -----------------------------------------------------------------------------

// Same elements in the same order: both contiguous, or both dense with equal strides.
bool same_layout(const at::Tensor& a, const at::Tensor& ref) {
  if (a.is_contiguous() && ref.is_contiguous()) return true;
  return a.is_non_overlapping_and_dense() && a.strides() == ref.strides();
}

void check_like(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), "fastnn: adam_step_: ", list, "[", i, "] is on ",
              t.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), "fastnn: adam_step_: ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  TORCH_CHECK(same_layout(t, param), "fastnn: adam_step_: ", list, "[", i, "] has strides ",
              t.strides(), " but params[", i, "] has strides ", param.strides(),
              "; optimizer state must have its parameter's memory layout");
}

double host_scalar(const std::optional<at::Tensor>& t, const char* name, double fallback) {
  if (!t.has_value() || !t->defined()) return fallback;
  TORCH_CHECK(t->numel() == 1, "fastnn: adam_step_: ", name, " must have one element, got shape ",
              t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "fastnn: adam_step_: ", name,
              " must be a CPU tensor for CPU params, got ", t->device());
  return t->item<double>();
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   at::TensorList master_params, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                   bool amsgrad, bool maximize) {
  const size_t n = params.size();
  auto check_len = [&](at::TensorList list, const char* name) {
    TORCH_CHECK(list.size() == n, "fastnn: adam_step_: ", name, " has ", list.size(),
                " tensors but params has ", n);
  };
  check_len(grads, "grads");
  check_len(exp_avgs, "exp_avgs");
  check_len(exp_avg_sqs, "exp_avg_sqs");
  check_len(steps, "steps");
  if (amsgrad) check_len(max_exp_avg_sqs, "max_exp_avg_sqs (amsgrad=True)");
  const bool has_master = !master_params.empty();
  if (has_master) check_len(master_params, "master_params");

  // found_inf != 0 (GradScaler saw an inf or NaN): nothing is written at all.
  if (host_scalar(found_inf, "found_inf", 0.0) != 0.0) return;
  const double scale = host_scalar(grad_scale, "grad_scale", 1.0);
  if (lr_tensor.has_value() && lr_tensor->defined()) lr = host_scalar(lr_tensor, "lr_tensor", lr);

  const om::AdamHyper hyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  std::vector<AdamWork> work;
  std::vector<int64_t> ends;  // cumulative element counts: tensor t covers [ends[t-1], ends[t])
  std::vector<at::Tensor> relaid;  // grads copied into their param's layout (kept alive)
  work.reserve(n);
  ends.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "fastnn: adam_step_ (CPU): params[", i, "] is on ",
                p.device());
    check_float(p, "params");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fastnn: adam_step_: params[", i,
                "] must be dense (no gaps or overlaps), got strides ", p.strides());
    const at::Tensor& g_in = grads[i];
    TORCH_CHECK(g_in.layout() == at::kStrided, "fastnn: adam_step_: grads[", i,
                "] is sparse; use torch.optim.SparseAdam for sparse gradients");
    TORCH_CHECK(g_in.scalar_type() == p.scalar_type(), "fastnn: adam_step_: grads[", i, "] is ",
                g_in.scalar_type(), " but params[", i, "] is ", p.scalar_type());
    TORCH_CHECK(g_in.device() == p.device() && g_in.sizes() == p.sizes(),
                "fastnn: adam_step_: grads[", i, "] (", g_in.sizes(), " on ", g_in.device(),
                ") does not match params[", i, "] (", p.sizes(), " on ", p.device(), ")");
    at::Tensor g = g_in;
    if (!same_layout(g, p)) {
      // A read-only input: copy it into the param's layout rather than refuse it.
      relaid.push_back(at::empty_like(p).copy_(g));
      g = relaid.back();
    }
    const c10::ScalarType st = exp_avgs[i].scalar_type();
    TORCH_CHECK(st == p.scalar_type() || st == at::kFloat, "fastnn: adam_step_: exp_avgs[", i,
                "] is ", st, "; optimizer state must be float32 or its param's dtype (",
                p.scalar_type(), ")");
    check_like(exp_avgs[i], "exp_avgs", i, p);
    check_like(exp_avg_sqs[i], "exp_avg_sqs", i, p);
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == st, "fastnn: adam_step_: exp_avg_sqs[", i, "] is ",
                exp_avg_sqs[i].scalar_type(), " but exp_avgs[", i, "] is ", st);
    if (amsgrad) {
      check_like(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p);
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == st, "fastnn: adam_step_: max_exp_avg_sqs[", i,
                  "] is ", max_exp_avg_sqs[i].scalar_type(), " but exp_avgs[", i, "] is ", st);
    }
    if (has_master) {
      TORCH_CHECK(p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                  "fastnn: adam_step_: master_params are fp32 copies of float16 / bfloat16 params, "
                  "but params[",
                  i, "] is ", p.scalar_type());
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat,
                  "fastnn: adam_step_: master_params[", i, "] must be float32, got ",
                  master_params[i].scalar_type());
      check_like(master_params[i], "master_params", i, p);
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "fastnn: adam_step_: steps[", i,
                "] must be a one-element float32 / float64 CPU tensor, got ", s.scalar_type(),
                " of shape ", s.sizes(), " on ", s.device());
    if (p.numel() == 0) continue;

    const double step = s.scalar_type() == at::kFloat ? double(*s.const_data_ptr<float>())
                                                      : *s.const_data_ptr<double>();
    double bc1, bc2_sqrt;
    om::adam_bias_corrections(beta1, beta2, step, &bc1, &bc2_sqrt);
    AdamWork w;
    w.param = p.data_ptr();
    w.grad = g.const_data_ptr();
    w.exp_avg = exp_avgs[i].data_ptr();
    w.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    w.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    w.master = has_master ? master_params[i].data_ptr<float>() : nullptr;
    w.param_dtype = p.scalar_type();
    w.state_dtype = st;
    w.cf = om::adam_coeffs<float>(hyper, lr, bc1, bc2_sqrt, scale);
    w.cd = om::adam_coeffs<double>(hyper, lr, bc1, bc2_sqrt, scale);
    work.push_back(w);
    total += p.numel();
    ends.push_back(total);
  }
  if (total == 0) return;

  const bool decay = weight_decay != 0.0;
  const UpdateFn fn = !decay                   ? pick<false, false>(amsgrad)
                      : decoupled_weight_decay ? pick<false, true>(amsgrad)
                                               : pick<true, false>(amsgrad);
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    for (; begin < end; ++t) {
      const int64_t start = t == 0 ? 0 : ends[t - 1];
      const int64_t stop = std::min(end, ends[t]);
      fn(work[t], begin - start, stop - start);
      begin = stop;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace fastnn::cpu
