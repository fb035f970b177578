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
    ctx.save_for_backward(ops.saveable(gate), ops.saveable(up))


def _make_backward(bwd):
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = bwd(grad_out, gate, up, ctx.activation)
        return grad_gate, grad_up, None

    return backward


def _setup_context_packed(ctx, inputs, output):
    gate_up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(ops.saveable(gate_up))


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
ops.define_autograd("glu_fwd", "glu_bwd", _setup_context, _make_backward)
ops.define_autograd(
    "glu_packed_fwd", "glu_packed_bwd", _setup_context_packed, _make_backward_packed
)


# ---- opt-in in-place backward (memory saving) ----------------------------------------------------
# glu_bwd_ / glu_packed_bwd_ write grad_gate / grad_up over the saved gate / up (or gate_up), so
# the backward allocates no new [.., H] tensors. Every backend has them (native: csrc/cpu/glu.cpp,
# csrc/cuda/glu.cu; triton: fastnn/triton_kernels/glu.py; torch: below).
INPLACE_BWD_SCHEMA = "(Tensor grad_out, Tensor(a!) gate, Tensor(b!) up, str activation) -> ()"
INPLACE_PACKED_BWD_SCHEMA = "(Tensor grad_out, Tensor(a!) gate_up, str activation) -> ()"


def _ref_bwd_(grad_out, gate, up, activation):
    # The reference computes out of place and copies: it defines the semantics, not the memory.
    grad_gate, grad_up = ref.glu_bwd(grad_out, gate, up, activation)
    gate.copy_(grad_gate)
    up.copy_(grad_up)


def _ref_packed_bwd_(grad_out, gate_up, activation):
    gate_up.copy_(ref.glu_packed_bwd(grad_out, gate_up, activation))


def _no_output(*args):
    return None


ops.define(
    "glu_bwd_",
    INPLACE_BWD_SCHEMA,
    _ref_bwd_,
    TRITON_MODULE,
    _no_output,
    mutates_args=("gate", "up"),
)
ops.define(
    "glu_packed_bwd_",
    INPLACE_PACKED_BWD_SCHEMA,
    _ref_packed_bwd_,
    TRITON_MODULE,
    _no_output,
    mutates_args=("gate_up",),
)


class InplaceBackwardGLU(torch.autograd.Function):
    """act(gate) * up whose backward writes grad_gate / grad_up over gate / up (up=None: packed
    gate_up) and returns them: no new gradient tensors, at the price of the inputs' values and of
    any second backward, which raises."""

    @staticmethod
    def forward(ctx, gate, up, activation, backend):
        if up is None:
            out = ops.get(backend, "glu_packed_fwd")(gate, activation)
            ctx.save_for_backward(gate)
        else:
            out = ops.get(backend, "glu_fwd")(gate, up, activation)
            ctx.save_for_backward(gate, up)
        ctx.activation, ctx.backend, ctx.consumed = activation, backend, False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError(
                "fastnn: this GLU was called with inplace_backward=True: its first backward "
                "wrote the gradients over gate and up, so it cannot run backward again; use "
                "inplace_backward=False to backward twice"
            )
        if torch.is_grad_enabled():  # its results are gate / up overwritten: no graph to record
            raise RuntimeError(
                "fastnn: a GLU called with inplace_backward=True has no double backward "
                "(create_graph=True): its backward writes the gradients over gate and up; use "
                "inplace_backward=False"
            )
        ctx.consumed = True
        saved = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if len(saved) == 1:
            (gate_up,) = saved
            ops.get(ctx.backend, "glu_packed_bwd_")(grad_out, gate_up, ctx.activation)
            return gate_up, None, None, None
        gate, up = saved
        ops.get(ctx.backend, "glu_bwd_")(grad_out, gate, up, ctx.activation)
        return gate, up, None, None
