"""Optimizer-update ops (adam_step_, rmsprop_step_): schemas and fakes for all three backends.
They mutate their tensor-list arguments in place and return nothing: each adds one to every step
count first (torch.optim's state["step"]; Adam's bias corrections then use it), and with
found_inf non-zero writes nothing at all. grads are written only when grad_scale is given: each
becomes grad / grad_scale, as torch's fused Adam leaves .grad.

Each has a *_keep_grads_ twin (adam_step_keep_grads_, rmsprop_step_keep_grads_): the same
arguments, no grad_scale, grads only read, as its schema declares. step() calls the twin unless
it unscales: torch.compile then treats the grads as inputs only. Declared written, grads that are
views into one buffer (FSDP2's reduce-scatter output, DDP's gradient_as_bucket_view) made
Inductor (torch 2.14) raise, or read the wrong elements of them with no error."""

from fastnn import ops
from fastnn.reference import adam as ref_adam
from fastnn.reference import rmsprop as ref_rmsprop

ADAM_SCHEMA = (
    "(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
    " Tensor(d!)[] max_exp_avg_sqs, Tensor(g!)[] steps, Tensor(e!)[] master_params,"
    " Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, *, float lr, float beta1,"
    " float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad,"
    " bool maximize) -> ()"
)
RMSPROP_SCHEMA = (
    "(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs,"
    " Tensor(d!)[] momentum_buffers, Tensor(g!)[] steps, Tensor(e!)[] master_params,"
    " Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, *, float lr, float alpha,"
    " float eps, float weight_decay, float momentum, bool centered, bool maximize) -> ()"
)


def _fake_step(*args, **kwargs):
    return None


GRAD_SCALE_ARG = 8  # params, grads, 5 state lists, lr_tensor, grad_scale


def _keeping_grads(step):
    """step as a *_keep_grads_ op: the grads only read, so no grad_scale (the kernels would write
    grad / grad_scale back). csrc/include/fastnn/optim_host.h's KeepGrads for the native ops."""

    def step_keeping_grads(*args, **kwargs):
        if args[GRAD_SCALE_ARG] is not None:
            raise RuntimeError(
                "fastnn: the *_step_keep_grads_ ops leave the grads as they are and take no "
                "grad_scale; the *_step_ ops unscale the grads in place"
            )
        return step(*args, **kwargs)

    return step_keeping_grads


def _define_with_twin(name, schema, reference, triton_module, mutates_args):
    ops.define(name, schema, reference, triton_module, _fake_step, mutates_args=mutates_args)
    ops.define(
        name + "keep_grads_",
        schema.replace("Tensor(f!)[] grads", "Tensor[] grads"),
        reference,
        triton_module,
        _fake_step,
        mutates_args=tuple(a for a in mutates_args if a != "grads"),
        impl_name=name,
        wrap=_keeping_grads,
    )


ops.register_family("adam", "adam_step_", "fastnn.triton_kernels.adam")
_define_with_twin(
    "adam_step_",
    ADAM_SCHEMA,
    ref_adam.adam_step_,
    "fastnn.triton_kernels.adam",
    mutates_args=(
        "params",
        "grads",
        "exp_avgs",
        "exp_avg_sqs",
        "max_exp_avg_sqs",
        "steps",
        "master_params",
    ),
)
ops.register_family("rmsprop", "rmsprop_step_", "fastnn.triton_kernels.rmsprop")
_define_with_twin(
    "rmsprop_step_",
    RMSPROP_SCHEMA,
    ref_rmsprop.rmsprop_step_,
    "fastnn.triton_kernels.rmsprop",
    mutates_args=(
        "params",
        "grads",
        "square_avgs",
        "grad_avgs",
        "momentum_buffers",
        "steps",
        "master_params",
    ),
)
