// Conversions between the 16-bit storage dtypes and fp32 that vectorise, rounding to nearest even
// as c10's do (c10's operators are out-of-line calls in a loop, which keep it scalar):
// - bf16 element by element by bit arithmetic (to_float / from_float, to_acc / store_acc), which
//   GCC vectorises inside any loop;
// - whole rows (widen / narrow), fp16 by F16C (8 values per instruction, chosen at run time):
//   GCC 12 converts _Float16 one value at a time, and fp16 by bit arithmetic cost the norms 1.5-2x
//   (RMSNorm / LayerNorm [1024, 4096], one Xeon VM core, 2026-11-27).
// Used by the CPU GLU, norm and optimizer kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastnn/cpu_isa.h"

#if FASTNN_X86_AVX2
#include <immintrin.h>  // F16C conversions
#endif

namespace fastnn::cpu {

// memcpy, not std::bit_cast: with std::bit_cast GCC 12 left the norms' bf16 row loops scalar
// (a bf16 norm forward's AVX-512 clone: 102 zmm instructions with memcpy, 6 with bit_cast).
FASTNN_ALWAYS_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
FASTNN_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

FASTNN_ALWAYS_INLINE float to_float(c10::BFloat16 x) {
  return bits_to_float(static_cast<uint32_t>(x.x) << 16);
}
FASTNN_ALWAYS_INLINE void from_float(float f, c10::BFloat16& y) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  y.x = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);  // a NaN stays a quiet NaN
}

// x as an A: widened from a 16-bit type, as is when already A.
template <typename A, typename T>
FASTNN_ALWAYS_INLINE A to_acc(T x) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    return static_cast<A>(to_float(x));
  }
}

// y = v rounded to T (from A; A is float whenever T is a 16-bit type).
template <typename T, typename A>
FASTNN_ALWAYS_INLINE void store_acc(A v, T& y) {
  if constexpr (std::is_same_v<T, A>) {
    y = v;
  } else {
    from_float(v, y);
  }
}

// ---- Rows: storage dtype S <-> math type M ------------------------------------------------------

template <typename S, typename M>
inline void widen(const S* __restrict src, M* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<M>(static_cast<float>(src[i]));
}

template <typename S, typename M>
inline void narrow(const M* __restrict src, S* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(static_cast<float>(src[i]));
}

// Always inline, so that a kernel's AVX2 / AVX-512 clone vectorises its own copy.
FASTNN_ALWAYS_INLINE void widen(const c10::BFloat16* __restrict src, float* __restrict dst,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

FASTNN_ALWAYS_INLINE void narrow(const float* __restrict src, c10::BFloat16* __restrict dst,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_float(src[i], dst[i]);
}

// fp16 <-> fp32: c10::Half's conversions are scalar bit manipulation (about 10x slower than an
// optimizer update itself); x86 CPUs since 2012 convert 8 values per instruction (F16C, round to
// nearest even, as c10 does), chosen at run time with the AVX2 clones (fastnn/cpu_isa.h).
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

}  // namespace fastnn::cpu
