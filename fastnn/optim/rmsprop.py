"""fastnn.optim.RMSprop: torch.optim.RMSprop with a fused step()."""

import torch

from fastnn import _backend, ops
from fastnn.optim import _common


class RMSprop(torch.optim.RMSprop):
    """torch.optim.RMSprop (same signature, defaults, state_dict) with a fused step()."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = _common.params_with_grad(group, "RMSprop")
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = _common.new_step(p, group)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lr = group["lr"]
            for (device, _), idx in _common.buckets(params).items():
                ps = [params[i] for i in idx]
                states = [self.state[p] for p in ps]
                torch._foreach_add_([s["step"] for s in states], 1)
                backend = _backend.resolve("rmsprop", device.type)
                ops.get(backend, "rmsprop_step_")(
                    ps,
                    [p.grad for p in ps],
                    [s["square_avg"] for s in states],
                    [s["grad_avg"] for s in states] if group["centered"] else [],
                    [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else [],
                    [],
                    lr if isinstance(lr, torch.Tensor) else None,
                    grad_scale,
                    found_inf,
                    lr=_common.scalar(lr),
                    alpha=group["alpha"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    centered=group["centered"],
                    maximize=group["maximize"],
                )
        return loss
