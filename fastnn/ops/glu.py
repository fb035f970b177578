"""GLU-family ops (out = act(gate) * up): schemas, fakes and autograd for all three backends."""

import torch

from fastnn import ops
from fastnn.reference import glu as ref

TRITON_MODULE = "fastnn.triton_kernels.glu"
FWD_SCHEMA = "(Tensor gate, Tensor up, str activation) -> Tensor"
BWD_SCHEMA = "(Tensor grad_out, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)"
PACKED_FWD_SCHEMA = "(Tensor gate_up, str activation) -> Tensor"
PACKED_BWD_SCHEMA = "(Tensor grad_out, Tensor gate_up, str activation) -> Tensor"


def _fake_fwd(gate, up, activation):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_bwd(grad_out, gate, up, activation):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _fake_packed_fwd(gate_up, activation):
    shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return gate_up.new_empty(shape)


def _fake_packed_bwd(grad_out, gate_up, activation):
    return gate_up.new_empty(gate_up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up)


def _make_backward(bwd):
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = bwd(grad_out, gate, up, ctx.activation)
        return grad_gate, grad_up, None

    return backward


def _setup_context_packed(ctx, inputs, output):
    gate_up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate_up)


def _make_backward_packed(bwd):
    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return bwd(grad_out, gate_up, ctx.activation), None

    return backward


ops.register_family("glu", "glu_fwd", TRITON_MODULE)
ops.define("glu_fwd", FWD_SCHEMA, ref.glu_fwd, TRITON_MODULE, _fake_fwd)
ops.define("glu_bwd", BWD_SCHEMA, ref.glu_bwd, TRITON_MODULE, _fake_bwd)
ops.define("glu_packed_fwd", PACKED_FWD_SCHEMA, ref.glu_packed_fwd, TRITON_MODULE, _fake_packed_fwd)
ops.define("glu_packed_bwd", PACKED_BWD_SCHEMA, ref.glu_packed_bwd, TRITON_MODULE, _fake_packed_bwd)
ops.define_autograd("glu_fwd", "glu_bwd", _setup_context, _make_backward, "glu")
ops.define_autograd(
    "glu_packed_fwd", "glu_packed_bwd", _setup_context_packed, _make_backward_packed, "glu"
)
