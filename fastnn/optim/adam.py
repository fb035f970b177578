"""fastnn.optim.Adam and AdamW: torch.optim.Adam / AdamW with a fused step()."""

import torch

from fastnn import _backend, ops
from fastnn.optim import _common


class _FusedAdamStep:
    """step() for Adam and AdamW; the constructor and everything else is torch's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler's fused protocol sets these when _step_supports_amp_scaling is True.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = _common.params_with_grad(group, type(self).__name__)
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = _common.new_step(p, group)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            for (device, _), idx in _common.buckets(params).items():
                ps = [params[i] for i in idx]
                states = [self.state[p] for p in ps]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                backend = _backend.resolve("adam", device.type)
                ops.get(backend, "adam_step_")(
                    ps,
                    [p.grad for p in ps],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                    steps,
                    [],
                    lr if isinstance(lr, torch.Tensor) else None,
                    grad_scale,
                    found_inf,
                    lr=_common.scalar(lr),
                    beta1=_common.scalar(beta1),
                    beta2=_common.scalar(beta2),
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"],
                    maximize=group["maximize"],
                )
        return loss


class Adam(_FusedAdamStep, torch.optim.Adam):
    """torch.optim.Adam (same signature, defaults, state_dict) with a fused step()."""


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW (same signature, defaults, state_dict) with a fused step()."""
