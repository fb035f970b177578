"""Reference LayerNorm forward and backward over the last dim of a 2-D input, optionally fused
with a residual add. Schemas: `fastnn::layer_norm_fwd` / `fastnn::layer_norm_bwd`."""

import torch

from fastnn.reference import compute_dtype, laid_out_like


def layer_norm_fwd(input, residual, weight, bias, eps):
    """input, residual: [rows, N]; weight, bias: [N] or None.

    Returns (out in input's dtype, residual_out, mean [rows], rstd [rows]); statistics are fp32
    (fp64 for fp64 input). residual_out is the rounded sum input + residual, or empty.
    """
    cdt = compute_dtype(input.dtype)
    x = input if residual is None else input + residual
    residual_out = x if residual is not None else input.new_empty(0)
    xc = x.to(cdt)
    mean = row_mean(xc)
    centered = xc - mean[:, None]
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(input.dtype), residual_out, mean, rstd


def row_mean(x):
    """The mean of each row of x [rows, N] as every backend takes it: a first estimate c, the
    row's first element plus the mean deviation from it, then c plus the mean deviation from c
    (c where that is not finite: an Inf past the first element keeps the mean Inf, not NaN).

    From the first element, a constant row's mean is its value exactly, and its output 0 as
    torch's (a rounded sum / N can be an ulp off, which the rstd of a zero-variance row,
    1 / sqrt(eps), magnifies: 0.9 for a row of -7.3 at eps = 1e-12). The second step removes
    that estimate's error when the first element is far from the mean: an ulp of the deviations
    from it (fp32 [8, 4096] N(0, 1) rows with x[:, 0] = 1e4, test_outlier_in_the_first_column:
    mean 4.2e-4 off relatively, 2.2e-7 after). Backends that take long rows in blocks (CPU
    chunks, Triton's looping tier) take their second centre from the first block: c + mean(x - c)
    over it, x[0] when not finite."""
    shift = x[:, :1] if x.shape[1] > 0 else x.new_zeros(x.shape[0], 1)
    first = shift + (x - shift).mean(-1, keepdim=True)
    second = first + (x - first).mean(-1, keepdim=True)
    return torch.where(second.isfinite(), second, first).squeeze(-1)


def layer_norm_bwd(grad_out, grad_residual_out, x, weight, bias, mean, rstd):
    """Returns (grad_input, grad_weight, grad_bias); the last two are empty when weight / bias
    are None. grad_input includes grad_residual_out when it is given."""
    cdt = compute_dtype(x.dtype)
    r = rstd.to(cdt)[:, None]
    xhat = (x.to(cdt) - mean.to(cdt)[:, None]) * r
    dy = grad_out.to(cdt)
    g = dy * weight.to(cdt) if weight is not None else dy
    dx = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual_out is not None:
        dx = dx + grad_residual_out.to(cdt)
    dw = (dy * xhat).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = dy.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return laid_out_like(dx.to(x.dtype), x), dw, db
