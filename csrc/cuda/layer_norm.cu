// LayerNorm on CUDA, optionally fused with the residual add (schemas in csrc/library.cpp,
// semantics of fastnn/reference/layer_norm.py):
//   forward   s = input + residual (rounded to input's dtype), mean = mean(s),
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

// s = x (+ r, rounded to T as an unfused add would round it); also stores s to res_out.
template <typename T, typename W, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_sum(const FwdArgs<T, W>& a, int64_t idx) {
  using A = acc_t<T>;
  Vec<T, VEC> s = load_vec<T, VEC>(a.x + idx);
  if (a.res != nullptr) {
    const Vec<T, VEC> r = load_vec<T, VEC>(a.res + idx);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      s.v[j] = static_cast<T>(static_cast<A>(s.v[j]) + static_cast<A>(r.v[j]));
    store_vec(a.res_out + idx, s);
  }
  return s;
}

template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> sum_vec(const Vec<T, VEC>& s) {
  acc_t<T> sum = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum += static_cast<acc_t<T>>(s.v[j]);
  return sum;
}

template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> sum_sq_dev(const Vec<T, VEC>& s, acc_t<T> mean) {
  acc_t<T> sum = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t<T> d = static_cast<acc_t<T>>(s.v[j]) - mean;
    sum += d * d;
  }
  return sum;
}

template <typename T, typename W, int VEC>
__device__ __forceinline__ void store_out(const FwdArgs<T, W>& a, int64_t idx, int64_t col,
                                          const Vec<T, VEC>& s, acc_t<T> mean, acc_t<T> rstd) {
  using A = acc_t<T>;
  A v[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = (static_cast<A>(s.v[j]) - mean) * rstd;
  // Weight and bias are loaded one after the other (not both held at once): with fp32
  // parameters and bf16 rows, holding both made ptxas spill at the 64-register cap.
  if (a.w != nullptr) {
    const Vec<W, VEC> w = load_vec<W, VEC>(a.w + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= static_cast<A>(w.v[j]);
  }
  if (a.b != nullptr) {
    const Vec<W, VEC> b = load_vec<W, VEC>(a.b + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] += static_cast<A>(b.v[j]);
  }
  Vec<T, VEC> y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) y.v[j] = static_cast<T>(v[j]);
  store_vec(a.y + idx, y);
}

// Block [blockDim.y rows][blockDim.x threads]; thread x holds vectors x, x + blockDim.x, ... of
// its row (ITEMS of them) in registers.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(1024) ln_fwd_reg_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;  // invalid threads still join the row_sum barriers
  const int64_t off = row * a.n;
  Vec<T, VEC> s[ITEMS];
  A sum = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < a.n) {
      s[i] = load_sum<T, W, VEC>(a, off + col);
      sum += sum_vec<T, VEC>(s[i]);
    }
  }
  const A mean = row_sum(sum, scratch) / static_cast<A>(a.n);
  A sq = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < a.n) sq += sum_sq_dev<T, VEC>(s[i], mean);
  }
  const A rstd = rsqrt_acc(row_sum(sq, scratch) / static_cast<A>(a.n) + a.eps);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < a.n) store_out<T, W, VEC>(a, off + col, col, s[i], mean, rstd);
  }
  if (valid && threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Any N: three passes over the row (sum, squared deviations, output); the later ones read it
// from shared memory (SMEM) or global memory (res_out when a residual was added: the same
// thread wrote those elements).
template <typename T, typename W, int VEC, bool SMEM>
__global__ void __launch_bounds__(1024) ln_fwd_staged_kernel(FwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t nvec = a.n / VEC;
  Vec<T, VEC>* stage = reinterpret_cast<Vec<T, VEC>*>(smem) + threadIdx.y * (SMEM ? nvec : 0);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < a.rows;
  const int64_t off = row * a.n;
  const T* src = a.res != nullptr ? a.res_out : a.x;
  A sum = 0;
  if (valid) {
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      const Vec<T, VEC> s = load_sum<T, W, VEC>(a, off + k * VEC);
      if constexpr (SMEM) stage[k] = s;
      sum += sum_vec<T, VEC>(s);
    }
  }
  const A mean = row_sum(sum, scratch) / static_cast<A>(a.n);
  A sq = 0;
  if (valid) {
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x)
      sq += sum_sq_dev<T, VEC>(SMEM ? stage[k] : load_vec<T, VEC>(src + off + k * VEC), mean);
  }
  const A rstd = rsqrt_acc(row_sum(sq, scratch) / static_cast<A>(a.n) + a.eps);
  if (!valid) return;  // no barrier follows
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
    const Vec<T, VEC> s = SMEM ? stage[k] : load_vec<T, VEC>(src + off + k * VEC);
    store_out<T, W, VEC>(a, off + k * VEC, k * VEC, s, mean, rstd);
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

// Sums over this vector of g * xhat and of g, g = dy * w.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void dots(const BwdArgs<T, W>& a, int64_t col, const Vec<T, VEC>& x,
                                     const Vec<T, VEC>& dy, acc_t<T> mean, acc_t<T> rstd,
                                     acc_t<T>& gx, acc_t<T>& g_sum) {
  using A = acc_t<T>;
  Vec<W, VEC> w;
  if (a.w != nullptr) w = load_vec<W, VEC>(a.w + col);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A g = a.w != nullptr ? d * static_cast<A>(w.v[j]) : d;
    gx += g * ((static_cast<A>(x.v[j]) - mean) * rstd);
    g_sum += g;
  }
}

// dx for one vector (stored); dy * xhat added to dw[0..VEC), dy to db[0..VEC).
template <typename T, typename W, int VEC>
__device__ __forceinline__ void store_dx(const BwdArgs<T, W>& a, int64_t idx, int64_t col,
                                         const Vec<T, VEC>& x, const Vec<T, VEC>& dy, acc_t<T> mean,
                                         acc_t<T> rstd, acc_t<T> mean_gx, acc_t<T> mean_g,
                                         acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  Vec<W, VEC> w;
  if (a.w != nullptr) w = load_vec<W, VEC>(a.w + col);
  Vec<T, VEC> gr;
  if (a.dres != nullptr) gr = load_vec<T, VEC>(a.dres + idx);
  Vec<T, VEC> dx;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A d = static_cast<A>(dy.v[j]);
    const A xhat = (static_cast<A>(x.v[j]) - mean) * rstd;
    const A g = a.w != nullptr ? d * static_cast<A>(w.v[j]) : d;
    A v = rstd * (g - mean_g - xhat * mean_gx);
    if (a.dres != nullptr) v += static_cast<A>(gr.v[j]);
    dx.v[j] = static_cast<T>(v);
    dw[j] += d * xhat;
    db[j] += d;
  }
  store_vec(a.dx + idx, dx);
}

// Persistent: row group (blockIdx.x, threadIdx.y) handles rows g, g + G, ... with G the number of
// row groups, and writes partial row g of dW and dB.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) ln_bwd_reg_kernel(BwdArgs<T, W> a) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarpSize * kMaxRowsPerBlock];
  const A inv_n = A(1) / static_cast<A>(a.n);
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
    const A mean = valid ? a.mean[row] : A(0);
    const A rstd = valid ? a.rstd[row] : A(0);
    Vec<T, VEC> x[ITEMS], dy[ITEMS];
    A gx = 0, g_sum = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (valid && col < a.n) {
        x[i] = load_vec<T, VEC>(a.x + off + col);
        dy[i] = load_vec<T, VEC>(a.dy + off + col);
        dots<T, W, VEC>(a, col, x[i], dy[i], mean, rstd, gx, g_sum);
      }
    }
    const A mean_gx = row_sum(gx, scratch) * inv_n;
    const A mean_g = row_sum(g_sum, scratch) * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (valid && col < a.n)
        store_dx<T, W, VEC>(a, off + col, col, x[i], dy[i], mean, rstd, mean_gx, mean_g, dw[i],
                            db[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col >= a.n) continue;
    Vec<A, VEC> pw, pb;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      pw.v[j] = dw[i][j];
      pb.v[j] = db[i][j];
    }
    if (a.part_w != nullptr) store_vec(a.part_w + group * a.n + col, pw);
    if (a.part_b != nullptr) store_vec(a.part_b + group * a.n + col, pb);
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
    const A mean = valid ? a.mean[row] : A(0);
    const A rstd = valid ? a.rstd[row] : A(0);
    A gx = 0, g_sum = 0;
    if (valid)
      for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x)
        dots<T, W, 1>(a, k, load_vec<T, 1>(a.x + off + k), load_vec<T, 1>(a.dy + off + k), mean,
                      rstd, gx, g_sum);
    const A mean_gx = row_sum(gx, scratch) * inv_n;
    const A mean_g = row_sum(g_sum, scratch) * inv_n;
    if (!valid) continue;  // the next iteration's barriers are still reached
    for (int64_t k = threadIdx.x; k < a.n; k += blockDim.x) {
      A dw[1] = {0}, db[1] = {0};
      store_dx<T, W, 1>(a, off + k, k, load_vec<T, 1>(a.x + off + k),
                        load_vec<T, 1>(a.dy + off + k), mean, rstd, mean_gx, mean_g, dw, db);
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
  const int64_t off = row * a.n, nvec = a.n / VEC;
  const A mean = a.mean[row], rstd = a.rstd[row];
  A gx = 0, g_sum = 0;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x)
    dots<T, W, VEC>(a, k * VEC, load_vec<T, VEC>(a.x + off + k * VEC),
                    load_vec<T, VEC>(a.dy + off + k * VEC), mean, rstd, gx, g_sum);
  gx = row_sum(gx, scratch);
  g_sum = row_sum(g_sum, scratch);
  if (threadIdx.x == 0) {
    row_means[row] = gx / static_cast<A>(a.n);
    row_means[a.rows + row] = g_sum / static_cast<A>(a.n);
  }
}

// Long rows, kernel 2 of 2: block (j, g) owns column block j (one vector per thread) of rows
// g, g + G, ... (G = gridDim.y): dx, and dW / dB of those rows summed in registers into partial
// row g. kColRows rows are loaded before any is used, so that many loads are in flight per thread.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kColThreads)
    ln_bwd_cols_kernel(BwdArgs<T, W> a, const acc_t<T>* row_means) {
  using A = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= a.n) return;  // no barriers in this kernel
  const int64_t groups = gridDim.y;
  A dw[VEC], db[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dw[j] = db[j] = 0;
  for (int64_t base = blockIdx.y; base < a.rows; base += kColRows * groups) {
    Vec<T, VEC> x[kColRows], dy[kColRows];
    load_col_rows(a.x, a.dy, base, groups, a.rows, a.n, col, x, dy);
#pragma unroll
    for (int r = 0; r < kColRows; ++r) {
      const int64_t row = base + r * groups;
      if (row < a.rows)
        store_dx<T, W, VEC>(a, row * a.n + col, col, x[r], dy[r], a.mean[row], a.rstd[row],
                            row_means[row], row_means[a.rows + row], dw, db);
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
      const size_t bytes = static_cast<size_t>(a.n) * sizeof(T);
      const unsigned grid = grid_size(a.rows);
      if (bytes + kSmemReserve <= static_cast<size_t>(max_shared_memory(device))) {
        auto kernel = ln_fwd_staged_kernel<T, W, kVec, true>;
        allow_smem(kernel, bytes);
        kernel<<<grid, 1024, bytes, stream>>>(a);
      } else {
        ln_fwd_staged_kernel<T, W, kVec, false><<<grid, 1024, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 block = row_block(a.n, 4, 1024);
  ln_fwd_staged_kernel<T, W, 1, false><<<grid_size(cdiv(a.rows, block.y)), block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the backward kernel for `a` (partials unset); returns the number of partial rows and
// calls alloc_part(P, a) first to set the [P, n] partial buffers.
// Runs the backward kernels for `a` (partials unset); returns the number of partial rows and
// calls alloc_part(P, a) first to set the [P, n] partial buffers, and alloc_rows() for a
// [2, rows] fp32 (fp64) scratch of the column tier.
template <typename T, typename W, typename Alloc, typename AllocRows>
int64_t launch_bwd(BwdArgs<T, W> a, Alloc alloc_part, AllocRows alloc_rows, int device,
                   cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  if constexpr (kVec > 1) {
    if (vectorizable<T, W>(a.n, {a.x, a.dy, a.dres, a.dx}, a.w)) {
      const int64_t nvec = a.n / kVec;
      if (nvec <= 512 * 2) {
        const dim3 block = row_block(nvec, 2, 512);
        const int64_t items = cdiv(nvec, block.x);
        auto kernel =
            items == 1 ? ln_bwd_reg_kernel<T, W, kVec, 1> : ln_bwd_reg_kernel<T, W, kVec, 2>;
        const int64_t grid = persistent_grid(kernel, block, 0, a.rows, device);
        alloc_part(grid * block.y, a);
        kernel<<<grid_size(grid), block, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return grid * block.y;
      }
      acc_t<T>* row_means = alloc_rows();
      ln_bwd_rowdot_kernel<T, W, kVec>
          <<<grid_size(a.rows), kRowDotThreads, 0, stream>>>(a, row_means);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto kernel = ln_bwd_cols_kernel<T, W, kVec>;
      const dim3 grid = cols_grid(kernel, nvec, a.rows, device);
      alloc_part(grid.y, a);
      kernel<<<grid, kColThreads, 0, stream>>>(a, row_means);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return grid.y;
    }
  }
  const dim3 block = row_block(a.n, 4, 1024);
  auto kernel = ln_bwd_scalar_kernel<T, W>;
  const int64_t grid = persistent_grid(kernel, block, 0, a.rows, device);
  alloc_part(grid * block.y, a);
  kernel<<<grid_size(grid), block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grid * block.y;
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
          auto alloc_part = [&](int64_t p, BwdArgs<scalar_t, W>& args) {
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
          parts = launch_bwd(args, alloc_part, alloc_rows, device, stream);
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
