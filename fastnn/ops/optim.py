"""Optimizer-update ops (adam_step_, rmsprop_step_): schemas and fakes for all three backends.
They mutate their tensor-list arguments in place and return nothing: each adds one to every step
count first (torch.optim's state["step"]; Adam's bias corrections then use it), and with
found_inf non-zero writes nothing at all. grads are written only when grad_scale is given: each
becomes grad / grad_scale, as torch's fused Adam leaves .grad."""

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


ops.register_family("adam", "adam_step_", "fastnn.triton_kernels.adam")
ops.define(
    "adam_step_",
    ADAM_SCHEMA,
    ref_adam.adam_step_,
    "fastnn.triton_kernels.adam",
    _fake_step,
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
ops.define(
    "rmsprop_step_",
    RMSPROP_SCHEMA,
    ref_rmsprop.rmsprop_step_,
    "fastnn.triton_kernels.rmsprop",
    _fake_step,
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
