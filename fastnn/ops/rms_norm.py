"""RMSNorm ops: schemas, fakes and autograd for all three backends."""

import torch

from fastnn import ops
from fastnn.reference import compute_dtype
from fastnn.reference import rms_norm as ref

TRITON_MODULE = "fastnn.triton_kernels.rms_norm"
FWD_SCHEMA = (
    "(Tensor input, Tensor? residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? weight, Tensor rstd)"
    " -> (Tensor, Tensor)"
)


def _fake_fwd(input, residual, weight, eps):
    residual_out = torch.empty_like(input) if residual is not None else input.new_empty(0)
    rstd = input.new_empty(input.shape[0], dtype=compute_dtype(input.dtype))
    return torch.empty_like(input), residual_out, rstd


def _fake_bwd(grad_out, grad_residual_out, x, weight, rstd):
    grad_weight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    return torch.empty_like(x), grad_weight


def _setup_context(ctx, inputs, output):
    input, residual, weight, _ = inputs
    _, residual_out, rstd = output
    ctx.has_residual = residual is not None
    x = residual_out if ctx.has_residual else ops.saveable(input)
    ctx.save_for_backward(x, weight, rstd)


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_residual_out, _grad_rstd):
        if grad_out is None:  # only the residual sum fed the loss (eager calls)
            return grad_residual_out, grad_residual_out, None, None
        x, weight, rstd = ctx.saved_tensors
        grad_input, grad_weight = bwd(
            grad_out, grad_residual_out if ctx.has_residual else None, x, weight, rstd
        )
        grad_residual = grad_input if ctx.has_residual else None
        return grad_input, grad_residual, grad_weight if weight is not None else None, None

    return backward


def _stats_following_x(args):
    """The backward op's args with rstd a function of x (double backward; ops.define_autograd)."""
    grad_out, grad_residual_out, x, weight, rstd = args
    rstd = ops.rstd_following(rstd, x.to(rstd.dtype).square().mean(-1))
    return grad_out, grad_residual_out, x, weight, rstd


ops.register_family("rms_norm", "rms_norm_fwd", TRITON_MODULE)
ops.define("rms_norm_fwd", FWD_SCHEMA, ref.rms_norm_fwd, TRITON_MODULE, _fake_fwd)
ops.define("rms_norm_bwd", BWD_SCHEMA, ref.rms_norm_bwd, TRITON_MODULE, _fake_bwd)
ops.define_autograd(
    "rms_norm_fwd",
    "rms_norm_bwd",
    _setup_context,
    _make_backward,
    materialize_grads=False,
    stats=_stats_following_x,
)
