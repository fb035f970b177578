"""Triton multi-tensor Adam / AdamW update (`fastnn::triton_adam_step_`).

The launch (one per dtype signature over a cached table of chunks, see multi_tensor.py) is shared
with RMSprop; this file holds Adam's kernel and its math. Math in fp32 (fp64 for fp64 params)
with IEEE sqrt and division (tl.sqrt_rn, tl.div_rn: no approximate instructions). grad_scale,
found_inf and lr_tensor are read on the device; with found_inf != 0 every load and store is
masked off, so nothing is written. Bias corrections come from the step tensors with torch ops on
the steps' own device (the host for plain optimizers, no sync; the GPU when capturable), as one
small [n, 2] tensor the kernel indexes per chunk.
"""

import torch
import triton
import triton.language as tl

from fastnn.reference.adam import adam_lists, check_scalars, count_steps_, device_found_inf
from fastnn.triton_kernels import multi_tensor as mt
from fastnn.triton_kernels.multi_tensor import (
    chunk_pointers,
    div_ieee,
    load_weight_grad,
    sqrt_ieee,
    step_scalars,
    store_weight,
)

# 64K elements per program: about 16K programs for 1e9 parameters, and a table of 1 MB. BLOCK
# elements per tile: 1024 fp32 over 4 warps is 8 per thread, two 16-byte accesses. RMSprop
# launches with these too (read at call time, so a test that shrinks them covers both ops).
CHUNK = 65536
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _adam_tile(
    offs, mask, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
    step_size, bias_correction2_sqrt, decay, scale,
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    P_T: tl.constexpr, G_T: tl.constexpr, M_T: tl.constexpr, V_T: tl.constexpr,
    VMAX_T: tl.constexpr, W_T: tl.constexpr, CDT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK elements: weights from the master copy when there is one."""
    w, g = load_weight_grad(
        offs, mask, p_ptr, g_ptr, w_ptr, scale, G_T, CDT, HAS_SCALE, HAS_MASTER, MAXIMIZE
    )
    m = tl.load(m_ptr + offs, mask=mask).to(CDT)
    v = tl.load(v_ptr + offs, mask=mask).to(CDT)
    if HAS_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = tl.fma(weight_decay, w, g)  # grad.add(param, alpha=weight_decay), rounded once
    # torch.optim.Adam's order: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)
    m = mt.lerp(m, g, one_minus_beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # rounded once, as torch's addcmul
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(CDT)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)  # NaN stays, as torch
        tl.store(vmax_ptr + offs, vmax.to(VMAX_T), mask=mask)
        denom = div_ieee(sqrt_ieee(vmax, CDT), bias_correction2_sqrt, CDT) + eps
    else:
        denom = div_ieee(sqrt_ieee(v, CDT), bias_correction2_sqrt, CDT) + eps
    w = tl.fma(-step_size, div_ieee(m, denom, CDT), w)  # addcdiv_ as torch's CUDA kernel: one fma
    tl.store(m_ptr + offs, m.to(M_T), mask=mask)
    tl.store(v_ptr + offs, v.to(V_T), mask=mask)
    store_weight(offs, mask, p_ptr, w_ptr, w, P_T, W_T, HAS_MASTER)


# One entry for both compute dtypes: the scalar hyperparameters arrive in fp64 and are rounded
# to CDT here, round-to-nearest as the launcher would round a Python float to an fp32 argument
# (an fp32 beta2 = 0.999 is off by 5e-8 relative, so fp64 params keep fp64 scalars).
@triton.jit
def _adam(
    table, lr_ptr, scale_ptr, inf_ptr, bias_corr,
    lr: tl.float64, beta1: tl.float64, one_minus_beta1: tl.float64, beta2: tl.float64,
    one_minus_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    P_T: tl.constexpr, G_T: tl.constexpr, M_T: tl.constexpr, V_T: tl.constexpr,
    VMAX_T: tl.constexpr, W_T: tl.constexpr, CDT: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    lr = tl.full((), lr, CDT)
    one_minus_beta1 = tl.full((), one_minus_beta1, CDT)
    beta2 = tl.full((), beta2, CDT)
    one_minus_beta2 = tl.full((), one_minus_beta2, CDT)
    eps = tl.full((), eps, CDT)
    weight_decay = tl.full((), weight_decay, CDT)
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, n, t = chunk_pointers(
        table, P_T, G_T, M_T, V_T, VMAX_T, W_T, ALIGNED
    )
    lr_v, scale, live = step_scalars(
        lr_ptr, scale_ptr, inf_ptr, lr, CDT, HAS_LR_PTR, HAS_SCALE, HAS_INF, BLOCK
    )
    bias_correction1 = tl.load(bias_corr + 2 * t).to(CDT)
    bias_correction2_sqrt = tl.load(bias_corr + 2 * t + 1).to(CDT)
    step_size = div_ieee(lr_v, bias_correction1, CDT)
    decay = 1.0 - lr_v * weight_decay
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _adam_tile(
            offs, live, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
            step_size, bias_correction2_sqrt, decay, scale,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            P_T, G_T, M_T, V_T, VMAX_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE,
        )  # fmt: skip
    if n_full < n:
        offs = n_full + tl.arange(0, BLOCK)
        _adam_tile(
            offs, live & (offs < n), p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
            step_size, bias_correction2_sqrt, decay, scale,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            P_T, G_T, M_T, V_T, VMAX_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE,
        )  # fmt: skip


def bias_corrections(steps, beta1, beta2, device, dtype):
    """[n, 2] tensor (1 - beta1^t, sqrt(1 - beta2^t)) per step tensor t, on `device`. Computed
    where the steps live: fp64 on the host, as torch.optim's for-loop does with Python floats;
    in the steps' dtype on the GPU, as its capturable path does."""
    s = torch.stack(steps if all(x.dim() == 0 for x in steps) else [x.reshape(()) for x in steps])
    if s.device.type == "cpu":
        s = s.double()
    bc = torch.stack([1 - torch.pow(beta1, s), (1 - torch.pow(beta2, s)).sqrt()], 1)
    return bc.to(device=device, dtype=dtype, non_blocking=True).contiguous()


def adam_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    master_params,
    lr_tensor,
    grad_scale,
    found_inf,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
):
    """In-place Adam / AdamW update of lists of same-device tensors (schema `adam_step_`).

    params, grads, exp_avgs, exp_avg_sqs: same shapes; fp32 / fp16 / bf16 / fp64 (states and grads
    may be fp32 for low-precision params). max_exp_avg_sqs: when amsgrad, else []. steps: 0-d step
    counts, incremented here first. master_params: fp32 copies of the params (or [])."""
    adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad)
    check_scalars("adam_step_", lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    skip, found_inf = device_found_inf(found_inf)
    plan = mt.check_lists(
        "adam_step_",
        params,
        grads,
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("max_exp_avg_sqs", max_exp_avg_sqs if amsgrad else []),
        ("master_params", master_params),
    )
    if skip:
        return  # a CPU found_inf != 0: nothing is written, the step counts included
    count_steps_(steps, found_inf)
    if plan is None:
        return
    vmaxs = max_exp_avg_sqs if amsgrad else []
    cdt, device, live = plan
    bc = bias_corrections([steps[i] for i in live], beta1, beta2, device, cdt)
    # Tensors in kernel order; None where absent. The kernel reads the master copy (when
    # given) as the weights and writes both it and the low-precision param.
    mt.launch(
        _adam,
        plan,
        [params, grads, exp_avgs, exp_avg_sqs, vmaxs, master_params],
        [True, grad_scale is not None, True, True, True, True],  # grads: written unscaled
        lr_tensor,
        grad_scale,
        found_inf,
        (
            bc,
            float(lr),
            float(beta1),
            1.0 - float(beta1),
            float(beta2),
            1.0 - float(beta2),
            float(eps),
            float(weight_decay),
        ),
        ("P_T", "G_T", "M_T", "V_T", "VMAX_T", "W_T"),
        dict(
            HAS_WD=weight_decay != 0,
            DECOUPLED=bool(decoupled_weight_decay),
            AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
        ),
        CHUNK,
        BLOCK,
        NUM_WARPS,
    )
