// Tiles of the CPU optimizer updates (csrc/cpu/adam.cpp, csrc/cpu/rmsprop.cpp): storage dtypes
// (fp32, fp16, bf16, fp64) widened to the math type M in a tile buffer and rounded back, and the
// split of the tensors' concatenated index space over the threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fastnn/cpu_isa.h"

#if FASTNN_X86_AVX2
#include <immintrin.h>  // F16C conversions
#endif

namespace fastnn::cpu {

// ---- Tiles: storage dtype <-> math type M -------------------------------------------------------

template <typename S, typename M>
inline void widen(const S* __restrict src, M* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<M>(static_cast<float>(src[i]));
}

template <typename S, typename M>
inline void narrow(const M* __restrict src, S* __restrict dst, int64_t n) {
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
// even, as c10 does), chosen at run time with the AVX2 clones (fastnn/cpu_isa.h).
#if FASTNN_X86_AVX2
inline __attribute__((target("avx,f16c"))) void widen_f16c(const c10::Half* src, float* dst,
                                                           int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline __attribute__((target("avx,f16c"))) void narrow_f16c(const float* src, c10::Half* dst,
                                                            int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}
#endif

inline void widen(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
#if FASTNN_X86_AVX2
  if (has_avx2()) return widen_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void narrow(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
#if FASTNN_X86_AVX2
  if (has_avx2()) return narrow_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

template <typename M>
constexpr c10::ScalarType scalar_type_of() {
  return std::is_same_v<M, double> ? at::kDouble : at::kFloat;
}

// Elements [off, off + n) of `base` (dtype st) as M values: the array itself when st is M,
// else widened into buf. `op` names the op in the (internal) error for an unexpected dtype.
template <typename M>
M* load_tile(const void* base, c10::ScalarType st, int64_t off, int64_t n, M* buf, const char* op) {
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
      TORCH_INTERNAL_ASSERT(false, "fastnn: ", op, " tile of ", st);
  }
  return buf;
}

// Writes a tile back when it was widened (an in-place array needs nothing).
template <typename M>
void store_tile(const M* tile, void* base, c10::ScalarType st, int64_t off, int64_t n,
                const char* op) {
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
      TORCH_INTERNAL_ASSERT(false, "fastnn: ", op, " tile of ", st);
  }
}

// ---- Software prefetch --------------------------------------------------------------------------

// The storage of a tile's streams (params, grads, states: whatever their dtype), prefetched
// kPrefetchAhead elements ahead of the update, one cache line at a time. A step's state is cold
// in a training loop (forward and backward evict it), and two cores' hardware prefetchers leave
// memory idle: Adam fp32 over 5.3M params read from memory ran at 36 -> 41 GB/s (+10%) with
// software prefetch 512 B to 4 KB ahead, on the Intel Xeon dev VM (2 cores, 2026-11-27); when
// the whole state sits in its L3 the extra instructions cost 4%. Prefetches never fault, so the
// addresses may run past a tensor's end.
constexpr int64_t kPrefetchAhead = 512;  // elements: 2 KB of fp32

class StreamPrefetch {
 public:
  // The stream at `base` (dtype st), from element `off` on.
  void add(const void* base, c10::ScalarType st, int64_t off) {
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(count_ < kMaxStreams);
    const int64_t size = static_cast<int64_t>(c10::elementSize(st));
    bytes_[count_] = size;
    next_[count_] = reinterpret_cast<uintptr_t>(base) + uintptr_t((off + kPrefetchAhead) * size);
    ++count_;
  }

  // Element i of the tile (from `off`) is about to be read.
  FASTNN_ALWAYS_INLINE void ahead_of(int64_t i) const {
    for (int s = 0; s < count_; ++s) {
      __builtin_prefetch(reinterpret_cast<const void*>(next_[s] + uintptr_t(i * bytes_[s])));
    }
  }

 private:
  static constexpr int kMaxStreams = 6;  // param, grad, three states, master copy
  uintptr_t next_[kMaxStreams] = {};
  int64_t bytes_[kMaxStreams] = {};
  int count_ = 0;
};

// ---- Threads ------------------------------------------------------------------------------------

// The tensors laid end to end (tensor t covers [ends[t - 1], ends[t]) of [0, total)), the index
// space split evenly over the threads, so hundreds of small tensors do not serialise and one large
// tensor still uses every core: fn(t, lo, hi) updates elements [lo, hi) of tensor t.
template <typename F>
void for_each_range(const std::vector<int64_t>& ends, int64_t total, int64_t grain, const F& fn) {
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    for (; begin < end; ++t) {
      const int64_t start = t == 0 ? 0 : ends[t - 1];
      const int64_t stop = std::min(end, ends[t]);
      fn(t, begin - start, stop - start);
      begin = stop;
    }
  });
}

}  // namespace fastnn::cpu
