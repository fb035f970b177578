"""Reference RMSNorm forward and backward over the last dim of a 2-D input, optionally fused with
a residual add. Schemas: `fastnn::rms_norm_fwd` / `fastnn::rms_norm_bwd` (csrc/library.cpp)."""

import torch

from fastnn.reference import compute_dtype, laid_out_like


def rms_norm_fwd(input, residual, weight, eps):
    """input, residual: [rows, N]; weight: [N] or None.

    Returns (out [rows, N] in input's dtype, residual_out, rstd [rows] fp32 (fp64 for fp64)).
    With a residual, the sum s = input + residual is rounded to input's dtype (as an unfused
    `x + r` would be), returned as residual_out and normalised; without one residual_out is empty.
    """
    cdt = compute_dtype(input.dtype)
    x = input if residual is None else input + residual
    residual_out = x if residual is not None else input.new_empty(0)
    xc = x.to(cdt)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cdt)
    return y.to(input.dtype), residual_out, rstd


def rms_norm_bwd(grad_out, grad_residual_out, x, weight, rstd):
    """x: the normalised tensor (the fused sum when a residual was added), [rows, N].

    Returns (grad_input in x's dtype, grad_weight in weight's dtype, empty without weight).
    grad_input includes grad_residual_out, the gradient that flowed into residual_out.
    """
    cdt = compute_dtype(x.dtype)
    xhat = x.to(cdt) * rstd.to(cdt)[:, None]
    dy = grad_out.to(cdt)
    g = dy * weight.to(cdt) if weight is not None else dy
    dx = rstd.to(cdt)[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual_out is not None:
        dx = dx + grad_residual_out.to(cdt)
    if weight is not None:
        dw = (dy * xhat).sum(0).to(weight.dtype)
    else:
        dw = x.new_empty(0)
    return laid_out_like(dx.to(x.dtype), x), dw
