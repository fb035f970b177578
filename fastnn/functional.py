"""Functional API with torch's signatures: `rms_norm` (F.rms_norm), `layer_norm` (F.layer_norm),
plus `swiglu` / `glu_family`. Arguments are checked here with errors that name the problem; the
input is flattened to [rows, N] and the op of the selected backend runs (under a torch.func
transform or forward-mode AD, the reference formula as plain torch ops: _under_transform).
"""

import math
import numbers

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic
from torch.torch_version import TorchVersion

from fastnn import _backend, _dtensor, ops
from fastnn.reference import glu as reference_glu
from fastnn.reference import layer_norm as reference_layer_norm
from fastnn.reference import rms_norm as reference_rms_norm
from fastnn.reference.glu import ACTIVATIONS

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(t, name, error=RuntimeError):
    """An input of another dtype raises NotImplementedError (a RuntimeError), as torch's kernels
    do for integer input; a parameter, RuntimeError."""
    if t.dtype not in _FLOAT_DTYPES:
        raise error(f"fastnn: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _integer_tensor(t):
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())


def _check_same_device(t, name, ref, ref_name="input"):
    if t.device != ref.device:
        raise RuntimeError(
            f"fastnn: {name} is on {t.device} but {ref_name} is on {ref.device}; "
            "move them to one device"
        )


def _is_int(n):
    # SymInt: a dynamic size under torch.compile. bool is an Integral, but torch refuses it.
    # (type() first: an ABC isinstance costs ~0.3 us, paid per dim on every call)
    return type(n) is int or (
        isinstance(n, (numbers.Integral, torch.SymInt)) and not isinstance(n, bool)
    )


def _is_int_tensor(n):
    # torch's int-list arguments take one-element integer tensors as elements (not bool).
    return (
        isinstance(n, torch.Tensor)
        and n.numel() == 1
        and not (n.is_floating_point() or n.is_complex() or n.dtype == torch.bool)
    )


def _normalized_shape(normalized_shape):
    # (the modules' own tuple of ints first: 0.2 us, where the general path takes 1.0)
    if type(normalized_shape) is tuple and all(type(n) is int for n in normalized_shape):
        return normalized_shape
    if not isinstance(normalized_shape, (tuple, list, torch.Size)) or not all(
        _is_int(n) or _is_int_tensor(n) for n in normalized_shape
    ):
        if isinstance(normalized_shape, (tuple, list)) and any(
            isinstance(n, torch.Tensor) and n.numel() == 1 and n.dtype == torch.bool
            for n in normalized_shape
        ):
            # torch's argument parser takes a one-element bool tensor as an element, then
            # refuses its value: a RuntimeError, not the TypeError of other wrong elements
            raise RuntimeError(
                f"fastnn: normalized_shape holds a bool tensor, not an integer: {normalized_shape!r}"
            )
        raise TypeError(
            f"fastnn: normalized_shape must be a tuple of ints, got {normalized_shape!r} (as "
            "torch's F.rms_norm / F.layer_norm, a bare int is refused: the modules take one)"
        )
    return tuple(_size(n) for n in normalized_shape)


def _size(n):
    # A SymInt stays one: int() of it outside Dynamo (non-strict torch.export) fixes the dim to
    # the traced value, refusing a dynamic hidden size.
    return n if isinstance(n, torch.SymInt) else int(n)


def _check_norm_args(op, input, normalized_shape, residual, params, eps):
    """Checks argument types, shapes, dtypes and devices with torch's error types for `op`
    (TypeError for a wrong Python type, as torch's argument parser); returns
    (normalized_shape tuple, N)."""
    for name, t in [("input", input), ("residual", residual), *params]:
        if not (isinstance(t, torch.Tensor) or (t is None and name != "input")):
            raise TypeError(f"fastnn: {name} must be a Tensor, got {type(t).__name__}")
    # torch's argument parser takes a 0-dim tensor that needs no grad for a float, and None for
    # rms_norm's eps only.
    scalar_tensor = isinstance(eps, torch.Tensor) and eps.dim() == 0 and not eps.requires_grad
    if not (
        type(eps) is float
        or (eps is None and op == "rms_norm")
        or scalar_tensor
        or isinstance(eps, (numbers.Real, torch.SymFloat))
    ):
        raise TypeError(f"fastnn: {op}: eps must be a float, got {type(eps).__name__}")
    shape = _normalized_shape(normalized_shape)
    for name, t in (("input", input), ("residual", residual)):
        if _is_nested(t) and t.layout != torch.jagged:
            raise RuntimeError(
                f"fastnn: {name} is a strided nested tensor; the norms take jagged ones "
                "(torch.nested.nested_tensor(..., layout=torch.jagged))"
            )
    _check_float(input, "input", NotImplementedError)
    if len(shape) == 0:
        raise RuntimeError("fastnn: normalized_shape must have at least one dim, got []")
    if input.dim() < len(shape):
        # torch's rms_norm raises ValueError here, its layer_norm RuntimeError.
        raise (ValueError if op == "rms_norm" else RuntimeError)(
            f"fastnn: input of shape {list(input.shape)} has fewer dims than normalized_shape "
            f"{list(shape)}"
        )
    # Under torch.jit.trace the sizes are traced values: comparing them warns (TracerWarning)
    # and records nothing, so the trace-time call leaves its shapes to the op's own checks.
    sizes = not torch.jit.is_tracing()
    if sizes and tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"fastnn: input of shape {list(input.shape)} does not end with normalized_shape "
            f"{list(shape)}"
        )
    for name, p in params:
        if p is None:
            continue
        if sizes and tuple(p.shape) != shape:
            raise RuntimeError(
                f"fastnn: {name} of shape {list(p.shape)} does not match normalized_shape "
                f"{list(shape)}"
            )
        _check_float(p, name)
        _check_same_device(p, name, input)
    if residual is not None:
        if sizes and residual.shape != input.shape:
            hint = ""
            if _dtensor.is_dtensor(input) and not _dtensor.is_dtensor(residual):
                hint = (
                    "; input is a DTensor: pass the residual as a DTensor too (behind "
                    "SequenceParallel, by keyword: its hook converts the first argument alone)"
                )
            raise RuntimeError(
                f"fastnn: residual of shape {list(residual.shape)} does not match input of "
                f"shape {list(input.shape)}{hint}"
            )
        _check_float(residual, "residual")
        _check_same_device(residual, "residual", input)
    return shape, math.prod(shape)


_REFERENCE_FORWARDS = {
    "rms_norm_fwd": reference_rms_norm.rms_norm_fwd,
    "layer_norm_fwd": reference_layer_norm.layer_norm_fwd,
    "glu_fwd": reference_glu.glu_fwd,
    "glu_packed_fwd": reference_glu.glu_packed_fwd,
}


def _under_transform():
    """True under a torch.func transform (grad, vjp, vmap, jacrev, jvp, hessian, ...) or
    forward-mode AD, eager or compiled (Dynamo traces a transform with it active).

    The ops' autograd (torch.library.custom_op's, torch 2.14) refuses the functorch transforms,
    and forward-mode AD passes through it without a tangent (a jvp came back zero, silently,
    compiled too), so there the reference formulas run as plain torch ops instead, which torch
    differentiates under every transform, to any order.
    """
    return (
        torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0
    )


def _forward(backend, name):
    """The forward op `name` of `backend`: in eager mode ops.eager's autograd.Function (less
    host time per call), traced or compiled the registered op, under a transform its reference
    formula."""
    if _under_transform():
        return _REFERENCE_FORWARDS[name]
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return ops.get(backend, name)
    return ops.eager(backend, name)


def _rows(t, shape):
    """[..., *normalized_shape] -> [rows, N], contiguous: the kernels read it so (they would copy
    it themselves), and the result is then contiguous too, as torch's norms return it. Flattened
    by dims, not reshaped to counted sizes: torch.jit.trace records dims as they are and sizes as
    constants (a traced norm reshaped any input to its traced row count); rows stay counted when
    N is 0."""
    if t is None:
        return None
    lead = t.dim() - len(shape)
    rows = t.unsqueeze(0) if lead == 0 else t.flatten(0, lead - 1)
    return rows.flatten(1).contiguous()


class _RowsPair(torch.autograd.Function):
    """input and residual -> their [rows, N] reshapes, for the fused residual norms.

    The op hands input and residual one gradient tensor, as torch's add does, and autograd,
    given one tensor for two inputs, copies before any leaf keeps it while the other still
    holds it. Behind two separate reshapes each input got a view of its own instead: two leaves
    (or leaves behind pass-through ops such as add) kept .grad tensors sharing memory, which an
    in-place clip_grad_norm_ or unscale_ then scaled twice. Here the backward hands both one
    view of the one gradient, the same tensor twice, so leaves end as after `input + residual`;
    activations (the usual input and residual stream) are never copied. (As with torch's add,
    views of leaves taken by the caller still share one; under torch.compile, leaves passed in
    directly may too: AOTAutograd hands each its own view.)"""

    @staticmethod
    def forward(ctx, input, residual, normalized_shape):
        ctx.shape = input.shape
        return _rows(input, normalized_shape), _rows(residual, normalized_shape)

    @staticmethod
    def backward(ctx, grad_input, grad_residual):
        if grad_input is grad_residual:
            both = grad_input.reshape(ctx.shape)
            return both, both, None
        reshape = [None if g is None else g.reshape(ctx.shape) for g in (grad_input, grad_residual)]
        return *reshape, None


def _rows_pair(input, residual, shape):
    """(_rows(input), _rows(residual)) for the fused residual norms (see _RowsPair)."""
    # torch.func transforms plain reshapes; with grad mode off there are no gradients to route
    # (torch.jit.trace's check traces without grad mode: one graph for both)
    no_grad = not torch.is_grad_enabled() and not torch.jit.is_tracing()
    if residual is None or _under_transform() or no_grad:
        return _rows(input, shape), _rows(residual, shape)
    if residual is input:  # norm(x + x): one tensor, whose two gradients autograd sums (and
        rows = _rows(input, shape)  # Dynamo refuses an autograd.Function given a tensor twice)
        return rows, rows
    return _RowsPair.apply(input, residual, shape)


# torch put rms_norm on CUDA autocast's fp32 list in 2.12; torch 2.11's autocast leaves it alone
# (measured on an H100: bf16 input, fp32 weight, bf16 out, as without autocast).
_AUTOCAST_FP32 = ("layer_norm",) + (
    ("rms_norm",) if TorchVersion(torch.__version__) >= (2, 12) else ()
)


def _autocast_to_fp32(op, input):
    """True inside torch.autocast on CUDA where torch runs `op` in fp32 (its autocast fp32 list:
    fp32 results from fp16 / bf16 inputs); the norms here do the same. torch does not autocast
    them on the CPU."""
    return op in _AUTOCAST_FP32 and input.is_cuda and torch.is_autocast_enabled("cuda")


def _fp32(t):
    """fp16 / bf16 / fp32 -> fp32; fp64 and None unchanged (torch's autocast leaves fp64 alone)."""
    return t if t is None or t.dtype == torch.float64 else t.float()


def _unflatten(out, shape, residual_out, input, residual):
    """The op's [rows, N] results in the input's shape: out, or (out, residual_out) when a
    residual was fused (input + residual: it requires grad only when one of them does, as the
    unfused sum does; the op's outputs all require grad when weight or bias does).
    aten._unsafe_view, not view: the results are new tensors, not views (torch's norms return
    none), so detach_() and in-place updates under no_grad work on them.
    When it requires grad, residual_out is the tensor the backward saves, or a view of it: an
    _unsafe_view has a version counter of its own, so an in-place change of it went unseen and
    the backward used the changed values (silently wrong gradients; torch raises for the unfused
    x + r, as now); otherwise nothing is saved, and it is a new tensor too.
    Under torch.jit.trace a view: the tracer records the sizes given to a torch.ops call as
    constants (a traced norm returned its traced shape), a view's as the sizes they were read
    from; `shape` must be read before the input is flattened (a flatten or contiguous that
    changes nothing returns the input itself, whose sizes the tracer then reads off the result)."""
    tracing = torch.jit.is_tracing()
    saved = residual is not None and (tracing or residual_out.requires_grad)
    if saved and not tracing and not (input.requires_grad or residual.requires_grad):
        # detach shares the version counter: an in-place change still fails the backward.
        # (Not traced: a trace keeps it for every later call, whatever needs grad then.)
        residual_out = residual_out.detach()
    if not tracing and out.shape == shape:  # a 2-D input's results are in its shape (3.3 us)
        return out if residual is None else (out, residual_out)

    def unflatten(t):
        return t.view(shape) if tracing else torch.ops.aten._unsafe_view(t, shape)

    if residual is None:
        return unflatten(out)
    # (one graph for torch.jit.trace, whose check traces without grad mode)
    return unflatten(out), residual_out.view(shape) if saved else unflatten(residual_out)


def _promoted(input, residual):
    """input and residual in one dtype, as input + residual computes: an fp32 residual stream
    with a bf16 branch output (torch.autocast) sums in fp32, and so does the fused norm."""
    if residual is None or residual.dtype == input.dtype:
        return input, residual
    dtype = torch.promote_types(input.dtype, residual.dtype)
    return input.to(dtype), residual.to(dtype)


def _vector(t, n):
    """normalized_shape -> [N] (a 1-D parameter as it is: no view for autograd to track)."""
    return t if t is None or t.dim() == 1 else t.reshape(n)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None):
    """RMSNorm over the trailing `normalized_shape` dims, as torch.nn.functional.rms_norm.

    input: [..., *normalized_shape], fp32 / fp16 / bf16 / fp64; weight: normalized_shape or None
    (an integer or bool weight acts as fp32, fp64 for fp64 input: torch multiplies by it).
    eps=None uses torch.finfo of the compute dtype (fp32, or fp64 for fp64 input), as torch does.
    The result has input's dtype. With `residual` (input's shape) returns
    (rms_norm(input + residual), input + residual), the add fused into the kernel; input and
    residual of two dtypes are both taken in the promoted one first, as input + residual is.
    """
    # (not a nested tensor's: its __torch_function__ takes any function named rms_norm for
    # torch's and refuses the residual keyword; it would call this one as it is anyway)
    if has_torch_function_variadic(input, weight, residual) and not _is_nested(input):
        return handle_torch_function(  # see _torch_function_note
            rms_norm, (input, weight, residual), input, normalized_shape, weight, eps,
            residual=residual,
        )  # fmt: skip
    if _integer_tensor(weight) and isinstance(input, torch.Tensor):
        # torch's rms_norm multiplies its fp32 (fp64 for fp64 input) result by the weight, so an
        # integer or bool weight acts as that dtype; layer_norm refuses one (as fastnn's does).
        weight = weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    shape, n = _check_norm_args(
        "rms_norm", input, normalized_shape, residual, [("weight", weight)], eps
    )
    if input.is_nested:
        return _nested_jagged(
            lambda x, r: rms_norm(x, normalized_shape, weight, eps, residual=r),
            input, residual, len(shape),
        )  # fmt: skip
    if _dtensor.any_dtensor(input, residual, weight):
        return _dtensor.norm(
            lambda x, r, w: rms_norm(x, normalized_shape, w, eps, residual=r),
            input,
            residual,
            [("weight", weight)],
            len(shape),
        )
    input, residual = _promoted(input, residual)
    if _autocast_to_fp32("rms_norm", input):
        # As the unfused code under autocast: the add in the input's dtype, the norm in fp32.
        if residual is not None:
            s = input + residual
            return rms_norm(_fp32(s), normalized_shape, _fp32(weight), eps), s
        input, weight = _fp32(input), _fp32(weight)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    backend = _backend.resolve("rms_norm", input.device.type)
    input_shape = input.shape  # before _rows_pair: see _unflatten
    out, residual_out, _ = _forward(backend, "rms_norm_fwd")(
        *_rows_pair(input, residual, shape), _vector(weight, n), float(eps)
    )
    return _unflatten(out, input_shape, residual_out, input, residual)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """LayerNorm over the trailing `normalized_shape` dims, as torch.nn.functional.layer_norm.

    input: [..., *normalized_shape], fp32 / fp16 / bf16 / fp64; weight, bias: normalized_shape
    or None. The result has input's dtype. With `residual` returns
    (layer_norm(input + residual), input + residual), the add fused into the kernel (two dtypes:
    see rms_norm).
    """
    if has_torch_function_variadic(input, weight, bias, residual):  # see _torch_function_note
        return handle_torch_function(
            layer_norm, (input, weight, bias, residual), input, normalized_shape, weight, bias,
            eps, residual=residual,
        )  # fmt: skip
    shape, n = _check_norm_args(
        "layer_norm", input, normalized_shape, residual, [("weight", weight), ("bias", bias)], eps
    )
    if input.is_nested:
        return _nested_jagged(
            lambda x, r: layer_norm(x, normalized_shape, weight, bias, eps, residual=r),
            input, residual, len(shape),
        )  # fmt: skip
    if _dtensor.any_dtensor(input, residual, weight, bias):
        return _dtensor.norm(
            lambda x, r, w, b: layer_norm(x, normalized_shape, w, b, eps, residual=r),
            input,
            residual,
            [("weight", weight), ("bias", bias)],
            len(shape),
        )
    input, residual = _promoted(input, residual)
    if _autocast_to_fp32("layer_norm", input):
        # As the unfused code under autocast: the add in the input's dtype, the norm in fp32.
        if residual is not None:
            s = input + residual
            args = (normalized_shape, _fp32(weight), _fp32(bias), eps)
            return layer_norm(_fp32(s), *args), s
        input, weight, bias = _fp32(input), _fp32(weight), _fp32(bias)
    _check_layer_norm_param_dtypes(input, weight, bias)
    backend = _backend.resolve("layer_norm", input.device.type)
    input_shape = input.shape  # before _rows_pair: see _unflatten
    out, residual_out, _, _ = _forward(backend, "layer_norm_fwd")(
        *_rows_pair(input, residual, shape),
        _vector(weight, n),
        _vector(bias, n),
        float(eps),
    )
    return _unflatten(out, input_shape, residual_out, input, residual)


def _is_nested(t):
    return isinstance(t, torch.Tensor) and t.is_nested


def _nested_jagged(norm, input, residual, ndims):
    """norm(x, r) of a jagged nested input (and residual), as torch's norms take one: the rows
    of its values buffer ([total, ..., N], dense) are its rows, so the kernels normalise that
    and the results share the input's offsets (autograd runs through values() and back). A
    residual has the input's shape (checked), so the same offsets: its rows match the input's."""
    if input._ragged_idx >= input.dim() - ndims:
        raise RuntimeError(
            f"fastnn: normalized_shape covers the ragged dim {input._ragged_idx} of the nested "
            f"input of shape {list(input.shape)}; normalise over regular trailing dims only"
        )

    def nested(values):
        return torch.nested.nested_tensor_from_jagged(
            values, input.offsets(), input.lengths(), jagged_dim=input._ragged_idx
        )

    out = norm(input.values(), None if residual is None else residual.values())
    return nested(out) if residual is None else (nested(out[0]), nested(out[1]))


def _check_layer_norm_param_dtypes(input, weight, bias):
    """torch's rule for layer_norm (rms_norm takes any float params): weight and bias have the
    input's dtype, or are both float32 for float16 / bfloat16 input."""
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    low_precision = input.dtype in (torch.float16, torch.bfloat16)
    if not (dtypes <= {input.dtype} or (low_precision and dtypes == {torch.float32})):
        names = ", ".join(
            f"{n} {p.dtype}" for n, p in (("weight", weight), ("bias", bias)) if p is not None
        )
        raise RuntimeError(
            f"fastnn: layer_norm of {input.dtype} input takes weight and bias of its dtype, or "
            f"float32 ones for float16 / bfloat16 input; got {names}"
        )


def glu_family(gate, up=None, activation="silu", *, inplace_backward=False):
    """act(gate) * up, elementwise, for act in silu (SwiGLU), gelu, gelu_tanh (GeGLU), relu
    (ReGLU) and sigmoid (GLU).

    gate, up: one shape and dtype (fp32 / fp16 / bf16 / fp64). With up=None, the last dim of
    `gate` holds [gate | up] (size 2H) and the result has last dim H. The result is contiguous,
    in gate's dtype. The backward recomputes act(gate) from the saved inputs.

    The packed order is the LLaMA one, activation on the first half; torch.nn.functional.glu
    activates the second half: F.glu(x) is glu_family(x[..., H:], x[..., :H], "sigmoid").

    inplace_backward=True (opt-in, eager mode) saves memory in the backward: it writes the
    gradients over gate and up (their values are gone afterwards) instead of allocating new
    tensors, and a second backward through the result raises. gate and up must not be leaf
    tensors that require grad (their .grad would alias them); Linear outputs are the intended
    use.
    """
    if has_torch_function_variadic(gate, up):  # see _torch_function_note
        return handle_torch_function(
            glu_family, (gate, up), gate, up, activation, inplace_backward=inplace_backward
        )
    for name, t in (("gate", gate), ("up", up)):
        if not (isinstance(t, torch.Tensor) or (t is None and name == "up")):
            raise TypeError(f"fastnn: {name} must be a Tensor, got {type(t).__name__}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
        )
    _check_float(gate, "gate", NotImplementedError)
    sizes = not torch.jit.is_tracing()  # traced sizes: as in _check_norm_args
    if up is None:
        if gate.dim() == 0 or (sizes and gate.shape[-1] % 2 != 0):
            raise RuntimeError(
                f"fastnn: packed gate_up of shape {list(gate.shape)} needs an even last dim "
                "holding [gate | up]"
            )
    else:
        _check_float(up, "up", NotImplementedError)
        if sizes and gate.shape != up.shape:
            raise RuntimeError(
                f"fastnn: gate of shape {list(gate.shape)} and up of shape {list(up.shape)} "
                "differ; the GLU ops do not broadcast (expand them to one shape first)"
            )
        if gate.dtype != up.dtype:
            raise RuntimeError(
                f"fastnn: gate has dtype {gate.dtype} but up has {up.dtype}; the GLU ops do not "
                "promote (cast them to one dtype first)"
            )
        _check_same_device(up, "up", gate, "gate")
    inplace_backward = inplace_backward and not _under_transform()  # plain ops there
    if inplace_backward:
        _refuse_overwriting(gate, up)  # on DTensors too: their local shards are not leaves
    if _dtensor.any_dtensor(gate, up):
        return _dtensor.glu(
            lambda g, u: glu_family(g, u, activation, inplace_backward=inplace_backward), gate, up
        )
    backend = _backend.resolve("glu", gate.device.type)
    if inplace_backward:  # an eager memory saving
        return _glu_inplace_backward(gate, up, activation, backend)
    if up is None:
        return _forward(backend, "glu_packed_fwd")(gate, activation)
    return _forward(backend, "glu_fwd")(gate, up, activation)


def _memory_overlaps(a, b):
    """Whether contiguous a and b share any byte (an element of one is read after the other's
    gradient was written over it)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a.nbytes > 0 and b.nbytes > 0 and a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def _refuse_overwriting(gate, up):
    """Raises when inplace_backward=True would write a gradient over memory autograd does not
    own for this call: a leaf (a parameter) or a view of one, or a tensor that does not require
    grad beside one that does."""
    for name, t in (("gate", gate), ("up", up)):
        # A view's memory is its base's: a slice of a parameter is a parameter too.
        base = t if t is None or t._base is None else t._base
        if base is not None and base.is_leaf and base.requires_grad:
            what = "a leaf tensor" if base is t else "a view of a leaf tensor"
            raise RuntimeError(
                f"fastnn: inplace_backward=True would write the gradient over {name}, {what} "
                "that requires grad; pass a computed tensor (e.g. a Linear output) or use "
                "inplace_backward=False"
            )
    if up is not None and torch.is_grad_enabled() and gate.requires_grad != up.requires_grad:
        # The kernel writes both gradients; one over a tensor autograd does not track (a cached
        # or detached tensor, maybe a parameter's memory) would change its values unseen.
        name = "up" if gate.requires_grad else "gate"
        raise RuntimeError(
            f"fastnn: inplace_backward=True would write a gradient over {name}, which does not "
            "require grad (its values would change); use inplace_backward=False"
        )


def _glu_inplace_backward(gate, up, activation, backend):
    from fastnn.ops import glu as glu_ops

    if torch.compiler.is_compiling():
        raise RuntimeError(
            "fastnn: inplace_backward=True is for eager mode; under torch.compile leave it off "
            "(the compiler plans the backward's memory itself)"
        )
    # Contiguous inputs so the kernel overwrites the very tensors it saved (a copy made here
    # is ours to overwrite).
    gate = gate.contiguous()
    up = None if up is None else up.contiguous()
    if up is not None and _memory_overlaps(gate, up):
        raise RuntimeError(
            "fastnn: inplace_backward=True would write both gradients over one memory (gate "
            "and up overlap in memory); use inplace_backward=False"
        )
    return glu_ops.InplaceBackwardGLU.apply(gate, up, activation, backend)


def swiglu(gate, up=None, *, inplace_backward=False):
    """silu(gate) * up; with up=None the last dim of `gate` holds [gate | up]. See glu_family."""
    if has_torch_function_variadic(gate, up):  # see _torch_function_note
        return handle_torch_function(
            swiglu, (gate, up), gate, up, inplace_backward=inplace_backward
        )
    return glu_family(gate, up, "silu", inplace_backward=inplace_backward)


# _torch_function_note: each function hands an argument with __torch_function__ (a tensor
# subclass, a TorchFunctionMode, torch.fx's Proxy) to it first, as torch's F.rms_norm does. So
# torch.fx.symbolic_trace records the call as one graph node however the function was imported,
# instead of tracing into the argument checks (which branch on properties a Proxy lacks), and a
# subclass gets its own type back. (torch.fx.wrap patched this module's names alone: a
# `from fastnn.functional import rms_norm` in a traced model raised on the Proxy.)
