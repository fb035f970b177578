"""Triton multi-tensor RMSprop update (`fastnn::triton_rmsprop_step_`).

The same multi-tensor launch as Adam (fastnn/triton_kernels/multi_tensor.py): one launch per
(device, dtype signature) over a cached table of 64K-element chunks, fp32 math (fp64 for fp64
params), IEEE sqrt and division, grad_scale / found_inf / lr_tensor read on the device, nothing
written when found_inf != 0. This file holds RMSprop's kernel and its math.
"""

import triton
import triton.language as tl

from fastnn.reference.adam import check_scalars, count_steps_, device_found_inf
from fastnn.reference.rmsprop import rmsprop_lists
from fastnn.triton_kernels import adam
from fastnn.triton_kernels import multi_tensor as mt
from fastnn.triton_kernels.multi_tensor import (
    chunk_pointers,
    div_ieee,
    load_weight_grad,
    sqrt_ieee,
    step_scalars,
    store_weight,
)


@triton.jit
def _rmsprop_tile(
    offs, mask, p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, w_ptr,
    lr, scale, alpha, one_minus_alpha, eps, weight_decay, momentum,
    P_T: tl.constexpr, G_T: tl.constexpr, SQ_T: tl.constexpr, GA_T: tl.constexpr,
    BUF_T: tl.constexpr, W_T: tl.constexpr, CDT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr,
    CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK elements, in torch.optim.RMSprop's for-loop order."""
    w, g = load_weight_grad(
        offs, mask, p_ptr, g_ptr, w_ptr, scale, G_T, CDT, HAS_SCALE, HAS_MASTER, MAXIMIZE
    )
    sq = tl.load(sq_ptr + offs, mask=mask).to(CDT)
    if HAS_WD:
        g = tl.fma(weight_decay, w, g)  # grad.add(param, alpha=weight_decay), rounded once
    sq = tl.fma(one_minus_alpha * g, g, sq * alpha)  # sq.mul_(alpha).addcmul_(g, g, 1 - alpha)
    tl.store(sq_ptr + offs, sq.to(SQ_T), mask=mask)
    if CENTERED:
        ga = tl.load(ga_ptr + offs, mask=mask).to(CDT)
        ga = mt.lerp(ga, g, one_minus_alpha)  # grad_avg.lerp_(g, 1 - alpha)
        tl.store(ga_ptr + offs, ga.to(GA_T), mask=mask)
        avg = sqrt_ieee(tl.fma(-ga, ga, sq), CDT) + eps  # sq - ga * ga rounded once (addcmul)
    else:
        avg = sqrt_ieee(sq, CDT) + eps
    if HAS_MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask).to(CDT)
        # buf.mul_(momentum).addcdiv_(g, avg): the product rounded on its own (launch():
        # no contraction)
        buf = buf * momentum + div_ieee(g, avg, CDT)
        tl.store(buf_ptr + offs, buf.to(BUF_T), mask=mask)
        w = tl.fma(-lr, buf, w)  # param.add_(buf, alpha=-lr)
    else:
        w = tl.fma(-lr, div_ieee(g, avg, CDT), w)  # addcdiv(g, avg, value=-lr): torch's CUDA fma
    store_weight(offs, mask, p_ptr, w_ptr, w, P_T, W_T, HAS_MASTER)


# One entry for both compute dtypes, as for Adam: fp64 scalars rounded to CDT here.
@triton.jit
def _rmsprop(
    table, lr_ptr, scale_ptr, inf_ptr,
    lr: tl.float64, alpha: tl.float64, one_minus_alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64, momentum: tl.float64,
    P_T: tl.constexpr, G_T: tl.constexpr, SQ_T: tl.constexpr, GA_T: tl.constexpr,
    BUF_T: tl.constexpr, W_T: tl.constexpr, CDT: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr, CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    lr = tl.full((), lr, CDT)
    alpha = tl.full((), alpha, CDT)
    one_minus_alpha = tl.full((), one_minus_alpha, CDT)
    eps = tl.full((), eps, CDT)
    weight_decay = tl.full((), weight_decay, CDT)
    momentum = tl.full((), momentum, CDT)
    p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, w_ptr, n, _ = chunk_pointers(
        table, P_T, G_T, SQ_T, GA_T, BUF_T, W_T, ALIGNED
    )
    lr_v, scale, live = step_scalars(
        lr_ptr, scale_ptr, inf_ptr, lr, CDT, HAS_LR_PTR, HAS_SCALE, HAS_INF, BLOCK
    )
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _rmsprop_tile(
            offs, live, p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, w_ptr,
            lr_v, scale, alpha, one_minus_alpha, eps, weight_decay, momentum,
            P_T, G_T, SQ_T, GA_T, BUF_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, CENTERED, HAS_MOMENTUM, MAXIMIZE,
        )  # fmt: skip
    if n_full < n:
        offs = n_full + tl.arange(0, BLOCK)
        _rmsprop_tile(
            offs, live & (offs < n), p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, w_ptr,
            lr_v, scale, alpha, one_minus_alpha, eps, weight_decay, momentum,
            P_T, G_T, SQ_T, GA_T, BUF_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, CENTERED, HAS_MOMENTUM, MAXIMIZE,
        )  # fmt: skip


def rmsprop_step_(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    steps,
    master_params,
    lr_tensor,
    grad_scale,
    found_inf,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    """In-place RMSprop update of lists of same-device tensors (schema `rmsprop_step_`).

    params, grads, square_avgs: same shapes; fp32 / fp16 / bf16 / fp64 (states and grads may
    be fp32 for low-precision params). grad_avgs: when centered, else []. momentum_buffers: when
    momentum > 0, else []. steps: 0-d step counts, incremented here (torch's state["step"]).
    master_params: fp32 copies of the params (or [])."""
    has_momentum = momentum > 0
    rmsprop_lists(
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps, master_params, centered,
        has_momentum,
    )  # fmt: skip
    check_scalars("rmsprop_step_", lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    skip, found_inf = device_found_inf(found_inf)
    gas = grad_avgs if centered else []
    bufs = momentum_buffers if has_momentum else []
    plan = mt.check_lists(
        "rmsprop_step_",
        params,
        grads,
        ("square_avgs", square_avgs),
        ("grad_avgs", gas),
        ("momentum_buffers", bufs),
        ("master_params", master_params),
    )
    if skip:
        return  # a CPU found_inf != 0: nothing is written, the step counts included
    count_steps_(steps, found_inf)
    if plan is None:
        return
    mt.launch(
        _rmsprop,
        plan,
        [params, grads, square_avgs, gas, bufs, master_params],
        [True, grad_scale is not None, True, True, True, True],  # grads: written unscaled
        lr_tensor,
        grad_scale,
        found_inf,
        (
            float(lr),
            float(alpha),
            1.0 - float(alpha),
            float(eps),
            float(weight_decay),
            float(momentum),
        ),
        ("P_T", "G_T", "SQ_T", "GA_T", "BUF_T", "W_T"),
        dict(
            HAS_WD=weight_decay != 0,
            CENTERED=bool(centered),
            HAS_MOMENTUM=has_momentum,
            MAXIMIZE=bool(maximize),
        ),
        # Adam's chunk and tile sizes, read at call time (tests shrink them there for both).
        adam.CHUNK,
        adam.BLOCK,
        adam.NUM_WARPS,
    )
