"""Reference GLU family: out = act(gate) * up, and its backward, which recomputes act(gate)
from the saved inputs. Schemas: `fastnn::glu_fwd`, `glu_bwd`, `glu_packed_fwd`, `glu_packed_bwd`."""

import math

import torch

from fastnn.reference import compute_dtype

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def activation_and_derivative(x, activation, derivative=True):
    """act(x) and act'(x), elementwise, in x's (floating) dtype; finite for any finite x.
    With derivative=False, act'(x) is not computed (None): the forward's cost, about half."""
    if activation == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s)) if derivative else None
    if activation == "sigmoid":
        s = torch.sigmoid(x)
        return s, s * (1 - s) if derivative else None
    if activation == "relu":
        dact = torch.where(x <= 0, 0.0, 1.0).to(x.dtype) if derivative else None
        return torch.relu(x), dact  # NaN: derivative 1, as torch
    if activation == "gelu":
        cdf = 0.5 * torch.special.erfc(-x * math.sqrt(0.5))  # 1 + erf(x) cancels for x < 0
        if not derivative:
            return x * cdf, None
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return x * cdf, cdf + x * pdf
    if activation == "gelu_tanh":
        # 0.5 (1 + tanh(y)) = sigmoid(2y) and 1 - tanh(y)^2 = 4 sigmoid(2y) sigmoid(-2y), as
        # the kernels compute them: 1 + tanh(y) cancels in the lower tail (to 0 below x = -7.2
        # in fp64). Past |x| = 22 sigmoid(2y) is exactly 0 or 1 even in fp64; the clamp keeps
        # x^3 finite there (and the derivative's limits at +-inf). NaN stays NaN.
        xc = x.clamp(-22, 22)
        y2 = 2 * _SQRT_2_OVER_PI * (xc + _GELU_TANH_CUBIC * xc * xc * xc)
        s = torch.sigmoid(y2)
        if not derivative:
            return x * s, None
        s_neg = torch.sigmoid(-y2)
        d_inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_CUBIC * xc * xc)
        return x * s, s + 2 * xc * s * s_neg * d_inner
    raise ValueError(
        f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
    )


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(t, name):
    if t.dtype not in _FLOATS:
        raise RuntimeError(
            f"fastnn: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
        )


def _check_pair(gate, up):
    _check_float(gate, "gate")
    _check_float(up, "up")
    if up.device != gate.device:
        raise RuntimeError(f"fastnn: up is on {up.device} but gate is on {gate.device}")
    if gate.shape != up.shape:
        raise RuntimeError(
            f"fastnn: gate of shape {list(gate.shape)} and up of shape {list(up.shape)} differ"
        )
    if gate.dtype != up.dtype:
        raise RuntimeError(f"fastnn: gate has dtype {gate.dtype} but up has {up.dtype}")


def _check_packed(gate_up):
    _check_float(gate_up, "gate_up")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2 != 0:
        raise RuntimeError(
            f"fastnn: packed gate_up of shape {list(gate_up.shape)} needs an even last dim "
            "holding [gate | up]"
        )


def _check_grad(grad_out, like, shape):
    _check_float(grad_out, "grad_out")
    if grad_out.device != like.device:
        raise RuntimeError(f"fastnn: grad_out is on {grad_out.device} but gate is on {like.device}")
    if tuple(grad_out.shape) != tuple(shape):
        raise RuntimeError(
            f"fastnn: grad_out of shape {list(grad_out.shape)} does not match the output shape "
            f"{list(shape)}"
        )


def glu_fwd(gate, up, activation):
    """gate, up: same shape and dtype. Returns act(gate) * up in that dtype."""
    _check_activation(activation)
    _check_pair(gate, up)
    cdt = compute_dtype(gate.dtype)
    act, _ = activation_and_derivative(gate.to(cdt), activation, derivative=False)
    return (act * up.to(cdt)).to(gate.dtype).contiguous()


def glu_bwd(grad_out, gate, up, activation):
    """Returns (grad_gate, grad_up) = (dh * up * act'(gate), dh * act(gate)), gate's dtype;
    grad_out may have any float dtype."""
    _check_activation(activation)
    _check_pair(gate, up)
    _check_grad(grad_out, gate, gate.shape)
    cdt = compute_dtype(gate.dtype)
    g, dh = gate.to(cdt), grad_out.to(cdt)
    act, dact = activation_and_derivative(g, activation)
    if activation == "relu":  # a select, as torch's relu backward (0 at g <= 0 even for u = NaN)
        dg = torch.where(g <= 0, 0.0, dh * up.to(cdt)).to(gate.dtype)
    else:
        dg = (dh * up.to(cdt) * dact).to(gate.dtype)
    return dg.contiguous(), (dh * act).to(up.dtype).contiguous()


def glu_packed_fwd(gate_up, activation):
    """gate_up: [..., 2H] holding [gate | up]. Returns [..., H]."""
    _check_packed(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return glu_fwd(gate, up, activation)


def glu_packed_bwd(grad_out, gate_up, activation):
    """Returns the gradient of gate_up, [..., 2H]."""
    _check_packed(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.cat(glu_bwd(grad_out, gate, up, activation), dim=-1)
