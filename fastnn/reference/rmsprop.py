"""Reference RMSprop step over lists of tensors: torch.optim.RMSprop's for-loop algorithm, fp32
math for low-precision tensors; graph-safe on a GPU as fastnn/reference/adam.py is. Schema:
`fastnn::rmsprop_step_` (csrc/library.cpp)."""

import torch

from fastnn.reference.adam import (
    add_scaled,
    check_list_lengths,
    check_scalars,
    count_steps_,
    device_found_inf,
    host_or_device,
    skip_if_inf,
    update_grad,
)


def rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, master_params,
                  centered, use_momentum):  # fmt: skip
    """The lists rmsprop_step_ needs one tensor per param in (the native ops'
    check_rmsprop_lists)."""
    lists = [("grads", grads), ("square_avgs", square_avgs), ("steps", steps)]
    if centered:
        lists.append(("grad_avgs (centered=True)", grad_avgs))
    if use_momentum:
        lists.append(("momentum_buffers (momentum > 0)", momentum_buffers))
    if master_params:
        lists.append(("master_params", master_params))
    check_list_lengths("rmsprop_step_", params, lists)


def rmsprop_step_(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    steps,
    master_params,
    lr_tensor,
    grad_scale,
    found_inf,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    """Updates params and square_avgs (grad_avgs when centered, momentum_buffers when
    momentum > 0, master_params when given) in place; steps[i] += 1 (torch's step count)."""
    rmsprop_lists(
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps, master_params, centered,
        momentum > 0,
    )  # fmt: skip
    check_scalars("rmsprop_step_", lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    skip, found_inf = device_found_inf(found_inf)
    if skip:
        return
    count_steps_(steps, found_inf)
    if lr_tensor is not None:
        lr = host_or_device(lr_tensor)
    for i, param in enumerate(params):
        weights = master_params[i] if master_params else param
        p = weights.double() if weights.dtype == torch.float64 else weights.float()
        g = update_grad(grads, i, grad_scale, found_inf, maximize).to(p.dtype)
        if weight_decay != 0:
            g = add_scaled(g, weight_decay, p)
        sq = torch.addcmul(square_avgs[i].to(p.dtype) * alpha, g, g, value=1 - alpha)
        square_avgs[i].copy_(skip_if_inf(found_inf, sq, square_avgs[i]))
        if centered:
            ga = grad_avgs[i].to(p.dtype)
            ga = torch.lerp(ga, g, 1 - alpha)
            grad_avgs[i].copy_(skip_if_inf(found_inf, ga, grad_avgs[i]))
            avg = torch.addcmul(sq, ga, ga, value=-1).sqrt() + eps  # sq - ga * ga rounded once
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(p.dtype) * momentum + g / avg
            momentum_buffers[i].copy_(skip_if_inf(found_inf, buf, momentum_buffers[i]))
            p = add_scaled(p, -lr, buf)
        else:
            p = p - lr * g / avg
        weights.copy_(skip_if_inf(found_inf, p, weights))
        if master_params:
            param.copy_(skip_if_inf(found_inf, p, param))
