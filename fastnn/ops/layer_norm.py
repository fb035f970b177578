"""LayerNorm ops: schemas, fakes and autograd for all three backends."""

import torch

from fastnn import ops
from fastnn.reference import compute_dtype
from fastnn.reference import layer_norm as ref

TRITON_MODULE = "fastnn.triton_kernels.layer_norm"
FWD_SCHEMA = (
    "(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight, Tensor? bias,"
    " Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
)


def _fake_fwd(input, residual, weight, bias, eps):
    residual_out = torch.empty_like(input) if residual is not None else input.new_empty(0)
    stat_dtype = compute_dtype(input.dtype)
    mean = input.new_empty(input.shape[0], dtype=stat_dtype)
    rstd = input.new_empty(input.shape[0], dtype=stat_dtype)
    return torch.empty_like(input), residual_out, mean, rstd


def _fake_bwd(grad_out, grad_residual_out, x, weight, bias, mean, rstd):
    grad_weight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    input, residual, weight, bias, _ = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    x = residual_out if ctx.has_residual else ops.saveable(input)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        if grad_out is None:  # only the residual sum fed the loss (eager calls)
            return grad_residual_out, grad_residual_out, None, None, None
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = bwd(
            grad_out, grad_residual_out if ctx.has_residual else None, x, weight, bias, mean, rstd
        )
        return (
            grad_input,
            grad_input if ctx.has_residual else None,
            grad_weight if weight is not None else None,
            grad_bias if bias is not None else None,
            None,
        )

    return backward


def _stats_following_x(args):
    """The backward op's args with mean and rstd functions of x (double backward;
    ops.define_autograd)."""
    grad_out, grad_residual_out, x, weight, bias, mean, rstd = args
    xc = x.to(rstd.dtype)
    row_mean = xc.mean(-1)
    mean = mean.detach() + (row_mean - row_mean.detach())
    rstd = ops.rstd_following(rstd, (xc - mean[:, None]).square().mean(-1))
    return grad_out, grad_residual_out, x, weight, bias, mean, rstd


ops.register_family("layer_norm", "layer_norm_fwd", TRITON_MODULE)
ops.define("layer_norm_fwd", FWD_SCHEMA, ref.layer_norm_fwd, TRITON_MODULE, _fake_fwd)
ops.define("layer_norm_bwd", BWD_SCHEMA, ref.layer_norm_bwd, TRITON_MODULE, _fake_bwd)
ops.define_autograd(
    "layer_norm_fwd",
    "layer_norm_bwd",
    _setup_context,
    _make_backward,
    materialize_grads=False,
    stats=_stats_following_x,
)
