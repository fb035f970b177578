// Shared pieces of the CPU RMSNorm / LayerNorm kernels (csrc/cpu/rms_norm.cpp, layer_norm.cpp):
// ISA dispatch, row loads / stores in the accumulation type, fixed-order row reductions, and the
// fixed row blocking that makes weight gradients bitwise reproducible.
//
// Vectorisation: the row loops below are plain loops over contiguous arrays that GCC / clang
// vectorise at -O3, instantiated for the baseline ISA and in an AVX2 clone (fastnn/cpu_isa.h;
// checked in the disassembly: ymm loads and FMAs in *_avx2, xmm pairs in *_base).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "fastnn/checks.h"
#include "fastnn/cpu_isa.h"

#if FASTNN_X86_AVX2
#include <immintrin.h>
#endif

namespace fastnn::cpu {

// Accumulation type: fp64 for fp64 tensors, fp32 for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- Conversions (exactly c10's rounding: round to nearest even, NaN stays NaN) ---------------

FASTNN_ALWAYS_INLINE float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Branch-free so the loop vectorises; same result as c10::detail::round_to_nearest_even.
FASTNN_ALWAYS_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

#if FASTNN_X86_AVX2
// F16C converts 8 halves per instruction; c10::Half's portable bit twiddling does not vectorise.
FASTNN_TARGET_AVX2 inline void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

FASTNN_TARGET_AVX2 inline void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// A row of T as accumulation-type values: the row itself when T is already A, else a conversion
// into `buf` (one row, L1-resident for N up to a few thousand).
template <bool kAvx2, typename T, typename A>
FASTNN_ALWAYS_INLINE const A* load_row(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_bits_to_float(s[i]);
    return buf;
  } else {
#if FASTNN_X86_AVX2
    if constexpr (kAvx2 && std::is_same_v<T, c10::Half>) {
      half_to_float_f16c(src, buf, n);
      return buf;
    }
#endif
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// Rounds n accumulation-type values to T (no-op copy target when T is A).
template <bool kAvx2, typename T, typename A>
FASTNN_ALWAYS_INLINE void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (src != dst) std::memcpy(dst, src, n * sizeof(A));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
  } else {
#if FASTNN_X86_AVX2
    if constexpr (kAvx2 && std::is_same_v<T, c10::Half>) {
      float_to_half_f16c(src, dst, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// Where a row's result is computed: straight into the output when T is A, else into `buf`
// (then rounded by store_row).
template <typename T, typename A>
FASTNN_ALWAYS_INLINE A* out_row(T* dst, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return dst;
  } else {
    return buf;
  }
}

// `count` scratch rows of n accumulation-type values, where rows of T are converted (load_row /
// store_row); none when T is already A, and row(i) is then nullptr.
template <typename T, typename A>
class ScratchRows {
 public:
  ScratchRows(int count, int64_t n)
      : buf_(std::is_same_v<T, A> ? nullptr : new A[count * n]), n_(n) {}
  A* row(int i) const { return buf_ ? buf_.get() + i * n_ : nullptr; }

 private:
  std::unique_ptr<A[]> buf_;
  int64_t n_;
};

// Row `off / n` of what a norm normalises, as accumulation-type values: input, or with a residual
// (res non-null) the sum input + residual, written to res_out and rounded to T first (as an
// unfused `input + residual` would be). xb, rb: two scratch rows, used only when T is not A.
template <bool kAvx2, typename T, typename A>
FASTNN_ALWAYS_INLINE const A* norm_input_row(const T* x, const T* res, T* res_out, int64_t off,
                                             A* xb, A* rb, int64_t n) {
  if (res == nullptr) return load_row<kAvx2>(x + off, xb, n);
  x += off;
  res += off;
  res_out += off;
  if constexpr (std::is_same_v<T, A>) {
    A* __restrict__ s = res_out;
    const A* __restrict__ xi = x;
    const A* __restrict__ ri = res;
    for (int64_t i = 0; i < n; ++i) s[i] = xi[i] + ri[i];
    return s;
  } else {
    const A* xi = load_row<kAvx2>(x, xb, n);  // not restrict: the sum goes into xb in place
    const A* ri = load_row<kAvx2>(res, rb, n);
    for (int64_t i = 0; i < n; ++i) xb[i] = xi[i] + ri[i];
    store_row<kAvx2>(xb, res_out, n);
    return load_row<kAvx2>(res_out, xb, n);
  }
}

// Runs Kernel::run<kAvx2>(args, begin, end) in the AVX2 clone when the CPU has it (cpu_isa.h),
// else in the baseline one. Kernel::run is always-inline, so each clone compiles its own copy.
template <class Kernel, typename Args>
FASTNN_TARGET_AVX2 void run_avx2(const Args& args, int64_t begin, int64_t end) {
  Kernel::template run<true>(args, begin, end);
}

template <class Kernel, typename Args>
void run_base(const Args& args, int64_t begin, int64_t end) {
  Kernel::template run<false>(args, begin, end);
}

template <class Kernel, typename Args>
void run_isa(bool avx2, const Args& args, int64_t begin, int64_t end) {
  avx2 ? run_avx2<Kernel>(args, begin, end) : run_base<Kernel>(args, begin, end);
}

// ---- Row reductions in a fixed order ----------------------------------------------------------
// Written with GCC / clang vector extensions (32-byte vectors: one AVX2 register, two SSE ones):
// the loop auto-vectoriser turned a 16-lane scalar accumulator array into shuffles and stack
// spills (perf: 4x slower than ATen's LayerNorm on [64, 4096] fp32). Four independent vector
// accumulators (32 fp32 lanes) hide the add latency without -ffast-math. Lanes are combined per
// 1024-element chunk and chunks summed in order, which keeps each partial sum short (32 terms per
// lane): at N = 262144 the fp32 error stays near 1e-7 relative instead of growing with N. The
// order depends only on n: bitwise reproducible. The vectors never cross a call boundary
// (everything here is always-inline), so GCC's -Wpsabi note is off for the build (setup.py).

template <typename A>
struct Vec32;  // (an attribute on a dependent type would be ignored: one specialisation each)
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename A>
using vec_t = typename Vec32<A>::type;
template <typename A>
constexpr int64_t kVecWidth = 32 / sizeof(A);
constexpr int64_t kAccs = 4;
constexpr int64_t kChunk = 1024;

template <typename A>
FASTNN_ALWAYS_INLINE vec_t<A> vload(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename A>
FASTNN_ALWAYS_INLINE void vstore(A* p, const vec_t<A>& v) {
  std::memcpy(p, &v, sizeof v);
}

// Sums a per-chunk lane array in a fixed pairwise order.
template <int64_t kLanes, typename A>
FASTNN_ALWAYS_INLINE A fold_lanes(A* lanes) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// The summed terms: x^2, x*y, x - c, (x - c)^2. Templates, not lambdas: an outlined lambda would be
// compiled for the baseline ISA, not inlined into the AVX2 copy.
enum class Term { kXX, kXY, kDev, kDevSq };

// acc += term(x[0:W], y[0:W]); vectors pass by pointer / reference only (see above).
template <Term kTerm, typename A>
FASTNN_ALWAYS_INLINE void add_term(vec_t<A>& acc, const A* x, const A* y, const vec_t<A>& c) {
  const vec_t<A> xv = vload(x);
  if constexpr (kTerm == Term::kXX) acc += xv * xv;
  if constexpr (kTerm == Term::kXY) acc += xv * vload(y);
  if constexpr (kTerm == Term::kDev) acc += xv - c;
  if constexpr (kTerm == Term::kDevSq) acc += (xv - c) * (xv - c);
}

template <Term kTerm, typename A>
FASTNN_ALWAYS_INLINE A row_sum(const A* x, const A* y, A c, int64_t n,
                               const A* prefetch = nullptr) {
  using V = vec_t<A>;
  constexpr int64_t W = kVecWidth<A>, kStep = W * kAccs, kLanes = W * kAccs;
  constexpr int64_t kLine = 64 / sizeof(A);  // one step is two 64-byte cache lines
  static_assert(kChunk % kStep == 0, "a chunk holds whole steps");
  const V cv = V{} + c;
  A total = 0;
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t end = std::min(base + kChunk, n);
    V a0{}, a1{}, a2{}, a3{};
    int64_t i = base;
    for (; i + kStep <= end; i += kStep) {
      if (prefetch != nullptr) {
        __builtin_prefetch(prefetch + i);
        __builtin_prefetch(prefetch + i + kLine);
      }
      add_term<kTerm>(a0, x + i, y + i, cv);
      add_term<kTerm>(a1, x + i + W, y + i + W, cv);
      add_term<kTerm>(a2, x + i + 2 * W, y + i + 2 * W, cv);
      add_term<kTerm>(a3, x + i + 3 * W, y + i + 3 * W, cv);
    }
    A lanes[kLanes] = {};
    std::memcpy(lanes, &a0, sizeof a0);
    std::memcpy(lanes + W, &a1, sizeof a1);
    std::memcpy(lanes + 2 * W, &a2, sizeof a2);
    std::memcpy(lanes + 3 * W, &a3, sizeof a3);
    for (int64_t l = 0; i < end; ++i, ++l) {  // tail: fewer than kLanes elements
      const A xi = x[i], yi = y[i];
      if constexpr (kTerm == Term::kXX) lanes[l] += xi * xi;
      if constexpr (kTerm == Term::kXY) lanes[l] += xi * yi;
      if constexpr (kTerm == Term::kDev) lanes[l] += xi - c;
      if constexpr (kTerm == Term::kDevSq) lanes[l] += (xi - c) * (xi - c);
    }
    total += fold_lanes<kLanes>(lanes);
  }
  return total;
}

// ---- Fixed row blocking for weight / bias gradients -------------------------------------------
// Rows are cut into P blocks that depend only on (rows, N), never on the thread count; each
// block's fp32 partial dW row is accumulated by one thread in row order, then the P partial rows
// are summed per column in block order. At least 32 rows per block keeps the partials at most
// 1/32 of the input (at 1 row per block, [64, 4096] spent as long on partials as on dx); at most
// 64 blocks (enough for 64 threads), and P * N at most 4M elements (16 MB of fp32 partials).
struct RowBlocks {
  int64_t count;      // P
  int64_t per_block;  // rows per block (the last one may have fewer)
};

inline RowBlocks row_blocks(int64_t rows, int64_t n) {
  constexpr int64_t kMaxBlocks = 64, kMinRowsPerBlock = 32;
  constexpr int64_t kMaxPartialElems = int64_t{1} << 22;
  const int64_t max_p =
      std::max<int64_t>(1, std::min(kMaxBlocks, kMaxPartialElems / std::max<int64_t>(n, 1)));
  const int64_t per = std::max({(rows + max_p - 1) / max_p, kMinRowsPerBlock, int64_t{1}});
  return {(rows + per - 1) / per, per};
}

// out[j] = sum over b of partial[b * n + j], b in order; columns independent, so any split of the
// columns over threads gives the same bits.
template <typename A>
FASTNN_ALWAYS_INLINE void reduce_partials(const A* partial, int64_t blocks, int64_t n, A* out,
                                          int64_t col_begin, int64_t col_end) {
  for (int64_t j = col_begin; j < col_end; ++j) out[j] = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const A* p = partial + b * n;
    for (int64_t j = col_begin; j < col_end; ++j) out[j] += p[j];
  }
}

// Rows per parallel task: about 32K elements of work each so thread start-up stays small.
inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
}

// ---- Op-level helpers -----------------------------------------------------------------------

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// weight / bias as a contiguous [n] tensor of the accumulation type; `fill` (1 for a weight, 0
// for a bias) when absent, so the row loops have no branch: x * 1 and x + 0 are exact.
inline at::Tensor param_as_acc(const c10::optional<at::Tensor>& p, at::ScalarType acc, int64_t n,
                               double fill) {
  if (has(p)) return p->to(acc).contiguous();
  return at::full({n}, fill, at::TensorOptions().dtype(acc));
}

// A [rows, n] result (contiguous, as the kernels write it) laid out as the op's fake allocates
// it: empty_like(ref), which keeps the strides of a dense ref (a transposed one, say), so that
// torch.compile's stride assertions hold. Costs a copy only for such refs.
inline at::Tensor strided_like(const at::Tensor& result, const at::Tensor& ref) {
  if (ref.is_contiguous() || !ref.is_non_overlapping_and_dense()) return result;
  return at::empty_like(ref).copy_(result);
}

// A per-row statistic (rstd / mean) saved by the forward: [rows], accumulation dtype.
inline void check_stat(const at::Tensor& s, const char* name, const at::Tensor& x) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0), "fastnn: ", name, " must have shape [",
              x.size(0), "], got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == acc_type(x.scalar_type()), "fastnn: ", name, " must be ",
              acc_type(x.scalar_type()), " for ", x.scalar_type(), " input, got ", s.scalar_type());
  TORCH_CHECK(s.device() == x.device(), "fastnn: ", name, " is on ", s.device(), " but x is on ",
              x.device());
}

// A tensor that must match `x` in shape, dtype and device (residual, grad_out, ...).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x,
                       const char* x_name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastnn: ", name, " of shape ", t.sizes(), " does not match ",
              x_name, " of shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastnn: ", name, " has dtype ", t.scalar_type(),
              " but ", x_name, " has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastnn: ", name, " is on ", t.device(), " but ", x_name,
              " is on ", x.device());
}

}  // namespace fastnn::cpu
