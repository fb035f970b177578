"""Reference Adam / AdamW step over lists of tensors: torch.optim.Adam's for-loop algorithm, fp32
math for low-precision tensors. Schema: `fastnn::adam_step_` (csrc/library.cpp).

Graph-safe on a GPU: lr_tensor, found_inf and the step counters are read on the host only when
they are CPU tensors; device tensors stay in tensor arithmetic (no sync), so a capturable
optimizer's step() can be captured in a CUDA graph on this backend too.
"""

import torch


def host_or_device(t):
    """A CPU scalar tensor as a Python number, a device one as itself: reading a GPU tensor on
    the host would synchronise (and is not allowed inside a CUDA graph capture)."""
    return t.item() if t.device.type == "cpu" else t


def add_scaled(x, alpha, y):
    """x + alpha * y rounded once, as torch.add(x, y, alpha=alpha) computes it (a fused
    multiply-add on the CPU and CUDA); alpha may be a device tensor (a capturable lr)."""
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(x, y, alpha)
    return torch.add(x, y, alpha=alpha)


def check_list_lengths(op, params, lists):
    """Each (name, list) pair holds one tensor per param: a RuntimeError with the native ops'
    message otherwise (check_len, csrc/include/fastnn/optim_host.h). Checked before a host
    found_inf skips the step, so a malformed call fails on every step, as on the native ops."""
    for name, tensors in lists:
        if len(tensors) != len(params):
            raise RuntimeError(
                f"fastnn: {op}: {name} has {len(tensors)} tensors but params has {len(params)}"
            )


def check_scalars(op, **scalars):
    """The optional scalar tensors (lr_tensor, grad_scale, found_inf) hold one element each, as
    the native ops check (host_scalar, optim_host.h); None: absent. Shapes only: no sync."""
    for name, t in scalars.items():
        if t is not None and t.numel() != 1:
            raise RuntimeError(
                f"fastnn: {op}: {name} must have one element, got shape {list(t.shape)}"
            )


def adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
               amsgrad):  # fmt: skip
    """The lists adam_step_ needs one tensor per param in (the native ops' check_adam_lists)."""
    lists = [
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("steps", steps),
    ]
    if amsgrad:
        lists.append(("max_exp_avg_sqs (amsgrad=True)", max_exp_avg_sqs))
    if master_params:
        lists.append(("master_params", master_params))
    check_list_lengths("adam_step_", params, lists)


def device_found_inf(found_inf):
    """(skip, found_inf): a CPU found_inf is read now (skip the whole step when non-zero); a
    device one is returned for skip_if_inf, which masks each write without a sync."""
    if found_inf is not None and found_inf.device.type == "cpu":
        return found_inf.item() != 0, None
    return False, found_inf


def count_steps_(steps, found_inf):
    """steps[i] += 1, the step count the update then uses (torch.optim's state["step"]).
    found_inf: None, or a device tensor (device_found_inf has read a CPU one): a non-zero value
    leaves the counts, added on the device as a 0 / 1 increment (no sync)."""
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1)
        return
    if steps[0].device != found_inf.device:
        raise RuntimeError(
            f"fastnn: found_inf is on {found_inf.device} but the step counts are on "
            f"{steps[0].device}; the fused GradScaler protocol needs them on the params' device "
            "(fused=True or capturable=True)"
        )
    torch._foreach_add_(steps, (found_inf.reshape(()) == 0).to(steps[0].dtype))


def skip_if_inf(found_inf, new, old):
    """`new`, or `old` where found_inf (a device tensor) is non-zero."""
    return new if found_inf is None else torch.where(found_inf != 0, old, new)


def update_grad(grads, i, grad_scale, found_inf, maximize):
    """grads[i] unscaled (fp32 math, fp64 stays fp64) and negated for maximize: the gradient the
    update uses. With a grad_scale, grads[i] itself becomes grad / grad_scale, as torch's fused
    Adam leaves .grad (left as it was where found_inf is set)."""
    grad = grads[i]
    g = grad.float() if grad.dtype != torch.float64 else grad.clone()
    if grad_scale is not None:
        g = g / grad_scale.to(g)
        grad.copy_(skip_if_inf(found_inf, g, grad))
    return -g if maximize else g


def adam_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    master_params,
    lr_tensor,
    grad_scale,
    found_inf,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
):
    """Updates params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad, master_params
    when given) in place; steps[i] += 1 first (the count this step uses)."""
    adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad)
    check_scalars("adam_step_", lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
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
        m = exp_avgs[i].to(p.dtype)
        v = exp_avg_sqs[i].to(p.dtype)
        step = host_or_device(steps[i])
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr * weight_decay)
            else:
                g = add_scaled(g, weight_decay, p)
        m = torch.lerp(m, g, 1 - beta1)  # as torch.optim.Adam
        v = torch.addcmul(v * beta2, g, g, value=1 - beta2)  # (value * g) * g + v, rounded once
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(p.dtype), v)
            max_exp_avg_sqs[i].copy_(skip_if_inf(found_inf, v_max, max_exp_avg_sqs[i]))
            denom = v_max.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        p = p - (lr / bias_correction1) * m / denom
        exp_avgs[i].copy_(skip_if_inf(found_inf, m, exp_avgs[i]))
        exp_avg_sqs[i].copy_(skip_if_inf(found_inf, v, exp_avg_sqs[i]))
        weights.copy_(skip_if_inf(found_inf, p, weights))
        if master_params:
            param.copy_(skip_if_inf(found_inf, p, param))
