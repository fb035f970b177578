"""Drop-in modules. RMSNorm and LayerNorm subclass torch.nn.RMSNorm / torch.nn.LayerNorm: same
constructor, defaults, parameters, state_dict keys and repr; forward runs fastnn's kernels and
optionally fuses a residual add."""

import torch
from torch import nn

from fastnn import functional as F
from fastnn.reference.glu import ACTIVATIONS


class _NotScriptable:
    """torch.jit.script calls __prepare_scriptable__ on every module before compiling it: fail
    there with a message that names the module and the alternatives, instead of TorchScript's
    error from deep inside fastnn.functional (keyword-only arguments)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fastnn.{type(self).__name__} cannot be compiled by torch.jit.script (its kernels "
            "are torch.library custom ops called from Python); use torch.compile, torch.export "
            "or torch.jit.trace"
        )


class RMSNorm(_NotScriptable, nn.RMSNorm):
    """torch.nn.RMSNorm with fused kernels.

    forward(input) -> rms_norm(input); forward(input, residual=r) -> (rms_norm(input + r),
    input + r), the add fused into the same pass over memory. residual is keyword-only: a
    positional one would be dropped silently by hooks that pass on the first argument alone
    (torch's SequenceParallel).
    """

    def forward(self, x, *, residual=None):  # `x`, as torch.nn.RMSNorm.forward names it
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual=residual)


class LayerNorm(_NotScriptable, nn.LayerNorm):
    """torch.nn.LayerNorm with fused kernels; forward optionally takes `residual=` as RMSNorm."""

    def forward(self, input, *, residual=None):
        return F.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual
        )


class SwiGLU(_NotScriptable, nn.Module):
    """act(gate) * up with a fused kernel; act is silu by default (SwiGLU), or one of gelu,
    gelu_tanh (GeGLU), relu (ReGLU), sigmoid (GLU). forward(gate, up=None): with up=None the last
    dim of gate holds [gate | up]. inplace_backward=True: see fastnn.functional.glu_family."""

    def __init__(self, activation="silu", *, inplace_backward=False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
            )
        self.activation = activation
        self.inplace_backward = inplace_backward

    def forward(self, gate, up=None):
        return F.glu_family(gate, up, self.activation, inplace_backward=self.inplace_backward)

    def extra_repr(self):
        extra = ", inplace_backward=True" if self.inplace_backward else ""
        return f"activation={self.activation!r}{extra}"


class SwiGLUMLP(_NotScriptable, nn.Module):
    """The LLaMA MLP: down_proj(act(gate_proj(x)) * up_proj(x)), act = silu by default.

    x: [..., hidden_size] -> [..., hidden_size], any float dtype the Linear layers accept.

    fused_gate_up=True holds gate and up as one `gate_up_proj` Linear with weight
    [2 * intermediate_size, hidden_size] (rows [gate; up]): one matmul, and the packed kernel
    reads its [..., 2 * intermediate_size] output in place. Either way the state_dict has the
    usual LLaMA keys gate_proj.weight, up_proj.weight, down_proj.weight (and .bias with
    bias=True): a fused module's state_dict holds the two halves of the fused weight (views, as
    a state_dict shares parameter memory), and load_state_dict takes the separate keys and
    copies them into the halves. So checkpoints move freely between fused and unfused modules
    and to and from other LLaMA implementations; only named_parameters() differs, which is why
    torch.distributed.checkpoint's get_model_state_dict (it maps state_dict keys to parameters)
    refuses a fused module: use fused_gate_up=False with it. llama_state_dict=False keeps the
    fused module's own gate_up_proj.* keys instead, as Phi-3 / GLM-4 checkpoints name them.

    inplace_backward=True writes the GLU's gradients over the gate / up projections' outputs
    in the backward (they are dead by then): two [..., intermediate_size] tensors fewer at the
    backward's peak; eager mode only, and a second backward raises.
    """

    def __init__(
        self,
        hidden_size,
        intermediate_size,
        bias=False,
        device=None,
        dtype=None,
        *,
        fused_gate_up=False,
        activation="silu",
        inplace_backward=False,
        llama_state_dict=True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
            )
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.fused_gate_up = fused_gate_up
        self.activation = activation
        self.inplace_backward = inplace_backward
        self.llama_state_dict = llama_state_dict
        if fused_gate_up:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, **factory)
            # Initialised as two separate Linears: nn.Linear's bounds depend on fan_in
            # (hidden_size) only, so the [2I, H] weight draws from the same distribution.
            if llama_state_dict:
                self.register_state_dict_post_hook(_split_gate_up_state)
                self.register_load_state_dict_pre_hook(_merge_gate_up_state)
        else:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x):
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(x), None
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        h = F.glu_family(gate, up, self.activation, inplace_backward=self.inplace_backward)
        return self.down_proj(h)

    def extra_repr(self):
        extra = ", inplace_backward=True" if self.inplace_backward else ""
        if self.fused_gate_up and not self.llama_state_dict:
            extra += ", llama_state_dict=False"
        return f"fused_gate_up={self.fused_gate_up}, activation={self.activation!r}{extra}"


def _split_gate_up_state(module, state_dict, prefix, local_metadata):
    """state_dict post-hook of a fused SwiGLUMLP: gate_up_proj.* -> gate_proj.*, up_proj.*, in
    the unfused module's key order (gate, up, down: down_proj.* moves behind them). The halves
    are views of gate_up_proj's tensors, detached also under keep_vars=True (no Parameter holds
    a half; a view with a grad_fn would refuse copy.deepcopy, as state_dicts are copied)."""
    names = [n for n in ("weight", "bias") if f"{prefix}gate_up_proj.{n}" in state_dict]
    halves = {
        n: state_dict.pop(f"{prefix}gate_up_proj.{n}").detach().chunk(2, dim=0) for n in names
    }
    for i, linear in enumerate(("gate_proj", "up_proj")):
        for name in names:
            state_dict[f"{prefix}{linear}.{name}"] = halves[name][i]
    for name in ("weight", "bias"):
        key = f"{prefix}down_proj.{name}"
        if key in state_dict:
            state_dict[key] = state_dict.pop(key)


def _merge_gate_up_state(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """load_state_dict pre-hook of a fused SwiGLUMLP: gate_proj.* + up_proj.* -> gate_up_proj.*.
    A state_dict that already has gate_up_proj.* loads as is; one half alone is left in place,
    so strict loading reports it as unexpected and gate_up_proj.* as missing. Each half must
    have its unfused Linear's shape (rows 7 + 5 would fill a [12, H] weight, split wrong): a
    mismatch is reported as the unfused module reports it, and load_state_dict raises."""
    for name in ("weight", "bias"):
        gate_key, up_key = f"{prefix}gate_proj.{name}", f"{prefix}up_proj.{name}"
        fused = getattr(module.gate_up_proj, name)
        if gate_key in state_dict and up_key in state_dict and fused is not None:
            gate, up = state_dict.pop(gate_key), state_dict.pop(up_key)
            half = (fused.shape[0] // 2, *fused.shape[1:])
            wrong = [(k, t) for k, t in ((gate_key, gate), (up_key, up)) if t.shape != half]
            for key, t in wrong:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {t.shape} from "
                    f"checkpoint, the shape in current model is {torch.Size(half)}."
                )
            if not wrong:
                state_dict[f"{prefix}gate_up_proj.{name}"] = torch.cat([gate, up], dim=0)


__all__ = ["LayerNorm", "RMSNorm", "SwiGLU", "SwiGLUMLP"]
