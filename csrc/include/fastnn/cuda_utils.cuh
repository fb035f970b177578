// Pieces shared by the CUDA kernels (csrc/cuda/*.cu): 16-byte vector access, warp and row
// reductions in a fixed order, cached device attributes, the fixed-order column sum that turns
// per-program partials into bitwise reproducible weight gradients, launch-shape helpers and the
// argument checks / allocation of the norm op entry points.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "fastnn/checks.h"

namespace fastnn::cuda {

constexpr int kWarpSize = 32;

// VEC elements of T moved by one access: 16 bytes for VEC = 16 / sizeof(T) (8 bf16 / fp16,
// 4 fp32, 2 fp64), the widest global load (LDG.128). The alignment makes the compiler emit it.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

// 16-byte vectors are stored by one st.global.v4.b32: assigning the struct let nvcc split the
// store of 8 bf16 / fp16 into four 4-byte stores in the RMSNorm forward with 3 or more vectors per
// thread (its PTX; that kernel ran at 48% of copy on an H200 where 2 vectors per thread, stored
// whole, ran at 92%). Every caller stores to global memory.
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    uint32_t w[4];
    memcpy(w, &v, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
  }
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Threads of a block are laid out [blockDim.y rows][blockDim.x columns], blockDim.x a multiple of
// 32 and at most 1024, blockDim.y <= kMaxRowsPerBlock. row_sum returns the sum of `v` over the
// blockDim.x threads of this thread's row, to every one of them, in a fixed order (same bits on
// every run). Every thread of the block must call it (it synchronises when blockDim.x > 32);
// `scratch` holds kWarpSize * blockDim.y values.
constexpr int kMaxRowsPerBlock = 8;

template <typename A>
__device__ __forceinline__ A row_sum(A v, A* scratch) {
  v = warp_sum(v);
  if (blockDim.x == kWarpSize) return v;  // one warp per row: the shuffles were enough
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  A* s = scratch + threadIdx.y * kWarpSize;
  __syncthreads();  // the previous call's reads of `scratch` are done
  if (lane == 0) s[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? s[lane] : A(0));
}

// ---- Host-side device facts, looked up once per device and cached ------------------------------

inline int device_attribute(cudaDeviceAttr attr, int device) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(attr), device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  cache.emplace(key, value);
  return value;
}

inline int sm_count(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, device); }

// Largest dynamic shared memory a block may opt into (227 KB on an H100).
inline int max_shared_memory(int device) {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Resident blocks of `kernel` per SM at `threads` threads and `smem` dynamic bytes (at least 1).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks > 0 ? blocks : 1;
}

// ---- Fixed-order column sum of [P, N] partials
// ---------------------------------------------------

// Block (32 columns, kColumnSumSplit slices of P): thread (x, y) sums rows y, y + split, ... of
// its column in order, then slice 0 adds the slices' sums in order. The assignment depends only on
// P and N, so the result has the same bits on every run.
constexpr int kColumnSumSplit = 16;

template <typename A, typename O>
__global__ void column_sum_kernel(const A* __restrict__ part, O* __restrict__ out, int64_t P,
                                  int64_t N) {
  __shared__ A sums[kColumnSumSplit][kWarpSize + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  A acc = A(0);
  if (col < N) {
    for (int64_t p = threadIdx.y; p < P; p += kColumnSumSplit) acc += part[p * N + col];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    A total = A(0);
#pragma unroll
    for (int s = 0; s < kColumnSumSplit; ++s) total += sums[s][threadIdx.x];
    out[col] = static_cast<O>(total);
  }
}

// out[N] = sum over the P rows of part [P, N] (contiguous), on `stream`.
template <typename A, typename O>
void column_sum(const A* part, O* out, int64_t P, int64_t N, cudaStream_t stream) {
  const int64_t blocks = (N + kWarpSize - 1) / kWarpSize;
  column_sum_kernel<A, O>
      <<<static_cast<unsigned>(blocks), dim3(kWarpSize, kColumnSumSplit), 0, stream>>>(part, out, P,
                                                                                       N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- Launch shapes ------------------------------------------------------------------------------

template <typename T>
using acc_t = at::opmath_type<T>;  // float for half / bf16 / float, double for double

// Bytes of dynamic shared memory left for other static shared arrays (the row_sum scratch).
constexpr int kSmemReserve = 4096;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The least power of two >= v, at most 2^30 (callers clamp to a thread count; an int doubling
// past v > 2^31 would overflow and never end).
inline int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p *= 2;
  return p;
}

// Threads per row: a power of two in [32, max_threads] giving each thread at most `items`
// vectors where possible; rows per block: enough for about 256 threads.
inline dim3 row_block(int64_t nvec, int items, int max_threads) {
  const int x = std::min(max_threads, std::max(kWarpSize, pow2_at_least(cdiv(nvec, items))));
  const int y = std::max(1, std::min(kMaxRowsPerBlock, 256 / x));
  return dim3(x, y);
}

inline unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastnn: too many rows (", blocks,
              " blocks) for one launch");
  return static_cast<unsigned>(blocks);
}

// Calls f(std::integral_constant<int, I>{}) with I the smallest of 1, 2, 4, 8 that is >= items:
// the compile-time vectors-per-thread of a register-resident row kernel.
template <typename F>
void with_items(int64_t items, F&& f) {
  if (items <= 1)
    f(std::integral_constant<int, 1>{});
  else if (items <= 2)
    f(std::integral_constant<int, 2>{});
  else if (items <= 4)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

// ---- Register tiles: every load of a tile issued before any of its values is used --------------
// nvcc keeps a load and its first use together when both sit in one branch: the RMSNorm forward
// that loaded each vector under `if (col < n)` and summed it there had one load in flight per
// thread in its SASS (LDG, use, LDG, use, ...), and ran at 45-55% of copy on an H200 at N = 1K-16K
// bf16 where the Triton kernel, loading whole tiles, ran at 88-97%. These helpers load a tile of
// vectors (zeros outside the row) and return before any is used, so all of them are in flight.

// Slot i of this thread in a tile starting at vector `first` of a row: vector
// first + i * blockDim.x + threadIdx.x (consecutive threads, consecutive 16-byte vectors).
__device__ __forceinline__ int64_t tile_vector(int64_t first, int i) {
  return first + static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
}

// v[i] = the row's vector at slot i (row: the row's first element; nvec vectors in the row), or
// zeros where the slot is past the row or !valid.
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void load_tile(const T* row, int64_t first, int64_t nvec, bool valid,
                                          Vec<T, VEC> (&v)[ITEMS]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t k = tile_vector(first, i);
    v[i] = Vec<T, VEC>{};
    if (valid && k < nvec) v[i] = load_vec<T, VEC>(row + k * VEC);
  }
}

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void store_tile(T* row, int64_t first, int64_t nvec, bool valid,
                                           const Vec<T, VEC> (&v)[ITEMS]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t k = tile_vector(first, i);
    if (valid && k < nvec) store_vec(row + k * VEC, v[i]);
  }
}

// s = x (+ r, rounded to T as an unfused add would round it) for the tile at vector `first` of the
// row starting at element `off`, also stored to res_out: a norm forward's read of its input (Args:
// its arguments, with x, res, res_out and n; res nullptr without a residual).
template <typename Args, typename T, int VEC, int ITEMS>
__device__ __forceinline__ void load_sum_tile(const Args& a, int64_t off, int64_t first, bool valid,
                                              Vec<T, VEC> (&s)[ITEMS]) {
  using A = acc_t<T>;
  const int64_t nvec = a.n / VEC;
  load_tile(a.x + off, first, nvec, valid, s);
  if (a.res == nullptr) return;
  Vec<T, VEC> r[ITEMS];
  load_tile(a.res + off, first, nvec, valid, r);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      s[i].v[j] = static_cast<T>(static_cast<A>(s[i].v[j]) + static_cast<A>(r[i].v[j]));
  store_tile(a.res_out + off, first, nvec, valid, s);
}

// The staged forward (rows past the register tier; the scalar fallback): blocks of at most
// kStagedThreads threads per row, each loading tiles of kStagedItems vectors: 8 KB of a row in
// flight per block, under 128 registers a thread (1024-thread blocks, 64 registers a thread,
// spilled 4-38 B in LayerNorm's with tiles of 2 vectors; ptxas, sm_90).
constexpr int kStagedThreads = 512;
constexpr int kStagedItems = 4;

// stage_tile keeps a tile of the first pass in shared memory;
// reload_tile gives it back to a later pass, from shared memory (SMEM) or from `row` in global
// memory (a row the same threads wrote or read in the first pass).
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void stage_tile(Vec<T, VEC>* stage, int64_t first, int64_t nvec,
                                           const Vec<T, VEC> (&s)[ITEMS]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t k = tile_vector(first, i);
    if (k < nvec) stage[k] = s[i];
  }
}

template <bool SMEM, typename T, int VEC, int ITEMS>
__device__ __forceinline__ void reload_tile(const Vec<T, VEC>* stage, const T* row, int64_t first,
                                            int64_t nvec, Vec<T, VEC> (&s)[ITEMS]) {
  if constexpr (SMEM) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t k = tile_vector(first, i);
      s[i] = k < nvec ? stage[k] : Vec<T, VEC>{};
    }
  } else {
    load_tile(row, first, nvec, true, s);
  }
}

// Backward column tier (rows too long to hold in registers): a row-dot kernel, one block of
// kRowDotThreads per row, then a [column block, row group] grid of kColThreads-thread blocks,
// each thread loading kColRows rows of its vector (and their statistics) before using any.
// The row-dot kernel's tiles hold kRowDotItems vectors of x, dy and the weight per thread: 40-72
// registers (ptxas, sm_90); 4 vectors took 99-105 and spilled for fp16, and 512-thread blocks
// made ptxas keep LayerNorm's at 64 registers with a 4-byte spill.
constexpr int kRowDotThreads = 256;
constexpr int kRowDotItems = 2;
constexpr int kColThreads = 256;
constexpr int kColRows = 4;

// The row-dot kernels' pass over the row starting at element `off` (Args: a norm backward's
// arguments, with x, dy, w and n): f(x, dy, w, in_row) for each of this thread's vectors, in
// tiles of kRowDotItems vectors of x, dy and the weight (w unset without one), every load of a
// tile issued before any is used. in_row is false for the slots past the row, which hold zeros.
template <typename T, typename W, int VEC, typename Args, typename F>
__device__ __forceinline__ void for_each_row_dot_vector(const Args& a, int64_t off, F&& f) {
  const int64_t nvec = a.n / VEC;
#pragma unroll 1  // a tile holds kRowDotItems vectors of x, dy and w: enough loads in flight
  for (int64_t first = 0; first < nvec; first += int64_t{kRowDotItems} * blockDim.x) {
    Vec<T, VEC> x[kRowDotItems], dy[kRowDotItems];
    Vec<W, VEC> w[kRowDotItems];
    load_tile(a.x + off, first, nvec, true, x);
    load_tile(a.dy + off, first, nvec, true, dy);
    if (a.w != nullptr) load_tile(a.w, first, nvec, true, w);
#pragma unroll
    for (int i = 0; i < kRowDotItems; ++i) f(x[i], dy[i], w[i], tile_vector(first, i) < nvec);
  }
}

// v[r] = p's vector at column `col` of row base + r * groups (zeros past `rows`).
template <typename T, int VEC>
__device__ __forceinline__ void load_col(const T* p, int64_t base, int64_t groups, int64_t rows,
                                         int64_t n, int64_t col, Vec<T, VEC> (&v)[kColRows]) {
#pragma unroll
  for (int r = 0; r < kColRows; ++r) {
    const int64_t row = base + r * groups;
    v[r] = Vec<T, VEC>{};
    if (row < rows) v[r] = load_vec<T, VEC>(p + row * n + col);
  }
}

// v[r] = p[base + r * groups] (a per-row statistic; zero past `rows`).
template <typename A>
__device__ __forceinline__ void load_col_stats(const A* p, int64_t base, int64_t groups,
                                               int64_t rows, A (&v)[kColRows]) {
#pragma unroll
  for (int r = 0; r < kColRows; ++r) {
    const int64_t row = base + r * groups;
    v[r] = row < rows ? p[row] : A(0);
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int device) {
  // Above 48 KB of static + dynamic shared memory a kernel must opt in; our kernels' static
  // scratch stays under kSmemReserve (a 48 KB row plus 1 KB of scratch failed to launch). The
  // limit is the kernel's on this device for every host thread: it is set to the most any launch
  // asks for, never to this launch's bytes, which a thread launching a longer row would have
  // to outrun.
  if (bytes + kSmemReserve > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        max_shared_memory(device) - kSmemReserve));
}

// fp64 and unaligned / odd-N tensors take the scalar (VEC = 1) staged kernels.
template <typename T>
constexpr int vec_width() {
  return std::is_same_v<T, double> ? 1 : static_cast<int>(16 / sizeof(T));
}

template <typename T, typename W>
bool vectorizable(int64_t n, std::initializer_list<const void*> data, const W* w) {
  constexpr int kVec = vec_width<T>();
  if (kVec == 1 || n % kVec != 0) return false;
  for (const void* p : data)
    if (!is_aligned(p, 16)) return false;
  return is_aligned(w, static_cast<int64_t>(sizeof(W)) * kVec);
}

// Persistent grid: as many blocks as are resident at once, at most one per row group of work.
template <typename Kernel>
int64_t persistent_grid(Kernel kernel, dim3 block, size_t smem, int64_t rows, int device) {
  const int64_t resident =
      static_cast<int64_t>(sm_count(device)) * blocks_per_sm(kernel, block.x * block.y, smem);
  return std::max<int64_t>(1, std::min(resident, cdiv(rows, block.y)));
}

// Grid of a column-tier kernel over `nvec` vectors per row: one block per kColThreads vectors
// (x), and row groups (y) enough for the resident blocks, at most one per row.
template <typename Kernel>
dim3 cols_grid(Kernel kernel, int64_t nvec, int64_t rows, int device) {
  const int64_t col_blocks = cdiv(nvec, kColThreads);
  const int64_t resident =
      static_cast<int64_t>(sm_count(device)) * blocks_per_sm(kernel, kColThreads, 0);
  const int64_t groups = std::min<int64_t>({cdiv(resident, col_blocks), rows, 65535});
  return dim3(grid_size(col_blocks), static_cast<unsigned>(std::max<int64_t>(groups, 1)));
}

// ---- Norm launches shared by RMSNorm and LayerNorm -------------------------------------------

// The staged forward of vectorised rows, one row per block of kStagedThreads: the row kept in
// dynamic shared memory (kernel_smem) when `row_bytes` fit, else re-read from global memory.
template <typename KernelSmem, typename KernelGlobal, typename Args>
void launch_staged_fwd(KernelSmem kernel_smem, KernelGlobal kernel_global, const Args& a,
                       size_t row_bytes, int device, cudaStream_t stream) {
  const unsigned grid = grid_size(a.rows);
  if (row_bytes + kSmemReserve <= static_cast<size_t>(max_shared_memory(device))) {
    allow_smem(kernel_smem, row_bytes, device);
    kernel_smem<<<grid, kStagedThreads, row_bytes, stream>>>(a);
  } else {
    kernel_global<<<grid, kStagedThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The scalar forward fallback (misaligned pointers, N % VEC != 0, fp64): the staged kernel with
// VEC = 1, several short rows per block.
template <typename Kernel, typename Args>
void launch_scalar_fwd(Kernel kernel, const Args& a, cudaStream_t stream) {
  const dim3 block = row_block(a.n, kStagedItems, kStagedThreads);
  kernel<<<grid_size(cdiv(a.rows, block.y)), block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A persistent backward kernel (one partial row per row group) on the blocks resident at once:
// set_partials(args, P) points args at P partial rows first. Returns P.
template <typename Kernel, typename Args, typename SetPartials>
int64_t launch_persistent_bwd(Kernel kernel, dim3 block, Args a, SetPartials set_partials,
                              int device, cudaStream_t stream) {
  const int64_t grid = persistent_grid(kernel, block, 0, a.rows, device);
  set_partials(a, grid * block.y);
  kernel<<<grid_size(grid), block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grid * block.y;
}

// The backward column tier: the row-dot kernel writes per-row statistics into row_stats, then the
// column kernel (one partial row per row group: set_partials as above). Returns P.
template <typename RowDot, typename Cols, typename Args, typename Stat, typename SetPartials>
int64_t launch_column_bwd(RowDot row_dot, Cols cols, Args a, Stat* row_stats, int64_t nvec,
                          SetPartials set_partials, int device, cudaStream_t stream) {
  row_dot<<<grid_size(a.rows), kRowDotThreads, 0, stream>>>(a, row_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid = cols_grid(cols, nvec, a.rows, device);
  set_partials(a, grid.y);
  cols<<<grid, kColThreads, 0, stream>>>(a, row_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grid.y;
}

// The scalar backward fallback's block: several short rows per block, up to 1024 threads a row.
inline dim3 scalar_bwd_block(int64_t n) { return row_block(n, 4, 1024); }

// ---- Op entry helpers ---------------------------------------------------------------------------

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastnn: ", name, " of shape ", t.sizes(),
              " does not match ", ref_name, " of shape ", ref.sizes());
  check_float(t, name);
}

inline void check_input(const at::Tensor& input, const char* op, const char* name) {
  check_float(input, name);
  TORCH_CHECK(input.dim() == 2, "fastnn: ", op, " expects a 2-D ", name, " [rows, N], got shape ",
              input.sizes());
  TORCH_CHECK(input.is_cuda(), "fastnn: CUDA ", op, " got ", name, " on ", input.device());
}

// The weight as the kernels read it: its own dtype when it is the input's or the accumulation
// dtype (no copy), else converted to the accumulation dtype once.
inline at::Tensor weight_for_kernel(const c10::optional<at::Tensor>& w, at::ScalarType input_type) {
  if (!has(w)) return at::Tensor();
  const at::ScalarType acc = acc_scalar_type(input_type);
  const at::ScalarType t = w->scalar_type();
  return (t == input_type || t == acc) ? w->contiguous() : w->to(acc).contiguous();
}

// An output allocated as the op's fake allocates it (empty_like: strides follow `ref`), with a
// contiguous buffer for the kernels; finish() copies back when they differ.
struct Output {
  at::Tensor out, buf;
  explicit Output(const at::Tensor& ref)
      : out(at::empty_like(ref)),
        buf(out.is_contiguous() ? out : at::empty(ref.sizes(), ref.options())) {}
  at::Tensor finish() {
    if (!buf.is_same(out)) out.copy_(buf);
    return out;
  }
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace fastnn::cuda
