// Per-element math of the GLU family, out = act(gate) * up, shared by the CPU (csrc/cpu/glu.cpp)
// and CUDA (csrc/cuda/glu.cu) kernels, so the CPU tests check the formulas the GPU runs.
// T is the compute type: float for fp32 / fp16 / bf16 tensors, double for fp64.
//
// Stability: every sigmoid is 1 / (1 + exp(-x)), as torch's: exp(-x) overflows to inf for
// x < -88.7 and the sigmoid to 0, never NaN; sigmoid(-x) = 1 - sigmoid(x) is formed without
// cancellation (sigmoid_pair). So gates of +-1000 (or +-1e30) give finite outputs and
// derivatives: no inf * 0 anywhere. Each select below keeps a NaN input NaN.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernel's AVX2 clone must inline this math to vectorise the loop.
#define FASTNN_HD inline __attribute__((always_inline))
#else
#define FASTNN_HD inline
#endif

namespace fastnn {

// The activation, a compile-time template parameter of every kernel.
enum class Activation : int { kSilu, kGelu, kGeluTanh, kRelu, kSigmoid };

namespace glu_math {

// A float's bits and back (host: memcpy, which GCC vectorises as a plain move).
FASTNN_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}
FASTNN_HD float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// exp(y): 0 below -86.5 (where exp < 2.9e-38, near FLT_MIN), inf above 88.72, NaN for NaN.
// On the host a branch-free polynomial that GCC vectorises (glibc's expf is a call, which keeps
// the loop scalar: about 4x slower on AVX2); on the device the CUDA expf.
FASTNN_HD float exp_(float y) {
#if defined(__CUDA_ARCH__)
  return ::expf(y);
#else
  // Clamped so that 2^(n - 1) below is a normal float; these compare-selects pass NaN through
  // (GCC emits vmaxps / vminps for them), and the polynomial keeps it NaN.
  const float y_lo = y < -86.5f ? -86.5f : y;
  const float yc = y_lo > 89.0f ? 89.0f : y_lo;
  // y = n ln2 + r, |r| <= ln2 / 2, n in [-125, 128].
  // 1.5 * 2^23 rounds to nearest integer without a rounding-mode dependent call.
  // n + 1.5 * 2^23 holds n in its low mantissa bits: n is read from there, as an unsigned
  // integer (a NaN's bits give a NaN result; casting a NaN float to int would be undefined).
  const float kRound = 12582912.0f;  // bits 0x4B400000
  const float shifted = yc * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  // ln2 split in two (hi has 9 trailing zero bits) so n * hi is exact for |n| <= 128.
  const float r = (yc - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  // Taylor to degree 7: truncation error 0.347^8 / 8! = 5e-9 relative, under one fp32 ulp.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // p 2^n as (p 2^(n-1)) * 2: exact, and inf once it passes FLT_MAX (y > 88.72; n = 128 there).
  const float half_scale = float_of((bits_of(shifted) - 0x4B400000u + 126u) << 23);
  const float e = p * half_scale;
  return y < -86.5f ? 0.0f : e + e;
#endif
}
FASTNN_HD double exp_(double y) { return ::exp(y); }

template <typename T>
FASTNN_HD T abs_(T x) {
  return x < T(0) ? -x : x;  // NaN stays NaN
}

// The standard normal cdf Phi(x) = erfc(-x / sqrt2) / 2 and, when pdf is non-null, the pdf
// phi(x) = exp(-x^2 / 2) / sqrt(2 pi), by one branch-free formula on the host (where GCC
// vectorises it: glibc's erfcf is a call, and the GeGLU loop ran scalar, 0.08 G elements/s on one
// Xeon core) and the device (with CUDA's expf). Where Phi is a normal float: within 5.7 ulp with
// a correctly rounded exp (tools/fit_erfc.py), x Phi(x) of the CPU kernels within 7.7 ulp
// (5.5e-7 relative; tests/test_glu.py holds it to 1e-6), up to 5 ulp near 0 (glibc's erfcf: 2).
// For a = |x| / sqrt2: erfc(a) = t exp(-a^2 + P(u)), t = 1 / (1 + a / 2), u = (t - 0.575) / 0.425
// in [-1, 1], P a degree-9 fit of ln(erfc(a) / t) + a^2 (5.5e-8 in fp64); erfc(-a) = 2 - erfc(a).
// The exponent -x^2 / 2 is split into hi + lo with hi exact: erfc of a rounded x / sqrt2 (as
// CUDA's erfcf would get it) costs up to x^2 / 2 ulp of the result (1e-5 relative at x = -13),
// and torch's 0.5 (1 + erf(x / sqrt2)) cancels to 0 below x = -5.42 (fp32, CPU, torch 2.14.1).
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// x with its 12 low mantissa bits cleared: its square is exact in fp32.
FASTNN_HD float high_half(float x) { return float_of(bits_of(x) & 0xFFFFF000u); }

FASTNN_HD float normal_cdf(float x, float* pdf = nullptr) {
  const float x_abs = abs_(x);
  const float xa = x_abs > 14.5f ? 14.5f : x_abs;  // Phi(-14.5) = 6e-48, 0 in fp32; NaN stays NaN
  const float t = 1.0f / (1.0f + 0.5f * (xa * float(kSqrtHalf)));
  const float u = (t - 0.575f) * (1.0f / 0.425f);
  float p = 6.975276723e-05f;
  p = p * u + 7.119121880e-05f;
  p = p * u + -6.342521674e-04f;
  p = p * u + -1.652322374e-04f;
  p = p * u + 4.123349715e-03f;
  p = p * u + -1.555802914e-03f;
  p = p * u + -3.116925720e-02f;
  p = p * u + 1.822052923e-02f;
  p = p * u + 5.810347901e-01f;
  p = p * u + -5.699950141e-01f;
  const float x_hi = high_half(xa);
  const float hi = -0.5f * (x_hi * x_hi);
  const float lo = 0.5f * ((x_hi - xa) * (x_hi + xa));
  float erfc_a;
  if (pdf != nullptr) {
    const float e = exp_(hi) * exp_(lo);
    *pdf = float(kInvSqrt2Pi) * e;
    erfc_a = t * e * exp_(p);
  } else {
    erfc_a = t * exp_(hi) * exp_(lo + p);
  }
  return x > 0.0f ? 1.0f - 0.5f * erfc_a : 0.5f * erfc_a;
}
FASTNN_HD double normal_cdf(double x, double* pdf = nullptr) {
  if (pdf != nullptr) *pdf = kInvSqrt2Pi * ::exp(-0.5 * x * x);
  return 0.5 * ::erfc(-x * kSqrtHalf);
}

// x * sigmoid(y) as torch computes silu: one division, 0 * x (signed) once exp(-y) is inf.
template <typename T>
FASTNN_HD T times_sigmoid(T x, T y) {
  return x / (T(1) + exp_(-y));
}

// s = sigmoid(x), sm = sigmoid(-x) = 1 - s, both to full relative precision: sm is exp(-x) s
// for x >= 0 (where 1 - s cancels) and 1 - s for x < 0 (where exp(-x) may be inf and s 0).
template <typename T>
FASTNN_HD void sigmoid_pair(T x, T& s, T& sm) {
  const T e = exp_(-x);
  s = T(1) / (T(1) + e);
  sm = x >= T(0) ? e * s : T(1) - s;
}

// GeGLU (tanh): 0.5 x (1 + tanh(y)) = x sigmoid(2y), y = k0 (x + k1 x^3), and
// sech^2(y) = 4 sigmoid(2y) sigmoid(-2y). The cubic uses x clamped to [-22, 22]: beyond it
// |2y| > 795, where exp(-2|y|) underflows to 0 even in fp64, so sigmoid(2y) is exactly 0 or 1
// with or without the clamp, while x^3 and the derivative's 3 k1 x^2 cannot overflow into inf * 0.
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhCubic = 0.044715;

template <typename T>
FASTNN_HD T clamp22(T x) {
  const T lo = x < T(-22) ? T(-22) : x;  // NaN stays NaN; two selects, not a nested one,
  return lo > T(22) ? T(22) : lo;        // which GCC left as branches (a scalar loop)
}

}  // namespace glu_math

// act(x).
template <Activation A, typename T>
FASTNN_HD T glu_act(T x) {
  using namespace glu_math;
  if constexpr (A == Activation::kSilu) {
    return times_sigmoid(x, x);
  } else if constexpr (A == Activation::kSigmoid) {
    return times_sigmoid(T(1), x);
  } else if constexpr (A == Activation::kGeluTanh) {
    const T xc = clamp22(x);
    const T y2 = T(2 * kSqrt2OverPi) * xc * (T(1) + T(kGeluTanhCubic) * xc * xc);
    return times_sigmoid(x, y2);
  } else if constexpr (A == Activation::kGelu) {
    return x * normal_cdf(x);
  } else {                        // kRelu
    return x <= T(0) ? T(0) : x;  // NaN stays NaN, as torch.relu
  }
}

// act(x) and act'(x).
template <Activation A, typename T>
FASTNN_HD void glu_act_grad(T x, T& act, T& dact) {
  using namespace glu_math;
  if constexpr (A == Activation::kSilu) {
    T s, sm;
    sigmoid_pair(x, s, sm);
    act = x * s;
    dact = s * (T(1) + x * sm);  // s + x s (1 - s)
  } else if constexpr (A == Activation::kSigmoid) {
    T s, sm;
    sigmoid_pair(x, s, sm);
    act = s;
    dact = s * sm;
  } else if constexpr (A == Activation::kGeluTanh) {
    const T xc = clamp22(x);
    const T x2 = xc * xc;
    const T y2 = T(2 * kSqrt2OverPi) * xc * (T(1) + T(kGeluTanhCubic) * x2);
    T s, sm;
    sigmoid_pair(y2, s, sm);
    act = x * s;
    // d/dx [x sigmoid(2y)] = sigmoid(2y) + 2 x sigmoid(2y) sigmoid(-2y) y'
    const T dy = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluTanhCubic) * x2);
    dact = s + T(2) * xc * s * sm * dy;
  } else if constexpr (A == Activation::kGelu) {
    // erfc(-x / sqrt2) keeps the cdf accurate for negative x (1 + erf cancels there).
    T pdf;
    const T cdf = normal_cdf(x, &pdf);
    act = x * cdf;
    dact = cdf + x * pdf;
  } else {  // kRelu: derivative 0 at 0, as torch
    act = x <= T(0) ? T(0) : x;
    dact = x <= T(0) ? T(0) : T(1);
  }
}

// h = act(g) * u
template <Activation A, typename T>
FASTNN_HD T glu_fwd_elem(T g, T u) {
  return glu_act<A>(g) * u;
}

// dg = dh * u * act'(g), du = dh * act(g)
template <Activation A, typename T>
FASTNN_HD void glu_bwd_elem(T dh, T g, T u, T& dg, T& du) {
  T a, da;
  glu_act_grad<A>(g, a, da);
  if constexpr (A == Activation::kRelu) {
    dg = g <= T(0) ? T(0) : dh * u;  // a select, as torch's relu backward: 0 even for u = NaN
  } else {
    dg = dh * u * da;
  }
  du = dh * a;
}

// Host side: the schema's activation string -> the enum, with an error naming the choices.
inline Activation parse_activation(std::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "sigmoid") return Activation::kSigmoid;
  TORCH_CHECK_VALUE(false, "fastnn: unknown GLU activation '", name,
                    "'; expected one of silu, gelu, gelu_tanh, relu, sigmoid");
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value `act`, so a kernel
// template is instantiated once per activation.
template <typename F>
inline void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu:
      return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSigmoid:
      return f(std::integral_constant<Activation, Activation::kSigmoid>{});
  }
}

}  // namespace fastnn
