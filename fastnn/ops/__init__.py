"""The registered fastnn ops, three per schema:

- `fastnn::<name>`: the native backend, schema and kernels from the C++ extension (csrc/);
- `fastnn::triton_<name>`: the Triton backend (fastnn/triton_kernels/<family>.py);
- `fastnn::ref_<name>`: the torch backend (fastnn/reference/<family>.py).

Each op has a fake (meta) implementation and, for forward ops, registered autograd whose backward
calls the same backend's backward op, so torch.compile(fullgraph=True) traces through them and
torch.library.opcheck passes; eager calls take the same ops and backward through eager().
Importing this package compiles nothing and imports no Triton: the Triton kernel module is
imported on the first call of one of its ops.
"""

import importlib

import torch

from fastnn import _backend, _extension

PREFIX = {"torch": "ref_", "native": "", "triton": "triton_"}
_SCHEMAS = {}  # op name -> schema (without the name), as declared in csrc/library.cpp
_EAGER = {}  # (backend, forward op name) -> its eager autograd.Function's apply


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


def available_backends():
    """Backends whose ops are registered in this process (native only with the extension)."""
    return ("torch", "triton", "native") if _extension.load() else ("torch", "triton")


def _lazy_triton(module, name):
    def impl(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    impl.__name__ = name
    return impl


def define(name, schema, reference, triton_module, fake, mutates_args=()):
    """Register `name` for the torch and Triton backends with `schema`, and `fake` as the fake
    implementation of all three backends' ops."""
    _SCHEMAS[name] = schema
    for backend, impl in (("torch", reference), ("triton", _lazy_triton(triton_module, name))):
        op = torch.library.custom_op(
            f"fastnn::{PREFIX[backend]}{name}", impl, mutates_args=mutates_args, schema=schema
        )
        op.register_fake(fake)
    if _extension.load():
        # (the native ops' ADInplaceOrView kernel, which bumps the versions of the tensors they
        # write, is in csrc/library.cpp)
        torch.library.register_fake(f"fastnn::{name}", fake)


def define_autograd(
    fwd_name, bwd_name, setup_context, make_backward, family, materialize_grads=True
):
    """Register autograd for every backend's `fwd_name` op: the backward calls that backend's
    `bwd_name` op. Backward ops get an autograd formula that refuses double backward clearly.
    materialize_grads=False: in eager calls the backward gets None for the grads of outputs
    that nothing used (the norms' mean and rstd) instead of zeros, and takes a None grad_out."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"fastnn: double backward through {family} is not supported (its backward op "
            f"fastnn::{bwd_name} has no derivative); for higher-order grads use torch.func "
            "(grad of grad, hessian: fastnn runs plain torch ops under its transforms) or the "
            "torch modules"
        )

    for backend in available_backends():
        fwd, bwd = get(backend, fwd_name), get(backend, bwd_name)
        torch.library.register_autograd(fwd._name, make_backward(bwd), setup_context=setup_context)
        torch.library.register_autograd(
            bwd._name, no_double_backward, setup_context=lambda ctx, inputs, output: None
        )
        _EAGER[(backend, fwd_name)] = _eager_function(
            fwd, bwd, setup_context, make_backward, materialize_grads
        )


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
        # create_graph=True: the registered op, which refuses the double backward with its
        # message; compiled autograd traces the registered op (Dynamo refuses the guard).
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
