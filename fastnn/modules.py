"""Drop-in modules. RMSNorm and LayerNorm subclass torch.nn.RMSNorm / torch.nn.LayerNorm: same
constructor, defaults, parameters, state_dict keys and repr; forward runs fastnn's kernels and
optionally fuses a residual add."""

from torch import nn

from fastnn import functional as F
from fastnn.reference.glu import ACTIVATIONS


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm with fused kernels.

    forward(input) -> rms_norm(input); forward(input, residual) -> (rms_norm(input + residual),
    input + residual), the add fused into the same pass over memory.
    """

    def forward(self, input, residual=None):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm with fused kernels; forward optionally takes `residual` as RMSNorm."""

    def forward(self, input, residual=None):
        return F.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual
        )


class SwiGLU(nn.Module):
    """act(gate) * up with a fused kernel; act is silu by default (SwiGLU), or one of gelu,
    gelu_tanh (GeGLU), relu (ReGLU), sigmoid (GLU). forward(gate, up=None): with up=None the last
    dim of gate holds [gate | up]."""

    def __init__(self, activation="silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
            )
        self.activation = activation

    def forward(self, gate, up=None):
        return F.glu_family(gate, up, self.activation)

    def extra_repr(self):
        return f"activation={self.activation!r}"


class SwiGLUMLP(nn.Module):
    """The LLaMA MLP: down_proj(silu(gate_proj(x)) * up_proj(x)).

    x: [..., hidden_size] -> [..., hidden_size]; state_dict keys gate_proj.weight,
    up_proj.weight, down_proj.weight (and .bias with bias=True), as the usual LLaMA MLP.
    """

    def __init__(self, hidden_size, intermediate_size, bias=False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x):
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


__all__ = ["LayerNorm", "RMSNorm", "SwiGLU", "SwiGLUMLP"]
