// LayerNorm on CUDA, optionally fused with the residual add (schemas in csrc/library.cpp,
// semantics of fastnn/reference/layer_norm.py):
//   forward   s = input + residual (rounded to input's dtype), mean = c + mean(s - c) for
//             c = s[0] + mean(s - s[0]) (c where that is not finite),
//             rstd = 1 / sqrt(mean((s - mean)^2) + eps), out = (s - mean) * rstd * weight + bias
//   backward  xhat = (x - mean) * rstd, g = dy * w,
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + d(residual_out),
//             dw = sum over rows of dy * xhat, db = sum over rows of dy
// The variance is the mean of squared deviations from the mean, computed over the row already in
// registers (or shared memory): as stable as the two-pass reference.
//
// The same tiers and kernel layout as csrc/cuda/rms_norm.cu (read that file's header):
// register-resident rows (fwd up to 16K elements, bwd up to 1024 vectors), staged forward rows
// beyond and for the scalar fallback (misaligned, N % VEC != 0, fp64), the backward column tier
// (row-dot kernel, then column blocks summing dW / dB in registers) for longer rows, persistent
// backward grids with fp32 partial rows of dW and dB, and fixed-order column sums: bitwise
// reproducible dW / dB. The backward register tier stops at 1024 vectors (8K bf16 / 4K fp32)
// because it keeps two accumulators (dW and dB) per element, twice the registers of RMSNorm's.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "fastnn/checks.h"
#include "fastnn/cuda_utils.cuh"

namespace fastnn::cuda {
namespace {

// ---- Device kernels -----------------------------------------------------------------------------
// Every kernel loads a whole tile (its vectors of a row, or of kColRows rows) before it uses any
// of it: see load_tile in cuda_utils.cuh.

template <typename T, typename W>
struct FwdArgs {
  const T* x;
  const T* res;  // nullptr without a residual
  const W* w;    // nullptr without a weight
  const W* b;    // nullptr without a bias
  T* y;
  T* res_out;  // nullptr without a residual
  acc_t<T>* mean;
  acc_t<T>* rstd;
  int64_t rows;
  int64_t n;
  acc_t<T> eps;
};

// Sum of the deviations s - c (kSquare: their squares) over the slots that hold the row's
// vectors: the others hold zeros, whose deviation from c is not the row's, so they take c = 0
// and add nothing.
template <bool kSquare, typename T, int VEC, int ITEMS>
__device__ __forceinline__ acc_t<T> sum_dev(const Vec<T, VEC> (&s)[ITEMS], acc_t<T> c,
                                            int64_t first, int64_t nvec) {
  acc_t<T> total = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    // A select: skipping the slot took 43 registers at 1 vector a thread, against 32 (ptxas).
    const acc_t<T> m = tile_vector(first, i) < nvec ? c : acc_t<T>(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t<T> d = static_cast<acc_t<T>>(s[i].v[j]) - m;
      total += kSquare ? d * d : d;
    }
  }
  return total;
}

// The row's first element (input + residual rounded as load_sum_tile rounds it), which the mean's
// first estimate is taken from: s[0] + mean(s - s[0]), so a constant row's mean is its value
// exactly (fastnn/reference/layer_norm.py, row_mean). Every thread of the row reads it: one
// broadcast load from a line the tile loads anyway.
template <typename T, typename W>
__device__ __forceinline__ acc_t<T> first_element(const FwdArgs<T, W>& a, int64_t off, bool valid) {
  using A = acc_t<T>;
  if (!valid || a.n == 0) return A(0);
  T v = a.x[off];
  if (a.res != nullptr) v = static_cast<T>(static_cast<A>(v) + static_cast<A>(a.res[off]));
  return static_cast<A>(v);
}

// s = (s - mean) * rstd (* w where has_w) (+ b where has_b) for the ITEMS vectors of a tile
// starting at vector `first`: weight and bias loaded for all of them before any is used.
template <typename T, typename W, int VEC, int ITEMS>
__device__ __forceinline__ void normalize(Vec<T, VEC>* s, acc_t<T> mean, acc_t<T> rstd,
                                          const FwdArgs<T, W>& a, int64_t first) {
  using A = acc_t<T>;
  const int64_t nvec = a.n / VEC;
  const bool has_w = a.w != nullptr, has_b = a.b != nullptr;
  Vec<W, VEC> w[ITEMS], b[ITEMS];
  if (has_w) load_tile(a.w, first, nvec, true, w);
  if (has_b) load_tile(a.b, first, nvec, true, b);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A v = (static_cast<A>(s[i].v[j]) - mean) * rstd;
      if (has_w) v *= static_cast<A>(w[i].v[j]);
      if (has_b) v += static_cast<A>(b[i].v[j]);
      s[i].v[j] = static_cast<T>(v);
    }
}

// Vectors of weight and bias per thread held at once (the register tier, after the reductions;
// the staged tier's output pass): loading them for all of a register-tier thread's vectors (4
// fp32, or 2 bf16 before the reductions) spilled 4-44 B at the 64 registers of 1024-thread blocks,
// and 4-vector tiles in the staged tier took 118-128 registers and spilled (ptxas, sm_90).
constexpr int kParamItems = 2;

// Block [blockDim.y rows][blockDim.x threads]; thread x holds vectors x, x + blockDim.x, ... of
// its row (ITEMS of them) in registers.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(1024) ln_fwd_reg_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;  // invalid threads still join the row_sum barriers
  const int64_t off = row * a.n, nvec = a.n / VEC;
  Vec<T, VEC> s[ITEMS];
  load_sum_tile(a, off, 0, valid, s);
  const A shift = first_element(a, off, valid);
  const A inv_n = A(1) / static_cast<A>(a.n);
  const A first = shift + row_sum(sum_dev<false>(s, shift, 0, nvec), scratch) * inv_n;
  const A second = first + row_sum(sum_dev<false>(s, first, 0, nvec), scratch) * inv_n;
  const A mean = isfinite(second) ? second : first;
  const A var = row_sum(sum_dev<true>(s, mean, 0, nvec), scratch) * inv_n;
  const A rstd = rsqrt_acc(var + a.eps);
  constexpr int kChunk = ITEMS < kParamItems ? ITEMS : kParamItems;
#pragma unroll
  for (int c = 0; c < ITEMS; c += kChunk)
    normalize<T, W, VEC, kChunk>(s + c, mean, rstd, a, int64_t{c} * blockDim.x);
  store_tile(a.y + off, 0, nvec, valid, s);
  if (valid && threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Any N: three passes over the row (deviations from its first element; deviations from that
// estimate of the mean and their squares; output) in tiles of kStagedItems vectors per thread; the
// later ones read it from shared memory (SMEM) or global memory (res_out when a residual was added:
// the same thread wrote those elements).
template <typename T, typename W, int VEC, bool SMEM>
__global__ void __launch_bounds__(kStagedThreads) ln_fwd_staged_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t nvec = a.n / VEC, step = int64_t{kStagedItems} * blockDim.x;
  Vec<T, VEC>* stage = reinterpret_cast<Vec<T, VEC>*>(smem) + threadIdx.y * (SMEM ? nvec : 0);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;
  const int64_t off = row * a.n;
  const T* src = (a.res != nullptr ? a.res_out : a.x) + off;
  const A shift = first_element(a, off, valid);
  A total = 0;
#pragma unroll 1
  for (int64_t first = 0; valid && first < nvec; first += step) {
    Vec<T, VEC> s[kStagedItems];
    load_sum_tile(a, off, first, true, s);
    if constexpr (SMEM) stage_tile(stage, first, nvec, s);
    total += sum_dev<false>(s, shift, first, nvec);
  }
  const A inv_n = A(1) / static_cast<A>(a.n);
  const A estimate = shift + row_sum(total, scratch) * inv_n;
  // Deviations from the estimate and their squares in one pass: mean = estimate + their mean,
  // variance = mean square - (mean - estimate)^2 (the estimate is within an ulp of
  // x[0] - mean of the mean, far below the row's spread: no cancellation).
  A dev = 0, sq = 0;
#pragma unroll 1
  for (int64_t first = 0; valid && first < nvec; first += step) {
    Vec<T, VEC> s[kStagedItems];
    reload_tile<SMEM>(stage, src, first, nvec, s);
    dev += sum_dev<false>(s, estimate, first, nvec);
    sq += sum_dev<true>(s, estimate, first, nvec);
  }
  const A correction = row_sum(dev, scratch) * inv_n;
  const A mean = isfinite(estimate + correction) ? estimate + correction : estimate;
  // An overflowed mean square stays Inf (Inf - Inf would be NaN; a NaN one stays NaN).
  const A mean_sq = row_sum(sq, scratch) * inv_n;
  const A var = isinf(mean_sq) ? mean_sq : mean_sq - correction * correction;
  const A rstd = rsqrt_acc((var < A(0) ? A(0) : var) + a.eps);  // NaN stays NaN
  if (!valid) return;                                           // no barrier follows
  // The output pass holds weight and bias too: tiles of kParamItems vectors.
#pragma unroll 1
  for (int64_t first = 0; first < nvec; first += kParamItems * blockDim.x) {
    Vec<T, VEC> s[kParamItems];
    reload_tile<SMEM>(stage, src, first, nvec, s);
    normalize<T, W, VEC, kParamItems>(s, mean, rstd, a, first);
    store_tile(a.y + off, first, nvec, true, s);
  }
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T, typename W>
struct BwdArgs {
  const T* dy;
  const T* dres;  // gradient into residual_out, nullptr when absent
  const T* x;
  const W* w;  // nullptr without a weight
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  T* dx;
  acc_t<T>* part_w;  // [groups, n] dw partials, nullptr without a weight
  acc_t<T>* part_b;  // [groups, n] db partials, nullptr without a bias
  int64_t rows;
  int64_t n;
};

// Sums over one vector of g * xhat and of g, g = dy * w (dy without a weight), added to gx and
// g_sum. A slot past the row (!in_row: x, dy and w zeros) must add nothing, so it takes mean =
// rstd = 0: with the row's, its 0 * ((0 - mean) * rstd) is NaN when mean or rstd is infinite.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void dots(const Vec<T, VEC>& x, const Vec<T, VEC>& dy,
                                     const Vec<W, VEC>& w, bool has_w, bool in_row, acc_t<T> mean,
                                     acc_t<T> rstd, acc_t<T>& gx, acc_t<T>& g_sum) {
  using A = acc_t<T>;
  mean = in_row ? mean : A(0);
  rstd = in_row ? rstd : A(0);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A g = has_w ? d * static_cast<A>(w.v[j]) : d;
    gx += g * ((static_cast<A>(x.v[j]) - mean) * rstd);
    g_sum += g;
  }
}

// Per-row statistics of the backward: mean and rstd of the forward, mean(g * xhat), mean(g).
template <typename A>
struct RowStats {
  A mean, rstd, mean_gx, mean_g;
};

// dx of one vector (+ gr, the gradient into residual_out, where has_gr); dy * xhat added to
// dw[0..VEC), dy to db[0..VEC).
template <typename T, typename W, int VEC>
__device__ __forceinline__ Vec<T, VEC> grad_input(const Vec<T, VEC>& x, const Vec<T, VEC>& dy,
                                                  const Vec<W, VEC>& w, bool has_w,
                                                  const Vec<T, VEC>& gr, bool has_gr,
                                                  const RowStats<acc_t<T>>& st, acc_t<T>* dw,
                                                  acc_t<T>* db) {
  using A = acc_t<T>;
  Vec<T, VEC> dx;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A xhat = (static_cast<A>(x.v[j]) - st.mean) * st.rstd;
    const A g = has_w ? d * static_cast<A>(w.v[j]) : d;
    A v = st.rstd * (g - st.mean_g - xhat * st.mean_gx);
    if (has_gr) v += static_cast<A>(gr.v[j]);
    dx.v[j] = static_cast<T>(v);
    dw[j] += d * xhat;
    db[j] += d;
  }
  return dx;
}

// Persistent: row group (blockIdx.x, threadIdx.y) handles rows g, g + G, ... with G the number of
// row groups, and writes partial row g of dW and dB.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) ln_bwd_reg_kernel(BwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const A inv_n = A(1) / static_cast<A>(a.n);
  const int64_t nvec = a.n / VEC;
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  Vec<W, VEC> w[ITEMS];  // a thread's columns are the same in every row: loaded once
  if (has_w) load_tile(a.w, 0, nvec, true, w);
  A dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = db[i][j] = 0;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // The trip count depends on blockIdx.x only, so every thread reaches every row_sum barrier.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows;
       base += groups) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * a.n;
    RowStats<A> st{valid ? a.mean[row] : A(0), valid ? a.rstd[row] : A(0), 0, 0};
    Vec<T, VEC> x[ITEMS], dy[ITEMS], gr[ITEMS];
    load_tile(a.x + off, 0, nvec, valid, x);
    load_tile(a.dy + off, 0, nvec, valid, dy);
    if (has_gr) load_tile(a.dres + off, 0, nvec, valid, gr);
    A gx = 0, g_sum = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
      dots(x[i], dy[i], w[i], has_w, tile_vector(0, i) < nvec, st.mean, st.rstd, gx, g_sum);
    st.mean_gx = row_sum(gx, scratch) * inv_n;
    st.mean_g = row_sum(g_sum, scratch) * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
      x[i] = grad_input(x[i], dy[i], w[i], has_w, gr[i], has_gr, st, dw[i], db[i]);
    store_tile(a.dx + off, 0, nvec, valid, x);
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t k = tile_vector(0, i);
    if (k >= nvec) continue;
    Vec<A, VEC> pw, pb;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      pw.v[j] = dw[i][j];
      pb.v[j] = db[i][j];
    }
    if (a.part_w != nullptr) store_vec(a.part_w + group * a.n + k * VEC, pw);
    if (a.part_b != nullptr) store_vec(a.part_b + group * a.n + k * VEC, pb);
  }
}

// Scalar fallback (misaligned pointers, N % VEC != 0, fp64), any N, persistent: two passes over
// each row from global memory, dW and dB accumulated in this row group's partial rows (each
// thread on its own columns, so consecutive threads touch consecutive floats).
template <typename T, typename W>
__global__ void __launch_bounds__(1024) ln_bwd_scalar_kernel(BwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const A inv_n = A(1) / static_cast<A>(a.n);
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  A* pw = a.part_w != nullptr ? a.part_w + group * a.n : nullptr;
  A* pb = a.part_b != nullptr ? a.part_b + group * a.n : nullptr;
  for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
    if (pw != nullptr) pw[k] = 0;
    if (pb != nullptr) pb[k] = 0;
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows;
       base += groups) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * a.n;
    RowStats<A> st{valid ? a.mean[row] : A(0), valid ? a.rstd[row] : A(0), 0, 0};
    A gx = 0, g_sum = 0;
    Vec<W, 1> w;
    Vec<T, 1> gr;
    if (valid)
      for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
        if (has_w) w = load_vec<W, 1>(a.w + k);
        dots(load_vec<T, 1>(a.x + off + k), load_vec<T, 1>(a.dy + off + k), w, has_w, true, st.mean,
             st.rstd, gx, g_sum);
      }
    st.mean_gx = row_sum(gx, scratch) * inv_n;
    st.mean_g = row_sum(g_sum, scratch) * inv_n;
    if (!valid) continue;  // the next iteration's barriers are still reached
    for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
      if (has_w) w = load_vec<W, 1>(a.w + k);
      if (has_gr) gr = load_vec<T, 1>(a.dres + off + k);
      A dw[1] = {0}, db[1] = {0};
      store_vec(a.dx + off + k,
                grad_input(load_vec<T, 1>(a.x + off + k), load_vec<T, 1>(a.dy + off + k), w, has_w,
                           gr, has_gr, st, dw, db));
      if (pw != nullptr) pw[k] += dw[0];
      if (pb != nullptr) pb[k] += db[0];
    }
  }
}

// Long rows, kernel 1 of 2: row_means[row] = mean over the row of g * xhat, and
// row_means[rows + row] = mean of g; one block per row.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kRowDotThreads)
    ln_bwd_rowdot_kernel(BwdArgs<T, W> a, acc_t<T>* row_means) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const int64_t row = blockIdx.x;
  const bool has_w = a.w != nullptr;
  const A mean = a.mean[row], rstd = a.rstd[row];
  A gx = 0, g_sum = 0;
  for_each_row_dot_vector<T, W, VEC>(
      a, row * a.n, [&](const auto& x, const auto& dy, const auto& w, bool in_row) {
        dots(x, dy, w, has_w, in_row, mean, rstd, gx, g_sum);
      });
  gx = row_sum(gx, scratch);
  g_sum = row_sum(g_sum, scratch);
  if (threadIdx.x == 0) {
    row_means[row] = gx / static_cast<A>(a.n);
    row_means[a.rows + row] = g_sum / static_cast<A>(a.n);
  }
}

// Long rows, kernel 2 of 2: block (j, g) owns column block j (one vector per thread) of rows
// g, g + G, ... (G = gridDim.y): dx, and dW / dB of those rows summed in registers into partial
// row g. kColRows rows and their statistics are loaded before any is used.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kColThreads)
    ln_bwd_cols_kernel(BwdArgs<T, W> a, const acc_t<T>* row_means) {
  using A = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= a.n) return;  // no barriers in this kernel
  const int64_t groups = gridDim.y;
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  Vec<W, VEC> w;  // the same columns in every row: loaded once
  if (has_w) w = load_vec<W, VEC>(a.w + col);
  A dw[VEC], db[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dw[j] = db[j] = 0;
  for (int64_t base = blockIdx.y; base < a.rows; base += kColRows * groups) {
    Vec<T, VEC> x[kColRows], dy[kColRows], gr[kColRows];
    A mean[kColRows], rstd[kColRows], mean_gx[kColRows], mean_g[kColRows];
    load_col(a.x, base, groups, a.rows, a.n, col, x);
    load_col(a.dy, base, groups, a.rows, a.n, col, dy);
    if (has_gr) load_col(a.dres, base, groups, a.rows, a.n, col, gr);
    load_col_stats(a.mean, base, groups, a.rows, mean);
    load_col_stats(a.rstd, base, groups, a.rows, rstd);
    load_col_stats(row_means, base, groups, a.rows, mean_gx);
    load_col_stats(row_means + a.rows, base, groups, a.rows, mean_g);
#pragma unroll
    for (int r = 0; r < kColRows; ++r) {
      const int64_t row = base + r * groups;
      const RowStats<A> st{mean[r], rstd[r], mean_gx[r], mean_g[r]};
      if (row < a.rows)
        store_vec(a.dx + row * a.n + col,
                  grad_input(x[r], dy[r], w, has_w, gr[r], has_gr, st, dw, db));
    }
  }
  Vec<A, VEC> pw, pb;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    pw.v[j] = dw[j];
    pb.v[j] = db[j];
  }
  if (a.part_w != nullptr) store_vec(a.part_w + blockIdx.y * a.n + col, pw);
  if (a.part_b != nullptr) store_vec(a.part_b + blockIdx.y * a.n + col, pb);
}

// ---- Launchers ----------------------------------------------------------------------------------

template <typename T, typename W>
void launch_fwd(const FwdArgs<T, W>& a, int device, cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  if constexpr (kVec > 1) {
    if (vectorizable<T, W>(a.n, {a.x, a.res, a.y, a.res_out}, a.w) &&
        is_aligned(a.b, static_cast<int64_t>(sizeof(W)) * kVec)) {
      const int64_t nvec = a.n / kVec;
      // ptxas (sm_90): 4 bf16 vectors per thread spill at the 64-register cap of 1024-thread
      // blocks, so 16-bit rows keep at most 2 (16K elements) in registers, fp32 4 (16K).
      constexpr int kMaxItems = sizeof(T) == 2 ? 2 : 4;
      if (nvec <= 1024 * kMaxItems) {
        const dim3 block = row_block(nvec, kMaxItems, 1024);
        const unsigned grid = grid_size(cdiv(a.rows, block.y));
        const int64_t items = cdiv(nvec, block.x);
        if (items == 1)
          ln_fwd_reg_kernel<T, W, kVec, 1><<<grid, block, 0, stream>>>(a);
        else if (items == 2 || kMaxItems == 2)
          ln_fwd_reg_kernel<T, W, kVec, 2><<<grid, block, 0, stream>>>(a);
        else if constexpr (kMaxItems == 4)
          ln_fwd_reg_kernel<T, W, kVec, 4><<<grid, block, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      launch_staged_fwd(ln_fwd_staged_kernel<T, W, kVec, true>,
                        ln_fwd_staged_kernel<T, W, kVec, false>, a,
                        static_cast<size_t>(a.n) * sizeof(T), device, stream);
      return;
    }
  }
  launch_scalar_fwd(ln_fwd_staged_kernel<T, W, 1, false>, a, stream);
}

// Runs the backward kernels for `a` (partials unset); returns the number of partial rows P,
// calling set_partials(args, P) first to point args.part_w / part_b at [P, n] buffers, and
// alloc_rows() for a [2, rows] fp32 (fp64) scratch of the column tier.
template <typename T, typename W, typename SetPartials, typename AllocRows>
int64_t launch_bwd(const BwdArgs<T, W>& a, SetPartials set_partials, AllocRows alloc_rows,
                   int device, cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  if constexpr (kVec > 1) {
    if (vectorizable<T, W>(a.n, {a.x, a.dy, a.dres, a.dx}, a.w)) {
      const int64_t nvec = a.n / kVec;
      if (nvec <= 512 * 2) {
        const dim3 block = row_block(nvec, 2, 512);
        const int64_t items = cdiv(nvec, block.x);
        auto kernel =
            items == 1 ? ln_bwd_reg_kernel<T, W, kVec, 1> : ln_bwd_reg_kernel<T, W, kVec, 2>;
        return launch_persistent_bwd(kernel, block, a, set_partials, device, stream);
      }
      return launch_column_bwd(ln_bwd_rowdot_kernel<T, W, kVec>, ln_bwd_cols_kernel<T, W, kVec>, a,
                               alloc_rows(), nvec, set_partials, device, stream);
    }
  }
  return launch_persistent_bwd(ln_bwd_scalar_kernel<T, W>, scalar_bwd_block(a.n), a, set_partials,
                               device, stream);
}

// ---- Op entry points ----------------------------------------------------------------------------

// Weight and bias as the kernels read them, both of one dtype W: the input's dtype when every
// given parameter has it (no copy), else the accumulation dtype.
std::pair<at::Tensor, at::Tensor> params_for_kernel(const c10::optional<at::Tensor>& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    at::ScalarType type) {
  const bool native = (!has(weight) || weight->scalar_type() == type) &&
                      (!has(bias) || bias->scalar_type() == type);
  const at::ScalarType want = native ? type : acc_scalar_type(type);
  auto conv = [&](const c10::optional<at::Tensor>& p) {
    return has(p) ? p->to(want).contiguous() : at::Tensor();
  };
  return {conv(weight), conv(bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps) {
  check_input(input, "layer_norm_fwd", "input");
  const int64_t rows = input.size(0), n = input.size(1);
  if (has(residual)) {
    check_like(*residual, "residual", input, "input");
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "fastnn: residual has dtype ",
                residual->scalar_type(), " but input has ", input.scalar_type());
  }
  check_vector(weight, "weight", input, n);
  check_vector(bias, "bias", input, n);
  const c10::cuda::CUDAGuard guard(input.device());

  Output out(input);
  c10::optional<Output> res_out;
  if (has(residual)) res_out.emplace(input);
  const auto stat_options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  at::Tensor mean = at::empty({rows}, stat_options);
  at::Tensor rstd = at::empty({rows}, stat_options);
  if (rows > 0 && n == 0) {  // statistics of an empty row, as the reference computes them
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (rows > 0 && n > 0) {
    const at::Tensor x = input.contiguous();
    const at::Tensor res = has(residual) ? residual->contiguous() : at::Tensor();
    const auto [w, b] = params_for_kernel(weight, bias, x.scalar_type());
    const int device = input.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    const bool native = (!w.defined() || w.scalar_type() == x.scalar_type()) &&
                        (!b.defined() || b.scalar_type() == x.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_layer_norm_fwd_cuda", [&] {
          using A = acc_t<scalar_t>;
          auto run = [&](auto tag) {
            using W = decltype(tag);
            const FwdArgs<scalar_t, W> args{
                x.const_data_ptr<scalar_t>(),
                ptr_or_null<scalar_t>(res),
                ptr_or_null<W>(w),
                ptr_or_null<W>(b),
                out.buf.mutable_data_ptr<scalar_t>(),
                res_out ? res_out->buf.mutable_data_ptr<scalar_t>() : nullptr,
                mean.mutable_data_ptr<A>(),
                rstd.mutable_data_ptr<A>(),
                rows,
                n,
                static_cast<A>(eps)};
            launch_fwd(args, device, stream);
          };
          if (native)
            run(scalar_t{});
          else
            run(A{});
        });
  }
  at::Tensor residual_out = res_out ? res_out->finish() : input.new_empty({0});
  return {out.finish(), residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  check_input(x_in, "layer_norm_bwd", "x");
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  check_like(grad_out, "grad_out", x_in, "x");
  if (has(grad_residual_out)) check_like(*grad_residual_out, "grad_residual_out", x_in, "x");
  check_vector(weight, "weight", x_in, n);
  check_vector(bias, "bias", x_in, n);
  for (const at::Tensor* stat : {&mean_in, &rstd_in}) {
    const char* name = stat == &mean_in ? "mean" : "rstd";
    check_same_device(*stat, name, x_in, "x");
    TORCH_CHECK(stat->dim() == 1 && stat->size(0) == rows, "fastnn: ", name, " must have shape [",
                rows, "], got ", stat->sizes());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());

  const at::ScalarType type = x_in.scalar_type(), acc = acc_scalar_type(type);
  Output dx(x_in);
  if (rows == 0 || n == 0) {  // sums over zero rows are zero, as the reference's
    return {dx.finish(), has(weight) ? at::zeros({n}, weight->options()) : x_in.new_empty({0}),
            has(bias) ? at::zeros({n}, bias->options()) : x_in.new_empty({0})};
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_out.to(type).contiguous();
  const at::Tensor gres =
      has(grad_residual_out) ? grad_residual_out->to(type).contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  // Only the weight is read by the kernels (the bias does not enter dx).
  const at::Tensor w = weight_for_kernel(weight, type);
  at::Tensor part, row_scratch;
  const int device = x_in.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  int64_t parts = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, type, "fastnn_layer_norm_bwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        auto run = [&](auto* w_ptr) {
          using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
          auto set_partials = [&](BwdArgs<scalar_t, W>& args, int64_t p) {
            const int64_t count = int64_t(has(weight)) + int64_t(has(bias));
            if (count == 0) return;
            part = at::empty({count * p, n}, x.options().dtype(acc));
            A* base = part.mutable_data_ptr<A>();
            args.part_w = has(weight) ? base : nullptr;
            args.part_b = has(bias) ? base + (has(weight) ? p * n : 0) : nullptr;
          };
          const BwdArgs<scalar_t, W> args{dy.const_data_ptr<scalar_t>(),
                                          ptr_or_null<scalar_t>(gres),
                                          x.const_data_ptr<scalar_t>(),
                                          w_ptr,
                                          mean.const_data_ptr<A>(),
                                          rstd.const_data_ptr<A>(),
                                          dx.buf.mutable_data_ptr<scalar_t>(),
                                          nullptr,
                                          nullptr,
                                          rows,
                                          n};
          auto alloc_rows = [&]() -> A* {
            row_scratch = at::empty({2, rows}, x.options().dtype(acc));
            return row_scratch.mutable_data_ptr<A>();
          };
          parts = launch_bwd(args, set_partials, alloc_rows, device, stream);
        };
        if (w.defined() && w.scalar_type() == type)
          run(w.const_data_ptr<scalar_t>());
        else
          run(ptr_or_null<A>(w));
      });
  auto reduce = [&](const c10::optional<at::Tensor>& param, int64_t slot) {
    if (!has(param)) return x_in.new_empty({0});
    at::Tensor out = at::empty({n}, param->options());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "fastnn_layer_norm_dwdb", [&] {
          if (acc == at::kDouble)
            column_sum(part.const_data_ptr<double>() + slot * parts * n,
                       out.mutable_data_ptr<scalar_t>(), parts, n, stream);
          else
            column_sum(part.const_data_ptr<float>() + slot * parts * n,
                       out.mutable_data_ptr<scalar_t>(), parts, n, stream);
        });
    return out;
  };
  at::Tensor dw = reduce(weight, 0);
  at::Tensor db = reduce(bias, has(weight) ? 1 : 0);
  return {dx.finish(), dw, db};
}

}  // namespace
}  // namespace fastnn::cuda

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("layer_norm_fwd", &fastnn::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastnn::cuda::layer_norm_bwd_cuda);
}
