"""What the fastnn optimizers share: collecting parameters with gradients into (device, dtype)
buckets, with torch.optim's errors for gradients it cannot take."""

from collections import defaultdict

import torch
from torch.optim.optimizer import _get_scalar_dtype


def params_with_grad(group, name):
    """The params of `group` that have a gradient, checked as torch.optim checks them."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{name} does not support sparse gradients, please consider SparseAdam instead"
            )
        if torch.is_complex(p):
            raise RuntimeError(f"fastnn.optim.{name} does not support complex parameters yet")
        out.append(p)
    return out


def new_step(p, group):
    """A zero step counter as torch.optim makes it: on the device when capturable or fused."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros(
            (), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device
        )
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def buckets(params):
    """Group params by (device, dtype), keeping order; returns {key: [indices]}."""
    out = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, p.dtype)].append(i)
    return out


def scalar(value):
    """A hyperparameter that may be a 0-d tensor, as a float (or None for a tensor lr)."""
    return float(value) if not isinstance(value, torch.Tensor) else float(value.item())
