// Shared pieces of the CPU RMSNorm / LayerNorm kernels (csrc/cpu/rms_norm.cpp, layer_norm.cpp):
// the rows as the kernels see them (bf16 widened in registers, fp16 through F16C scratch rows)
// with the residual add, ISA dispatch, fixed-order row reductions, and the fixed row blocking that
// makes weight gradients bitwise reproducible.
//
// Vectorisation: the row loops below are plain loops over contiguous arrays that GCC / clang
// vectorise at -O3, instantiated for the baseline ISA and in AVX2 and AVX-512 clones
// (fastnn/cpu_isa.h; checked in the disassembly: ymm loads and FMAs in *_avx2, xmm pairs in
// *_base).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

// From here on, as in csrc/cpu/glu.cpp (which says why): selects become vector blends, so the
// 16-bit conversions of fastnn/cpu_lowp.h vectorise. It changes no result; not fast-math.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "fastnn/checks.h"
#include "fastnn/cpu_isa.h"
#include "fastnn/cpu_lowp.h"

namespace fastnn::cpu {

// Accumulation type: fp64 for fp64 tensors, fp32 for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- Rows as the kernels see them --------------------------------------------------------------
// bf16, fp32 and fp64 rows are read and written where they are (bf16 widened in registers: vload_as
// below, to_acc / store_acc); fp16 rows go through fp32 scratch rows, widened and rounded back by
// F16C (widen / narrow, fastnn/cpu_lowp.h). row_t<T> is what the row loops index.
template <typename T>
constexpr bool kStagedRows = std::is_same_v<T, c10::Half>;
template <typename T>
using row_t = std::conditional_t<kStagedRows<T>, float, T>;

// One thread's view of rows of n elements; `slots` scratch rows when T is staged.
template <typename T>
class RowViews {
 public:
  RowViews(int slots, int64_t n) : n_(n) {
    if constexpr (kStagedRows<T>) buf_.reset(new float[slots * n]);
  }

  // Row `src` to read: itself, or its fp32 copy in scratch `slot`.
  const row_t<T>* in(const T* src, int slot) const {
    if constexpr (kStagedRows<T>) {
      widen(src, scratch(slot), n_);
      return scratch(slot);
    } else {
      return src;
    }
  }

  // Where to write row `dst`: itself, or scratch `slot`, which done(dst, slot) then rounds into
  // dst.
  row_t<T>* out(T* dst, int slot) const {
    if constexpr (kStagedRows<T>) {
      return scratch(slot);
    } else {
      return dst;
    }
  }
  void done(T* dst, int slot) const {
    if constexpr (kStagedRows<T>) narrow(scratch(slot), dst, n_);
  }

  // res_out = x + res, rounded to T as an unfused `input + residual` is (the fused norms'
  // residual_out), and that row to read: res_out itself, or its copy in scratch `slot` (slot + 1
  // holds res on the way).
  const row_t<T>* sum_in(const T* x, const T* res, T* res_out, int slot) const {
    const row_t<T>* xa = in(x, slot);  // the sum may overwrite it (same index only)
    const row_t<T>* __restrict__ ra = in(res, slot + 1);
    row_t<T>* sum = out(res_out, slot);
    using A = acc_t<T>;
    for (int64_t i = 0; i < n_; ++i) store_acc(to_acc<A>(xa[i]) + to_acc<A>(ra[i]), sum[i]);
    done(res_out, slot);
    return in(res_out, slot);
  }

 private:
  float* scratch(int slot) const { return buf_.get() + slot * n_; }
  std::unique_ptr<float[]> buf_;
  int64_t n_;
};

// Runs Kernel::run(args, begin, end) in the widest clone the CPU has (cpu_isa.h): AVX-512, AVX2
// or baseline. Kernel::run is always-inline, so each clone compiles its own copy. 16-bit rows,
// widened in registers, make the row loops compute-bound in L1: one Xeon VM core, RMSNorm
// forward [1024, 4096] bf16, 1.25 ms with AVX-512 against 1.65-1.7 ms with AVX2 (torch.compile
// 1.35-1.5 ms).
template <class Kernel, typename Args>
FASTNN_TARGET_AVX512 void run_avx512(const Args& args, int64_t begin, int64_t end) {
  Kernel::run(args, begin, end);
}

template <class Kernel, typename Args>
FASTNN_TARGET_AVX2 void run_avx2(const Args& args, int64_t begin, int64_t end) {
  Kernel::run(args, begin, end);
}

template <class Kernel, typename Args>
void run_base(const Args& args, int64_t begin, int64_t end) {
  Kernel::run(args, begin, end);
}

template <class Kernel, typename Args>
void run_isa(const Args& args, int64_t begin, int64_t end) {
  if (has_avx512()) return run_avx512<Kernel>(args, begin, end);
  if (has_avx2()) return run_avx2<Kernel>(args, begin, end);
  run_base<Kernel>(args, begin, end);
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

// A vector of A from kVecWidth<A> values of X: A itself, or bf16 widened in registers.
template <typename A, typename X>
FASTNN_ALWAYS_INLINE vec_t<A> vload_as(const X* p) {
  if constexpr (std::is_same_v<X, A>) {
    return vload(p);
  } else {
    A lanes[kVecWidth<A>];
    for (int64_t j = 0; j < kVecWidth<A>; ++j) lanes[j] = to_acc<A>(p[j]);
    return vload(lanes);
  }
}

template <typename A>
FASTNN_ALWAYS_INLINE void vstore(A* p, const vec_t<A>& v) {
  std::memcpy(p, &v, sizeof v);
}

// Sums a per-chunk lane array in a fixed pairwise order: lane l += lane l + w for w = kLanes / 2,
// ..., 1. The levels that pair whole vectors add 32-byte vectors, loaded as the callers stored
// them: GCC vectorised the plain loop with 64-byte loads in the AVX-512 clone, which cannot be
// forwarded from the two 32-byte stores they span, and that stall was 47% of the fp32 LayerNorm
// forward's time at N = 512 (perf, one Xeon core, 2026-11-27). Same sums, same order.
template <int64_t kLanes, typename A>
FASTNN_ALWAYS_INLINE A fold_lanes(A* lanes) {
  constexpr int64_t W = kVecWidth<A>;
  for (int64_t w = kLanes / 2; w >= W; w /= 2)
    for (int64_t l = 0; l < w; l += W) vstore(lanes + l, vload(lanes + l) + vload(lanes + l + w));
  for (int64_t w = std::min(kLanes, W) / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// The summed terms: x^2, x*y, x - c, (x - c)^2. Templates, not lambdas: an outlined lambda would be
// compiled for the baseline ISA, not inlined into the AVX2 copy.
enum class Term { kXX, kXY, kDev, kDevSq };

// acc += term(x[0:W], y[0:W]); vectors pass by pointer / reference only (see above).
template <Term kTerm, typename A, typename X>
FASTNN_ALWAYS_INLINE void add_term(vec_t<A>& acc, const X* x, const X* y, const vec_t<A>& c) {
  const vec_t<A> xv = vload_as<A>(x);
  if constexpr (kTerm == Term::kXX) acc += xv * xv;
  if constexpr (kTerm == Term::kXY) acc += xv * vload_as<A>(y);
  if constexpr (kTerm == Term::kDev) acc += xv - c;
  if constexpr (kTerm == Term::kDevSq) acc += (xv - c) * (xv - c);
}

// sum of term(x[i], y[i]) over i < n; x and y are A, or a 16-bit type widened in registers.
template <Term kTerm, typename A, typename X>
FASTNN_ALWAYS_INLINE A row_sum(const X* x, const X* y, A c, int64_t n,
                               const X* prefetch = nullptr) {
  using V = vec_t<A>;
  constexpr int64_t W = kVecWidth<A>, kStep = W * kAccs, kLanes = W * kAccs;
  constexpr int64_t kLine = 64 / sizeof(X);  // one step is one or two 64-byte cache lines
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
      add_term<kTerm, A>(a0, x + i, y + i, cv);
      add_term<kTerm, A>(a1, x + i + W, y + i + W, cv);
      add_term<kTerm, A>(a2, x + i + 2 * W, y + i + 2 * W, cv);
      add_term<kTerm, A>(a3, x + i + 3 * W, y + i + 3 * W, cv);
    }
    A lanes[kLanes] = {};
    std::memcpy(lanes, &a0, sizeof a0);
    std::memcpy(lanes + W, &a1, sizeof a1);
    std::memcpy(lanes + 2 * W, &a2, sizeof a2);
    std::memcpy(lanes + 3 * W, &a3, sizeof a3);
    for (int64_t l = 0; i < end; ++i, ++l) {  // tail: fewer than kLanes elements
      const A xi = to_acc<A>(x[i]), yi = to_acc<A>(y[i]);
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
