"""fastnn.optim.RMSprop: torch.optim.RMSprop with a fused step().

Constructor, defaults, validation errors, param groups, hooks and state_dict layout are torch's;
step() makes one `fastnn::rmsprop_step_keep_grads_` call (`fastnn::rmsprop_step_` under the fused
GradScaler protocol, which writes the grads) per (device, dtype) group of parameters on the
selected backend. Keyword-only extra: master_weights=True (as fastnn.optim.Adam).
"""

import torch

from fastnn.optim import _common


class RMSprop(_common.FusedStepMixin, torch.optim.RMSprop):
    """torch.optim.RMSprop (same signature, defaults, state_dict) with a fused step().

    master_weights (keyword-only, fastnn's): keep fp32 copies of fp16 / bf16 params and fp32
    square_avg / grad_avg / momentum_buffer in the optimizer state. A param written between
    steps (not through .data) restarts its copy from the written value.
    """

    FAMILY = "rmsprop"
    OP = "rmsprop_step_"
    MOMENTS = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        *,
        master_weights=False,
    ):
        super().__init__(
            params,
            lr,
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable,
        )
        self._fastnn_setup(master_weights)

    def _sparse_message(self):
        # torch's words, plus the pointer testing.md asks for.
        return (
            "RMSprop does not support sparse gradients, please consider SparseAdam for "
            "sparse embeddings instead"
        )

    def _new_state(self, p, group, state, dtype):
        if len(state) == 0:
            state["step"] = _common.new_step(p, group)
            state["square_avg"] = _common.zeros_state(p, dtype)
        like = state["square_avg"].dtype
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = _common.zeros_state(p, like)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = _common.zeros_state(p, like)

    def _op_arguments(self, group, states):
        momentum = _common.host_float(group["momentum"], "momentum")
        lists = [
            [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if group["centered"] else [],
            [s["momentum_buffer"] for s in states] if momentum > 0 else [],
        ]
        kwargs = dict(
            alpha=_common.host_float(group["alpha"], "alpha"),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            momentum=momentum,
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
        )
        return lists, kwargs
