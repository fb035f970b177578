// Run-time ISA dispatch of the CPU kernels. The extension is compiled for baseline x86-64 (SSE2),
// so wheels run on any x86-64 CPU; each hot loop is instantiated a second time inside a function
// with a GCC target attribute and chosen by has_avx2() at run time. The loop bodies are
// always-inline, so the clone's copy is compiled with 256-bit registers.
//
// Two clone targets: FASTNN_TARGET_AVX2 allows FMA (norms, GLU family: accumulations whose
// tolerance allows contracted a * b + c), FASTNN_TARGET_AVX2_NO_FMA does not (optimizer updates:
// the compiler cannot contract, so every lane rounds as the baseline copy's does: the same bits
// on every x86-64 machine, each operation IEEE-rounded in the order of torch's for-loop step;
// the multiply-adds torch rounds once are explicit fma_ calls, fastnn/adam_math.h).
//
// The GLU family and the norms, compute-bound where their rows sit in cache (an exp and a
// division per GLU element; bf16 widened in registers), have a third clone, FASTNN_TARGET_AVX512
// (64-byte vectors), chosen by has_avx512(). The optimizer updates, memory-bound, gain nothing
// from it (2-core Xeon VM, 2026-11-27: 67 GB/s with AVX-512 against 71 GB/s with AVX2).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTNN_X86_AVX2 1
#define FASTNN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTNN_TARGET_AVX2_NO_FMA __attribute__((target("avx2")))
#if defined(__clang__)
#define FASTNN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#else  // GCC would keep 256-bit vectors in an AVX-512 function unless told otherwise
#define FASTNN_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")))
#endif
#else
#define FASTNN_X86_AVX2 0
#define FASTNN_TARGET_AVX2
#define FASTNN_TARGET_AVX2_NO_FMA
#define FASTNN_TARGET_AVX512
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTNN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTNN_ALWAYS_INLINE inline
#endif

namespace fastnn::cpu {

inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// AVX2, FMA and F16C (x86-64 CPUs since 2013 have all three). FASTNN_CPU_NO_AVX2=1 in the
// environment (read at the first kernel call) picks the baseline code instead, so that machines
// with AVX2 can test it (tests/test_cpu_baseline_isa.py).
inline bool has_avx2() {
#if FASTNN_X86_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && !env_flag("FASTNN_CPU_NO_AVX2");
  return ok;
#else
  return false;
#endif
}

// AVX-512 F / BW / VL / DQ on top of has_avx2(); FASTNN_CPU_NO_AVX512=1 picks the AVX2 clones
// (tests/test_cpu_baseline_isa.py compares the two).
inline bool has_avx512() {
#if FASTNN_X86_AVX2
  static const bool ok = has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && !env_flag("FASTNN_CPU_NO_AVX512");
  return ok;
#else
  return false;
#endif
}

}  // namespace fastnn::cpu
