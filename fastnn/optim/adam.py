"""fastnn.optim.Adam and AdamW: torch.optim.Adam / AdamW with a fused step().

Constructor, defaults, validation errors, param groups, hooks and state_dict layout are torch's
(these classes subclass torch's); step() makes one `fastnn::adam_step_keep_grads_` call
(`fastnn::adam_step_` under the fused GradScaler protocol, which writes the grads) per (device,
dtype) group of parameters on the selected backend. One keyword-only extra: master_weights=True
keeps fp32 copies of fp16 / bf16 params (and fp32 moments) in the optimizer state.
"""

import torch

from fastnn.optim import _common


class _AdamStep(_common.FusedStepMixin):
    FAMILY = "adam"
    OP = "adam_step_"
    MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _sparse_message(self):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _new_state(self, p, group, state, dtype):
        if len(state) == 0:
            state["step"] = _common.new_step(p, group)
            state["exp_avg"] = _common.zeros_state(p, dtype)
            state["exp_avg_sq"] = _common.zeros_state(p, dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _common.zeros_state(p, state["exp_avg"].dtype)

    def _op_arguments(self, group, states):
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        lists = [
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
        ]
        kwargs = dict(
            beta1=_common.host_float(beta1, "betas"),
            beta2=_common.host_float(beta2, "betas"),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(amsgrad),
            maximize=bool(group["maximize"]),
        )
        return lists, kwargs


class Adam(_AdamStep, torch.optim.Adam):
    """torch.optim.Adam (same signature, defaults, state_dict) with a fused step().

    master_weights (keyword-only, fastnn's): keep fp32 copies of fp16 / bf16 params and fp32
    moments in the optimizer state; the update runs on them and the params get the rounded copy.
    A param written between steps (not through .data) restarts its copy from the written value.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
        master_weights=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._fastnn_setup(master_weights)


class AdamW(Adam, torch.optim.AdamW):
    """torch.optim.AdamW (same signature, defaults, state_dict) with a fused step(). A subclass
    of fastnn.optim.Adam as torch's AdamW is of torch's Adam; constructed by torch's AdamW.

    master_weights (keyword-only, fastnn's): as for fastnn.optim.Adam.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        master_weights=False,
    ):
        # torch's AdamW constructor, not fastnn.optim.Adam's (next in the MRO, another signature):
        # whatever Adam.__init__ gains beyond _fastnn_setup must be added here too.
        torch.optim.AdamW.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._fastnn_setup(master_weights)
