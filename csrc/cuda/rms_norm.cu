// RMSNorm on CUDA, optionally fused with the residual add (schemas in csrc/library.cpp,
// semantics of fastnn/reference/rms_norm.py):
//   forward   s = input + residual (rounded to input's dtype), rstd = 1 / sqrt(mean(s^2) + eps),
//             out = s * rstd * weight
//   backward  xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)) +
//   d(residual_out),
//             dw = sum over rows of dy * xhat
// Four tiers: device kernels, templated launchers (tier and vector width chosen by N and
// alignment), dtype dispatch (fp32 accumulation; fp64 tensors run the scalar kernels in fp64), op
// entry points (checks, allocation, device guard, current stream, launch checks).
//
// Kernels (VEC = 16 bytes of T per access; a "row group" is blockDim.x threads on one row):
//   fwd reg:     the row's vectors held in registers between the sum of squares and the scaling,
//                about 4 vectors per thread in blocks of at most 512 threads, N <= 4096 vectors
//                (32K bf16 / 16K fp32): one read of x, one write of y.
//   fwd staged:  longer rows, or the scalar fallback (misaligned pointers, N % VEC != 0, fp64):
//                tiles of kStagedItems vectors per thread, the row staged in dynamic shared
//                memory when it fits (227 KB on an H100: 113K bf16), else the second pass
//                re-reads it from global memory (mostly L2 hits).
//   bwd reg:     persistent grid (blocks resident on every SM); each row group accumulates dW for
//                its rows in fp32 registers and writes one partial row; N <= 8K bf16 / fp16,
//                N <= 8K fp32 (at most 512 threads x 2 or 4 vectors: no register spills).
//   bwd cols:    longer rows: a row-dot kernel (mean(g * xhat) per row, in tiles of kRowDotItems
//                vectors per thread), then a [column block, row group] grid whose threads own
//                one vector of columns each and sum its dW over their rows in registers (x and dy
//                are read twice: the row is too long to keep between its reduction and dx).
//   bwd scalar:  the scalar fallback, persistent, dW in the row group's own partial row in global
//                memory (each thread updates only its own columns: no races).
//   column_sum:  dW = fixed-order sum of the partial rows: the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "fastnn/checks.h"
#include "fastnn/cuda_utils.cuh"

namespace fastnn::cuda {
namespace {

// Forward register tier: about kFwdItems 16-byte vectors of the row per thread (32 bf16 / 16 fp32
// elements), at most 2 * kFwdItems, in blocks of at most kFwdThreads threads (a 128-register cap
// under __launch_bounds__: 8 bf16 vectors take 86-118 registers, no spills). On an H200 (bf16,
// 32768 rows) this moved N = 32K from the staged tier's 40% of copy to 53%; N = 1K-16K stayed at
// 45-55% (Triton: 88-97%) while nvcc split their 16-byte stores (see store_vec) and each thread
// had one load in flight (see load_tile). With both fixed, on an H100 (2026-11-27, f011790):
// 89-92% at N = 1K-8K, 83% at 16K, 99% at 32K.
constexpr int kFwdThreads = 512;
constexpr int kFwdItems = 4;
constexpr int64_t kFwdMaxVectors = int64_t{kFwdThreads} * 2 * kFwdItems;

// ---- Device kernels -----------------------------------------------------------------------------
// Every kernel loads a whole tile (its vectors of a row, or of kColRows rows) before it uses any
// of it: see load_tile in cuda_utils.cuh.

template <typename T, typename W>
struct FwdArgs {
  const T* x;
  const T* res;  // nullptr without a residual
  const W* w;    // nullptr without a weight
  T* y;
  T* res_out;  // nullptr without a residual
  acc_t<T>* rstd;
  int64_t rows;
  int64_t n;
  acc_t<T> eps;
};

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ acc_t<T> sum_squares(const Vec<T, VEC> (&s)[ITEMS]) {
  acc_t<T> ss = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t<T> v = static_cast<acc_t<T>>(s[i].v[j]);
      ss += v * v;
    }
  return ss;
}

// s = s * rstd (* w where has_w), in place.
template <typename T, typename W, int VEC, int ITEMS>
__device__ __forceinline__ void normalize(Vec<T, VEC> (&s)[ITEMS], acc_t<T> rstd,
                                          const Vec<W, VEC> (&w)[ITEMS], bool has_w) {
  using A = acc_t<T>;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A v = static_cast<A>(s[i].v[j]) * rstd;
      s[i].v[j] = static_cast<T>(has_w ? v * static_cast<A>(w[i].v[j]) : v);
    }
}

// Block [blockDim.y rows][blockDim.x threads]; thread x holds vectors x, x + blockDim.x, ... of
// its row (ITEMS of them) in registers.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(kFwdThreads) rms_fwd_reg_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;  // invalid threads still join the row_sum barrier
  const int64_t off = row * a.n, nvec = a.n / VEC;
  Vec<T, VEC> s[ITEMS];
  load_sum_tile(a, off, 0, valid, s);
  // The weight's loads are issued before the reduction, so their latency hides behind it; at 8
  // vectors per thread that overflowed the 128 registers of 512-thread blocks, and at 1 it took
  // 35 registers against 31 (6 blocks of 256 threads per SM instead of 8, for rows of N <= 256
  // such as a QK-norm's; ptxas, sm_90), so there they follow it.
  constexpr bool kEarlyWeight = ITEMS >= 2 && ITEMS <= 4;
  Vec<W, VEC> w[ITEMS];
  if (kEarlyWeight && a.w != nullptr) load_tile(a.w, 0, nvec, true, w);
  const A rstd = rsqrt_acc(row_sum(sum_squares(s), scratch) / static_cast<A>(a.n) + a.eps);
  if (!kEarlyWeight && a.w != nullptr) load_tile(a.w, 0, nvec, true, w);
  normalize(s, rstd, w, a.w != nullptr);
  store_tile(a.y + off, 0, nvec, valid, s);
  if (valid && threadIdx.x == 0) a.rstd[row] = rstd;
}

// Any N: two passes over the row in tiles of kStagedItems vectors per thread; the second reads it
// back from shared memory (SMEM) or from global memory (res_out when a residual was added: the
// same thread wrote those elements).
template <typename T, typename W, int VEC, bool SMEM>
__global__ void __launch_bounds__(kStagedThreads) rms_fwd_staged_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t nvec = a.n / VEC, step = int64_t{kStagedItems} * blockDim.x;
  Vec<T, VEC>* stage = reinterpret_cast<Vec<T, VEC>*>(smem) + threadIdx.y * (SMEM ? nvec : 0);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;
  const int64_t off = row * a.n;
  A ss = 0;
#pragma unroll 1
  for (int64_t first = 0; valid && first < nvec; first += step) {
    Vec<T, VEC> s[kStagedItems];
    load_sum_tile(a, off, first, true, s);
    if constexpr (SMEM) stage_tile(stage, first, nvec, s);
    ss += sum_squares(s);
  }
  const A rstd = rsqrt_acc(row_sum(ss, scratch) / static_cast<A>(a.n) + a.eps);
  if (!valid) return;  // no barrier follows
  const T* src = a.res != nullptr ? a.res_out : a.x;
#pragma unroll 1
  for (int64_t first = 0; first < nvec; first += step) {
    Vec<T, VEC> s[kStagedItems];
    Vec<W, VEC> w[kStagedItems];
    reload_tile<SMEM>(stage, src + off, first, nvec, s);
    if (a.w != nullptr) load_tile(a.w, first, nvec, true, w);
    normalize(s, rstd, w, a.w != nullptr);
    store_tile(a.y + off, first, nvec, true, s);
  }
  if (threadIdx.x == 0) a.rstd[row] = rstd;
}

template <typename T, typename W>
struct BwdArgs {
  const T* dy;
  const T* dres;  // gradient into residual_out, nullptr when absent
  const T* x;
  const W* w;  // nullptr without a weight
  const acc_t<T>* rstd;
  T* dx;
  acc_t<T>* part;  // [gridDim.x * blockDim.y, n] dw partials, nullptr without a weight
  int64_t rows;
  int64_t n;
};

// Sum over one vector of g * xhat, g = dy * w (dy without a weight).
template <typename T, typename W, int VEC>
__device__ __forceinline__ acc_t<T> dot_g_xhat(const Vec<T, VEC>& x, const Vec<T, VEC>& dy,
                                               const Vec<W, VEC>& w, bool has_w, acc_t<T> rstd) {
  using A = acc_t<T>;
  A dot = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A g = has_w ? d * static_cast<A>(w.v[j]) : d;
    dot += g * (static_cast<A>(x.v[j]) * rstd);
  }
  return dot;
}

// dx of one vector (+ gr, the gradient into residual_out, where has_gr); dy * xhat added to
// dw[0..VEC).
template <typename T, typename W, int VEC>
__device__ __forceinline__ Vec<T, VEC> grad_input(const Vec<T, VEC>& x, const Vec<T, VEC>& dy,
                                                  const Vec<W, VEC>& w, bool has_w,
                                                  const Vec<T, VEC>& gr, bool has_gr, acc_t<T> rstd,
                                                  acc_t<T> mean_gx, acc_t<T>* dw) {
  using A = acc_t<T>;
  Vec<T, VEC> dx;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A xhat = static_cast<A>(x.v[j]) * rstd;
    const A g = has_w ? d * static_cast<A>(w.v[j]) : d;
    A v = rstd * (g - xhat * mean_gx);
    if (has_gr) v += static_cast<A>(gr.v[j]);
    dx.v[j] = static_cast<T>(v);
    dw[j] += d * xhat;
  }
  return dx;
}

// Persistent: row group (blockIdx.x, threadIdx.y) handles rows g, g + G, ... with G the number of
// row groups, and writes partial row g.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) rms_bwd_reg_kernel(BwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const A inv_n = A(1) / static_cast<A>(a.n);
  const int64_t nvec = a.n / VEC;
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  Vec<W, VEC> w[ITEMS];  // a thread's columns are the same in every row: loaded once
  if (has_w) load_tile(a.w, 0, nvec, true, w);
  A dw[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = 0;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // The trip count depends on blockIdx.x only, so every thread reaches every row_sum barrier.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows;
       base += groups) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * a.n;
    const A rstd = valid ? a.rstd[row] : A(0);
    Vec<T, VEC> x[ITEMS], dy[ITEMS], gr[ITEMS];
    load_tile(a.x + off, 0, nvec, valid, x);
    load_tile(a.dy + off, 0, nvec, valid, dy);
    if (has_gr) load_tile(a.dres + off, 0, nvec, valid, gr);
    A dot = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)  // slots past the row: 0 * (0 * rstd) is NaN at rstd = Inf
      dot += dot_g_xhat(x[i], dy[i], w[i], has_w, tile_vector(0, i) < nvec ? rstd : A(0));
    const A mean_gx = row_sum(dot, scratch) * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)  // slots past the row: dx and dw computed, never stored
      x[i] = grad_input(x[i], dy[i], w[i], has_w, gr[i], has_gr, rstd, mean_gx, dw[i]);
    store_tile(a.dx + off, 0, nvec, valid, x);
  }
  if (!has_w) return;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t k = tile_vector(0, i);
    if (k < nvec) {
      Vec<A, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = dw[i][j];
      store_vec(a.part + group * a.n + k * VEC, p);
    }
  }
}

// Scalar fallback (misaligned pointers, N % VEC != 0, fp64), any N, persistent: two passes over
// each row from global memory, dW accumulated in this row group's partial row (each thread on its
// own columns, so consecutive threads touch consecutive floats).
template <typename T, typename W>
__global__ void __launch_bounds__(1024) rms_bwd_scalar_kernel(BwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const A inv_n = A(1) / static_cast<A>(a.n);
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  A* pw = has_w ? a.part + group * a.n : nullptr;
  if (pw != nullptr)
    for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) pw[k] = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.rows;
       base += groups) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * a.n;
    const A rstd = valid ? a.rstd[row] : A(0);
    A dot = 0;
    Vec<W, 1> w;
    Vec<T, 1> gr;
    if (valid)
      for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
        if (has_w) w = load_vec<W, 1>(a.w + k);
        dot += dot_g_xhat(load_vec<T, 1>(a.x + off + k), load_vec<T, 1>(a.dy + off + k), w, has_w,
                          rstd);
      }
    const A mean_gx = row_sum(dot, scratch) * inv_n;
    if (!valid) continue;  // the next iteration's barrier is still reached
    for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
      if (has_w) w = load_vec<W, 1>(a.w + k);
      if (has_gr) gr = load_vec<T, 1>(a.dres + off + k);
      A dw[1] = {0};
      store_vec(a.dx + off + k,
                grad_input(load_vec<T, 1>(a.x + off + k), load_vec<T, 1>(a.dy + off + k), w, has_w,
                           gr, has_gr, rstd, mean_gx, dw));
      if (pw != nullptr) pw[k] += dw[0];
    }
  }
}

// Long rows, kernel 1 of 2: mean_gx[row] = mean over the row of g * xhat; one block per row.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kRowDotThreads)
    rms_bwd_rowdot_kernel(BwdArgs<T, W> a, acc_t<T>* mean_gx) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const int64_t row = blockIdx.x;
  const bool has_w = a.w != nullptr;
  const A rstd = a.rstd[row];
  A dot = 0;
  for_each_row_dot_vector<T, W, VEC>(
      a, row * a.n, [&](const auto& x, const auto& dy, const auto& w, bool in_row) {
        // rstd 0 past the row, as in rms_bwd_reg_kernel
        dot += dot_g_xhat(x, dy, w, has_w, in_row ? rstd : A(0));
      });
  dot = row_sum(dot, scratch);
  if (threadIdx.x == 0) mean_gx[row] = dot / static_cast<A>(a.n);
}

// Long rows, kernel 2 of 2: block (j, g) owns column block j (one vector per thread) of rows
// g, g + G, ... (G = gridDim.y): dx, and dW of those rows summed in registers into partial row
// g. kColRows rows and their statistics are loaded before any is used.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kColThreads)
    rms_bwd_cols_kernel(BwdArgs<T, W> a, const acc_t<T>* mean_gx) {
  using A = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= a.n) return;  // no barriers in this kernel
  const int64_t groups = gridDim.y;
  const bool has_w = a.w != nullptr, has_gr = a.dres != nullptr;
  Vec<W, VEC> w;  // the same columns in every row: loaded once
  if (has_w) w = load_vec<W, VEC>(a.w + col);
  A dw[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dw[j] = 0;
  for (int64_t base = blockIdx.y; base < a.rows; base += kColRows * groups) {
    Vec<T, VEC> x[kColRows], dy[kColRows], gr[kColRows];
    A rstd[kColRows], mgx[kColRows];
    load_col(a.x, base, groups, a.rows, a.n, col, x);
    load_col(a.dy, base, groups, a.rows, a.n, col, dy);
    if (has_gr) load_col(a.dres, base, groups, a.rows, a.n, col, gr);
    load_col_stats(a.rstd, base, groups, a.rows, rstd);
    load_col_stats(mean_gx, base, groups, a.rows, mgx);
#pragma unroll
    for (int r = 0; r < kColRows; ++r) {
      const int64_t row = base + r * groups;
      if (row < a.rows)
        store_vec(a.dx + row * a.n + col,
                  grad_input(x[r], dy[r], w, has_w, gr[r], has_gr, rstd[r], mgx[r], dw));
    }
  }
  if (!has_w) return;
  Vec<A, VEC> p;
#pragma unroll
  for (int j = 0; j < VEC; ++j) p.v[j] = dw[j];
  store_vec(a.part + blockIdx.y * a.n + col, p);
}

// ---- Launchers ----------------------------------------------------------------------------------

template <typename T, typename W>
void launch_fwd(const FwdArgs<T, W>& a, int device, cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  if constexpr (kVec > 1) {
    if (vectorizable<T, W>(a.n, {a.x, a.res, a.y, a.res_out}, a.w)) {
      const int64_t nvec = a.n / kVec;
      if (nvec <= kFwdMaxVectors) {
        const dim3 block = row_block(nvec, kFwdItems, kFwdThreads);
        const unsigned grid = grid_size(cdiv(a.rows, block.y));
        with_items(cdiv(nvec, block.x), [&](auto items) {
          rms_fwd_reg_kernel<T, W, kVec, decltype(items)::value><<<grid, block, 0, stream>>>(a);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      launch_staged_fwd(rms_fwd_staged_kernel<T, W, kVec, true>,
                        rms_fwd_staged_kernel<T, W, kVec, false>, a,
                        static_cast<size_t>(a.n) * sizeof(T), device, stream);
      return;
    }
  }
  launch_scalar_fwd(rms_fwd_staged_kernel<T, W, 1, false>, a, stream);
}

// Runs the backward kernels for `a` (a.part unset); returns the number of partial rows P,
// calling set_partials(args, P) first to point args.part at a [P, n] buffer (left nullptr
// without a weight), and alloc_rows() for a [rows] fp32 (fp64) scratch of the column tier.
template <typename T, typename W, typename SetPartials, typename AllocRows>
int64_t launch_bwd(const BwdArgs<T, W>& a, SetPartials set_partials, AllocRows alloc_rows,
                   int device, cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  if constexpr (kVec > 1) {
    if (vectorizable<T, W>(a.n, {a.x, a.dy, a.dres, a.dx}, a.w)) {
      const int64_t nvec = a.n / kVec;
      // ptxas (sm_90): 4 vectors per thread of bf16 need 128+ registers and spill at 512
      // threads; fp32 fits in 94. So 16-bit rows stop at 2 vectors per thread (8K elements).
      constexpr int kMaxItems = sizeof(T) == 2 ? 2 : 4;
      if (nvec <= 512 * kMaxItems) {
        const dim3 block = row_block(nvec, kMaxItems, 512);
        const int64_t items = cdiv(nvec, block.x);
        auto kernel = rms_bwd_reg_kernel<T, W, kVec, 1>;
        if (items == 2) kernel = rms_bwd_reg_kernel<T, W, kVec, 2>;
        if constexpr (kMaxItems == 4)
          if (items > 2) kernel = rms_bwd_reg_kernel<T, W, kVec, 4>;
        return launch_persistent_bwd(kernel, block, a, set_partials, device, stream);
      }
      return launch_column_bwd(rms_bwd_rowdot_kernel<T, W, kVec>, rms_bwd_cols_kernel<T, W, kVec>,
                               a, alloc_rows(), nvec, set_partials, device, stream);
    }
  }
  return launch_persistent_bwd(rms_bwd_scalar_kernel<T, W>, scalar_bwd_block(a.n), a, set_partials,
                               device, stream);
}

// ---- Op entry points ----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, double eps) {
  check_input(input, "rms_norm_fwd", "input");
  const int64_t rows = input.size(0), n = input.size(1);
  if (has(residual)) {
    check_like(*residual, "residual", input, "input");
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "fastnn: residual has dtype ",
                residual->scalar_type(), " but input has ", input.scalar_type());
  }
  check_vector(weight, "weight", input, n);
  const c10::cuda::CUDAGuard guard(input.device());

  Output out(input);
  c10::optional<Output> res_out;
  if (has(residual)) res_out.emplace(input);
  at::Tensor rstd = at::empty({rows}, input.options().dtype(acc_scalar_type(input.scalar_type())));
  if (rows > 0 && n == 0) rstd.fill_(std::numeric_limits<double>::quiet_NaN());  // empty mean
  if (rows > 0 && n > 0) {
    const at::Tensor x = input.contiguous();
    const at::Tensor res = has(residual) ? residual->contiguous() : at::Tensor();
    const at::Tensor w = weight_for_kernel(weight, x.scalar_type());
    const int device = input.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_rms_norm_fwd_cuda", [&] {
          using A = acc_t<scalar_t>;
          auto run = [&](auto* w_ptr) {
            using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
            const FwdArgs<scalar_t, W> args{
                x.const_data_ptr<scalar_t>(),
                ptr_or_null<scalar_t>(res),
                w_ptr,
                out.buf.mutable_data_ptr<scalar_t>(),
                res_out ? res_out->buf.mutable_data_ptr<scalar_t>() : nullptr,
                rstd.mutable_data_ptr<A>(),
                rows,
                n,
                static_cast<A>(eps)};
            launch_fwd(args, device, stream);
          };
          if (w.defined() && w.scalar_type() == x.scalar_type())
            run(w.const_data_ptr<scalar_t>());
          else
            run(ptr_or_null<A>(w));
        });
  }
  at::Tensor residual_out = res_out ? res_out->finish() : input.new_empty({0});
  return {out.finish(), residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const at::Tensor& rstd_in) {
  check_input(x_in, "rms_norm_bwd", "x");
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  check_like(grad_out, "grad_out", x_in, "x");
  if (has(grad_residual_out)) check_like(*grad_residual_out, "grad_residual_out", x_in, "x");
  check_vector(weight, "weight", x_in, n);
  check_same_device(rstd_in, "rstd", x_in, "x");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == rows, "fastnn: rstd must have shape [", rows,
              "], got ", rstd_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());

  const at::ScalarType type = x_in.scalar_type(), acc = acc_scalar_type(type);
  Output dx(x_in);
  if (rows == 0 || n == 0)  // the sum over zero rows is zero, as the reference's
    return {dx.finish(), has(weight) ? at::zeros({n}, weight->options()) : x_in.new_empty({0})};
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_out.to(type).contiguous();
  const at::Tensor gres =
      has(grad_residual_out) ? grad_residual_out->to(type).contiguous() : at::Tensor();
  const at::Tensor rstd = rstd_in.to(acc).contiguous();
  const at::Tensor w = weight_for_kernel(weight, type);
  at::Tensor part, row_scratch;
  const int device = x_in.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  int64_t parts = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "fastnn_rms_norm_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    auto set_partials = [&](auto& args, int64_t p) {
      if (!w.defined()) return;
      part = at::empty({p, n}, x.options().dtype(acc));
      args.part = part.mutable_data_ptr<A>();
    };
    auto alloc_rows = [&]() -> A* {
      row_scratch = at::empty({rows}, x.options().dtype(acc));
      return row_scratch.mutable_data_ptr<A>();
    };
    auto run = [&](auto* w_ptr) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(w_ptr)>>;
      const BwdArgs<scalar_t, W> args{dy.const_data_ptr<scalar_t>(),
                                      ptr_or_null<scalar_t>(gres),
                                      x.const_data_ptr<scalar_t>(),
                                      w_ptr,
                                      rstd.const_data_ptr<A>(),
                                      dx.buf.mutable_data_ptr<scalar_t>(),
                                      nullptr,
                                      rows,
                                      n};
      parts = launch_bwd(args, set_partials, alloc_rows, device, stream);
    };
    if (w.defined() && w.scalar_type() == type)
      run(w.const_data_ptr<scalar_t>());
    else
      run(ptr_or_null<A>(w));
  });
  if (!w.defined()) return {dx.finish(), x_in.new_empty({0})};
  at::Tensor dw = at::empty({n}, weight->options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw.scalar_type(), "fastnn_rms_dw", [&] {
    if (acc == at::kDouble)
      column_sum(part.const_data_ptr<double>(), dw.mutable_data_ptr<scalar_t>(), parts, n, stream);
    else
      column_sum(part.const_data_ptr<float>(), dw.mutable_data_ptr<scalar_t>(), parts, n, stream);
  });
  return {dx.finish(), dw};
}

}  // namespace
}  // namespace fastnn::cuda

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("rms_norm_fwd", &fastnn::cuda::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &fastnn::cuda::rms_norm_bwd_cuda);
}
