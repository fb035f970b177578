"""The registered fastnn ops, three per schema:

- `fastnn::<name>`: the native backend, schema and kernels from the C++ extension (csrc/);
- `fastnn::triton_<name>`: the Triton backend (fastnn/triton_kernels/<family>.py);
- `fastnn::ref_<name>`: the torch backend (fastnn/reference/<family>.py).

Each op has a fake (meta) implementation and, for forward ops, registered autograd whose backward
calls the same backend's backward op (whose own autograd is the double backward), so
torch.compile(fullgraph=True) traces through them and torch.library.opcheck passes; eager calls
take the same ops and backward through eager().
Importing this package compiles nothing and imports no Triton: the Triton kernel module is
imported on the first call of one of its ops.
"""

import importlib

import torch

from fastnn import _backend, _extension

PREFIX = {"torch": "ref_", "native": "", "triton": "triton_"}
_SCHEMAS = {}  # op name -> schema (without the name), as declared in csrc/library.cpp
_EAGER = {}  # (backend, forward op name) -> its eager autograd.Function's apply
_REFERENCE = {}  # op name -> its reference function (fastnn/reference/<family>.py)


def get(backend, name):
    """The OpOverload of op `name` for `backend`."""
    return getattr(torch.ops.fastnn, PREFIX[backend] + name).default


def eager(backend, name):
    """Forward op `name` of `backend` for an eager call: the same op, setup_context and backward
    as its registered autograd, in a plain autograd.Function that calls the ops below the
    Autograd key. torch's Python autograd wrapper of a custom op cost 57 us more per forward +
    backward (the native LayerNorm op alone on [4, 64] fp32, one AMD EPYC core: 111 against
    54 us; torch's F.layer_norm 42), host time that small layers on a GPU wait for.
    torch.compile, torch.jit.trace, export and opcheck see the registered op (get())."""
    return _EAGER[(backend, name)]


def saveable(t):
    """t for save_for_backward: a tensor made under torch.inference_mode is copied (autograd
    refuses to save one; torch.nn.RMSNorm, a composite, saves only tensors derived from it).
    Runs only when a forward records a graph."""
    return t.clone() if t.is_inference() else t


def available_backends():
    """Backends whose ops are registered in this process (native only with the extension)."""
    return ("torch", "triton", "native") if _extension.load() else ("torch", "triton")


def _lazy_triton(module, name):
    def impl(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    impl.__name__ = name
    return impl


def define(
    name, schema, reference, triton_module, fake, mutates_args=(), impl_name=None, wrap=None
):
    """Register `name` for the torch and Triton backends with `schema`, and `fake` as the fake
    implementation of all three backends' ops. The Triton module's function is `impl_name`
    (default: `name`); `wrap`, if given, wraps both backends' functions (a check of the
    arguments, say)."""
    if _extension.load() and not hasattr(torch.ops.fastnn, name):
        raise RuntimeError(
            f"fastnn: the built extension fastnn._C has no op fastnn::{name}: it was built from "
            f"older sources than this fastnn; rebuild it: {_extension.REBUILD}"
        )
    _SCHEMAS[name] = schema
    _REFERENCE[name] = reference
    impls = (("torch", reference), ("triton", _lazy_triton(triton_module, impl_name or name)))
    for backend, impl in impls:
        op = torch.library.custom_op(
            f"fastnn::{PREFIX[backend]}{name}",
            wrap(impl) if wrap else impl,
            mutates_args=mutates_args,
            schema=schema,
        )
        op.register_fake(fake)
    if _extension.load():
        # (the native ops' ADInplaceOrView kernel, which bumps the versions of the tensors they
        # write, is in csrc/library.cpp)
        torch.library.register_fake(f"fastnn::{name}", fake)


def define_autograd(
    fwd_name, bwd_name, setup_context, make_backward, materialize_grads=True, stats=None
):
    """Register autograd for every backend's `fwd_name` op: the backward calls that backend's
    `bwd_name` op, whose own autograd (double backward) is the reference backward's
    vector-Jacobian product (_double_backward; `stats`: see there).
    materialize_grads=False: in eager calls the backward gets None for the grads of outputs
    that nothing used (the norms' mean and rstd) instead of zeros, and takes a None grad_out."""
    bwd_setup_context, bwd_backward = _double_backward(_REFERENCE[bwd_name], stats)
    for backend in available_backends():
        fwd, bwd = get(backend, fwd_name), get(backend, bwd_name)
        torch.library.register_autograd(fwd._name, make_backward(bwd), setup_context=setup_context)
        torch.library.register_autograd(bwd._name, bwd_backward, setup_context=bwd_setup_context)
        _EAGER[(backend, fwd_name)] = _eager_function(
            fwd, bwd, setup_context, make_backward, materialize_grads
        )


def _double_backward(reference, stats):
    """(setup_context, backward) of a backward op: the vector-Jacobian product of `reference`,
    its formula in plain torch ops, rerun on the saved inputs under autograd (any backend: the
    kernels have no derivative of their own; a double backward is rare enough, gradient
    penalties, Hessian-vector products, to take the unfused ops). create_graph on the second
    backward records it too, so any order works.

    The norms' backward ops take the forward's mean / rstd, which depend on x, but the forward
    op's backward drops their grads (they are not results anyone uses: a pass over x fewer in
    every backward). stats(args) returns args with the statistics replaced by functions of x
    whose value is the saved one and whose derivative is the statistic's: their part of the
    derivative lands in x's grad, and the saved statistics get none."""

    def setup_context(ctx, inputs, output):
        is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.other_args = [None if t else a for a, t in zip(inputs, is_tensor, strict=True)]
        ctx.save_for_backward(*(a if t else None for a, t in zip(inputs, is_tensor, strict=True)))

    def backward(ctx, *grads):
        saved = zip(ctx.saved_tensors, ctx.other_args, strict=True)
        args = [a if a is not None else t for t, a in saved]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
        result = [None] * len(args)
        if not wanted:
            return tuple(result)

        def reference_of_wanted(*primals):
            full = list(args)
            for i, p in zip(wanted, primals, strict=True):
                full[i] = p
            outputs = reference(*(stats(full) if stats else full))
            return outputs if isinstance(outputs, tuple) else (outputs,)

        # torch.func.vjp differentiates with respect to the wanted inputs alone (autograd.grad
        # would also follow grad_out's own history back to x), and records its ops for the
        # outer autograd when create_graph is set.
        _, vjp = torch.func.vjp(reference_of_wanted, *(args[i] for i in wanted))
        for i, g in zip(wanted, vjp(grads), strict=True):
            result[i] = g
        return tuple(result)

    return setup_context, backward


def rstd_following(rstd, second_moment):
    """A norm's saved rstd as a function of its row's second moment m (for stats= of
    define_autograd): the saved value, and the derivative of 1 / sqrt(m + eps), with eps
    recovered as 1 / rstd^2 - m (the backward ops do not take eps)."""
    eps = rstd.detach().pow(-2) - second_moment.detach()
    follow = torch.rsqrt(second_moment + eps)
    return rstd.detach() + (follow - follow.detach())


def _below_autograd(op):
    """op called below the Autograd key: no torch wrapper, no graph recorded."""

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


def _eager_function(fwd, bwd, setup_context, make_backward, materialize_grads):
    """The function behind eager(): fwd's registered autograd without torch's wrapper, or with
    grad mode off the op alone."""
    fwd_below, bwd_below = _below_autograd(fwd), _below_autograd(bwd)

    def backward_op(*args):
        # create_graph=True: the registered op, whose autograd is the double backward;
        # compiled autograd traces the registered op (Dynamo refuses the guard).
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return bwd(*args)
        return bwd_below(*args)

    def forward(ctx, *args):
        # Zeros for the norms' unused mean / rstd grads cost ~6 us per backward ([4, 64]
        # LayerNorm, one AMD EPYC core).
        ctx.set_materialize_grads(materialize_grads)
        output = fwd_below(*args)
        setup_context(ctx, args, output)
        return output

    # Named after the op (its grad_fn: e.g. "layer_norm_fwd_eagerBackward").
    name = f"{fwd._name.split('::')[1]}_eager"
    function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(make_backward(backward_op))},
    )
    apply = function.apply

    def call(*args):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return apply(*args)
        # no_grad / inference_mode (which records no graph even under enable_grad): no
        # autograd.Function (2.6 us of 6.9 per LayerNorm forward, [4, 64] fp32, one AMD EPYC
        # core).
        return fwd_below(*args)

    return call


def schema(name):
    return _SCHEMAS[name]


def register_family(family, native_op, triton_module):
    _backend.register_family(family, native_op, triton_module)
