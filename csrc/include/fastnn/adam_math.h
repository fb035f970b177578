// Per-element math of the Adam / AdamW update, shared by the CPU (csrc/cpu/adam.cpp) and CUDA
// (csrc/cuda/adam.cu) kernels, so the CPU tests check the formulas the GPU runs. Also holds the
// elementwise helpers that rmsprop_math.h reuses.
//
// Order of operations is torch.optim.Adam's for-loop (single-tensor) path, so trajectories match
// it closely: every scalar coefficient is computed in double (as Python does) and rounded once to
// the math type M; the per-element math runs in M: float for fp32 / fp16 / bf16 tensors, double
// for fp64. No fast-math: IEEE division and square root. Where torch's ops compute a multiply-add
// rounded once (addcmul, lerp, add with alpha: fused in its CPU and CUDA kernels) so does fma_
// here, on every host and device; the host build contracts nothing else, and where nvcc could
// contract a * b + c that torch rounds twice, mul_ keeps the product's own rounding
// (tests/test_optim_math_contraction.py builds this math with every multiply-add contracted and
// compares its bits with the host build's).
//
// V, the type of the per-element values, is M, or on the host a GCC vector of M (the CPU kernels
// run 16- or 32-byte vectors through the same code; see host_vec). The option flags are plain
// bools: the CPU kernels pass compile-time constants (the branches fold away and the loop stays
// straight-line), the CUDA kernels pass the launch's flags (uniform branches, no divergence).
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTNN_OPT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTNN_OPT_HD inline __attribute__((always_inline))
#else
#define FASTNN_OPT_HD inline
#endif

namespace fastnn {
namespace optim_math {

FASTNN_OPT_HD float sqrt_(float x) { return ::sqrtf(x); }
FASTNN_OPT_HD double sqrt_(double x) { return ::sqrt(x); }

// fma_(a, b, c) = a * b + c rounded once: the addcmul of torch's steps (self + value * t1 * t2),
// which torch's CPU kernels (built with FMA, contracted) and CUDA kernels compute so. One rounding
// matters in centered RMSprop's square_avg - grad_avg^2: rounded twice, it cancels to exactly 0
// under a steady gradient and the step divides by eps alone (a param 5e4x off torch's after 1500
// steps of a constant gradient).
FASTNN_OPT_HD float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
FASTNN_OPT_HD double fma_(double a, double b, double c) { return ::fma(a, b, c); }

// a * b rounded on its own, where torch rounds a product before adding to it (RMSprop's
// buf.mul_(momentum) then addcdiv_): nvcc contracts a * b + c into one fma unless told not to.
template <typename V, typename M>
FASTNN_OPT_HD V mul_(V a, M b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<V, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;  // host scalars and vectors: the host build contracts nothing
#endif
}

#if !defined(__CUDACC__) && defined(__GNUC__)
// Host vectors. GCC does not vectorise a loop that calls sqrt unless the whole build has
// -fno-math-errno (sqrt(-1) must set errno; neither a pragma nor an attribute changes that per
// function). On vector types the square root is the vector instruction itself (IEEE-exact), and
// +, -, *, / and ?: act per lane with the same IEEE rounding as the scalar code.
template <typename M, int kBytes>
struct host_vec {
  typedef M type __attribute__((vector_size(kBytes)));
};
using f32x4 = host_vec<float, 16>::type;
using f64x2 = host_vec<double, 16>::type;
using f32x8 = host_vec<float, 32>::type;
using f64x4 = host_vec<double, 32>::type;

// Baseline x86-64 has no FMA instruction: 16-byte vectors lane by lane (libm's fma, exact).
template <typename V>
FASTNN_OPT_HD V fma_lanes(V a, V b, V c) {
  for (int i = 0; i < int(sizeof(V) / sizeof(a[0])); ++i) c[i] = std::fma(a[i], b[i], c[i]);
  return c;
}
FASTNN_OPT_HD f32x4 fma_(f32x4 a, f32x4 b, f32x4 c) { return fma_lanes(a, b, c); }
FASTNN_OPT_HD f64x2 fma_(f64x2 a, f64x2 b, f64x2 c) { return fma_lanes(a, b, c); }

#if defined(__x86_64__)
// SSE2 is part of x86-64: no target attribute needed.
FASTNN_OPT_HD f32x4 sqrt_(f32x4 x) { return __builtin_ia32_sqrtps(x); }
FASTNN_OPT_HD f64x2 sqrt_(f64x2 x) { return __builtin_ia32_sqrtpd(x); }
// 32-byte vectors exist only inside the AVX2 clones of the CPU updates. The instruction is
// written as inline asm: an AVX builtin would need a target attribute here, and GCC refuses to
// inline a target("avx") helper into adam_update (no target attribute) before that reaches the
// clone. vsqrtps / vsqrtpd are the IEEE square root, lane by lane.
FASTNN_OPT_HD f32x8 sqrt_(f32x8 x) {
  f32x8 r;
  asm("vsqrtps %1, %0" : "=x"(r) : "x"(x));
  return r;
}
FASTNN_OPT_HD f64x4 sqrt_(f64x4 x) {
  f64x4 r;
  asm("vsqrtpd %1, %0" : "=x"(r) : "x"(x));
  return r;
}
// c = a * b + c, rounded once (the clones run only on CPUs with FMA: has_avx2()).
FASTNN_OPT_HD f32x8 fma_(f32x8 a, f32x8 b, f32x8 c) {
  asm("vfmadd231ps %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
  return c;
}
FASTNN_OPT_HD f64x4 fma_(f64x4 a, f64x4 b, f64x4 c) {
  asm("vfmadd231pd %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
  return c;
}
#else
// Other hosts: lane by lane (scalar, still exact).
inline f32x4 sqrt_(f32x4 x) {
  for (int i = 0; i < 4; ++i) x[i] = std::sqrt(x[i]);
  return x;
}
inline f64x2 sqrt_(f64x2 x) {
  for (int i = 0; i < 2; ++i) x[i] = std::sqrt(x[i]);
  return x;
}
#endif
#endif  // host vectors

// torch.maximum: NaN when either side is NaN. A mask and ?: so it is one select per lane for
// vectors; when b is NaN, a > b is false and b (NaN) is returned.
template <typename V>
FASTNN_OPT_HD V max_nan_(V a, V b) {
  return ((a > b) | (a != a)) ? a : b;
}

// A scalar as a V (a host vector's every lane; the scalar itself for V = M).
template <typename V, typename M>
FASTNN_OPT_HD V splat(M m) {
  return V{} + m;
}

// x + alpha * y rounded once: torch's add(x, y, alpha=...) (a fused multiply-add in its CPU and
// CUDA kernels).
template <typename V, typename M>
FASTNN_OPT_HD V add_scaled(V x, M alpha, V y) {
  return fma_(splat<V>(alpha), y, x);
}

// at::lerp(self, end, w): two forms chosen by |w| < 0.5 for accuracy at both ends, each a
// multiply-add rounded once, as torch's kernels compute it. `w` is the weight rounded from double
// (float(1 - beta)), one_minus_w = 1 - w computed in M, as torch does.
template <typename M>
struct LerpWeight {
  M w;
  M one_minus_w;
  bool small;
};

template <typename M>
FASTNN_OPT_HD LerpWeight<M> lerp_weight(double w) {
  LerpWeight<M> out;
  out.w = static_cast<M>(w);
  out.one_minus_w = M(1) - out.w;
  out.small = (out.w < M(0) ? -out.w : out.w) < M(0.5);
  return out;
}

template <typename V, typename M>
FASTNN_OPT_HD V lerp_(V self, V end, const LerpWeight<M>& lw) {
  const V diff = end - self;
  return lw.small ? add_scaled(self, lw.w, diff) : add_scaled(end, -lw.one_minus_w, diff);
}

// The gradient unscale g / d (d = grad_scale, negated for maximize; 1 without a scaler). When |d|
// is a power of two (always for GradScaler and for no scaler) g * (1 / d) is the same number
// exactly, and a multiply costs a fraction of a division (the CPU loop is bound by its three
// divisions and one square root).
template <typename M>
struct GradUnscale {
  M divisor;
  M reciprocal;
  bool by_reciprocal;
  bool negated;  // d is -grad_scale (maximize)
};

template <typename M>
FASTNN_OPT_HD GradUnscale<M> grad_unscale(double grad_scale, bool maximize) {
  const double d = maximize ? -grad_scale : grad_scale;
  GradUnscale<M> u;
  int e = 0;
  const double mant = ::frexp(d, &e);
  u.divisor = static_cast<M>(d);
  u.reciprocal = static_cast<M>(1.0 / d);
  u.by_reciprocal = (mant == 0.5 || mant == -0.5) && e > -60 && e < 60;
  u.negated = maximize;
  return u;
}

// Returns g / d, the gradient the update uses, and sets g to g / grad_scale (the sign put back:
// g / -s == -(g / s) exactly), the unscaled gradient torch's fused optimizers write back to .grad.
template <typename V, typename M>
FASTNN_OPT_HD V unscale_(V& g, const GradUnscale<M>& u) {
  const V update_grad = u.by_reciprocal ? g * u.reciprocal : g / u.divisor;
  g = u.negated ? -update_grad : update_grad;
  return update_grad;
}

// ---- Adam ---------------------------------------------------------------------------------------

// Per-call hyperparameters, as passed to the op (doubles, as Python holds them).
struct AdamHyper {
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, maximize;
};

// Per-tensor coefficients in the math type, each rounded once from its double value.
template <typename M>
struct AdamCoeffs {
  GradUnscale<M> grad;       // g / d, d = grad_scale (1 without one), negated for maximize:
                             // g / -s == -(g / s) exactly
  M weight_decay;            // coupled (Adam) L2 term: g + wd * p
  M decay;                   // decoupled (AdamW): p * (1 - lr * wd)
  LerpWeight<M> beta1_lerp;  // exp_avg.lerp_(grad, 1 - beta1)
  M beta2, one_minus_beta2;  // exp_avg_sq * beta2 + (1 - beta2) * g * g
  M neg_step_size;           // -lr / bias_correction1
  M bias_correction2_sqrt;
  M eps;
};

// Bias corrections of step `step` (the count after this update), in double:
// bias_correction1 = 1 - beta1^step, sqrt(1 - beta2^step).
FASTNN_OPT_HD void adam_bias_corrections(double beta1, double beta2, double step, double* bc1,
                                         double* bc2_sqrt) {
  *bc1 = 1.0 - ::pow(beta1, step);
  *bc2_sqrt = ::sqrt(1.0 - ::pow(beta2, step));
}

// The coefficients of one tensor. grad_scale is 1 without a grad scaler.
template <typename M>
FASTNN_OPT_HD AdamCoeffs<M> adam_coeffs(const AdamHyper& h, double lr, double bc1, double bc2_sqrt,
                                        double grad_scale) {
  AdamCoeffs<M> c;
  c.grad = grad_unscale<M>(grad_scale, h.maximize);
  c.weight_decay = static_cast<M>(h.weight_decay);
  // Thread 0 of each CUDA block computes this: mul_ keeps nvcc from fusing it into one DFMA,
  // which would round 1 - lr * wd once where Python (and the host) round it twice.
  c.decay = static_cast<M>(1.0 - mul_(lr, h.weight_decay));
  c.beta1_lerp = lerp_weight<M>(1.0 - h.beta1);
  c.beta2 = static_cast<M>(h.beta2);
  c.one_minus_beta2 = static_cast<M>(1.0 - h.beta2);
  c.neg_step_size = static_cast<M>(-(lr / bc1));
  c.bias_correction2_sqrt = static_cast<M>(bc2_sqrt);
  c.eps = static_cast<M>(h.eps);
  return c;
}

// One Adam step on one element (or one host vector of elements). p holds the weights (the fp32
// master copy when there is one), g the raw gradient (still scaled), left unscaled (see unscale_)
// for callers that write it back; m, v, v_max the state. Flags: l2 = coupled weight decay (Adam
// with weight_decay != 0), decoupled = AdamW's decay with weight_decay != 0, amsgrad. v_max is
// read and written only with amsgrad.
template <typename V, typename M>
FASTNN_OPT_HD void adam_update(V& p, V& grad, V& m, V& v, V& v_max, const AdamCoeffs<M>& c, bool l2,
                               bool decoupled, bool amsgrad) {
  V g = unscale_(grad, c.grad);
  if (decoupled) p = mul_(p, c.decay);  // rounded before the update is added, as torch's mul_
  if (l2) g = add_scaled(g, c.weight_decay, p);  // grad.add(param, alpha=weight_decay)
  m = lerp_(m, g, c.beta1_lerp);
  v = fma_(c.one_minus_beta2 * g, g, v * c.beta2);  // addcmul: self + (value * t1) * t2
  V v_hat = v;
  if (amsgrad) {
    v_max = max_nan_(v_max, v);
    v_hat = v_max;
  }
  const V denom = sqrt_(v_hat) / c.bias_correction2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;  // addcdiv: self + (value * t1) / t2
}

}  // namespace optim_math
}  // namespace fastnn
