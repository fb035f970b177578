// Per-element math of the RMSprop update, shared by the CPU (csrc/cpu/rmsprop.cpp) and CUDA
// (csrc/cuda/rmsprop.cu) kernels. Same conventions as adam_math.h (whose helpers it uses):
// torch.optim.RMSprop's for-loop order of operations, coefficients rounded once from double,
// math type M (float, double for fp64), V = M or a host vector of M.
#pragma once

#include "fastnn/adam_math.h"

namespace fastnn {
namespace optim_math {

// Per-call hyperparameters, as passed to the op.
struct RmspropHyper {
  double alpha, eps, weight_decay, momentum;
  bool maximize;
};

template <typename M>
struct RmspropCoeffs {
  GradUnscale<M> grad;          // g / d, d = grad_scale (1 without one), negated for maximize
  M weight_decay;               // L2 term: g + wd * p
  M alpha, one_minus_alpha;     // square_avg * alpha + (1 - alpha) * g * g
  LerpWeight<M> grad_avg_lerp;  // grad_avg.lerp_(grad, 1 - alpha)
  M eps;
  M momentum;
  M neg_lr;
};

template <typename M>
FASTNN_OPT_HD RmspropCoeffs<M> rmsprop_coeffs(const RmspropHyper& h, double lr, double grad_scale) {
  RmspropCoeffs<M> c;
  c.grad = grad_unscale<M>(grad_scale, h.maximize);
  c.weight_decay = static_cast<M>(h.weight_decay);
  c.alpha = static_cast<M>(h.alpha);
  c.one_minus_alpha = static_cast<M>(1.0 - h.alpha);
  c.grad_avg_lerp = lerp_weight<M>(1.0 - h.alpha);
  c.eps = static_cast<M>(h.eps);
  c.momentum = static_cast<M>(h.momentum);
  c.neg_lr = static_cast<M>(-lr);
  return c;
}

// One RMSprop step on one element (or host vector). p holds the weights (fp32 master copy when
// there is one), g the raw gradient, left unscaled (see unscale_); sq, grad_avg, buf the state.
// Flags: l2 = weight_decay != 0, centered (grad_avg read and written), momentum = momentum > 0
// (buf read and written).
template <typename V, typename M>
FASTNN_OPT_HD void rmsprop_update(V& p, V& grad, V& sq, V& grad_avg, V& buf,
                                  const RmspropCoeffs<M>& c, bool l2, bool centered,
                                  bool momentum) {
  V g = unscale_(grad, c.grad);
  if (l2) g = add_scaled(g, c.weight_decay, p);       // grad.add(param, alpha=weight_decay)
  sq = fma_(c.one_minus_alpha * g, g, sq * c.alpha);  // addcmul: self + (value * t1) * t2
  V avg;
  if (centered) {
    grad_avg = lerp_(grad_avg, g, c.grad_avg_lerp);
    avg = sqrt_(fma_(-grad_avg, grad_avg, sq)) + c.eps;  // addcmul(ga, ga, value=-1), sqrt, +eps
  } else {
    avg = sqrt_(sq) + c.eps;
  }
  if (momentum) {
    buf = mul_(buf, c.momentum) + g / avg;  // mul_(momentum), addcdiv with value 1
    p = add_scaled(p, c.neg_lr, buf);       // add_(buf, alpha=-lr)
  } else {
    p = p + c.neg_lr * g / avg;  // addcdiv(g, avg, value=-lr)
  }
}

}  // namespace optim_math
}  // namespace fastnn
