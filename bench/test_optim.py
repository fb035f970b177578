"""Optimizer step(): Adam, AdamW and RMSprop over the parameters of a LLaMA-like model (hundreds
of tensors of mixed sizes: embeddings, attention and MLP matrices, norm vectors).

Implementations: torch.optim's for-loop (`eager-forloop`), foreach (`eager`, torch's default on
CUDA), fused (`eager-fused`, Adam / AdamW only: torch has no fused RMSprop), torch.compile of the
foreach step (`compile`, on CUDA, AdamW fp32 only: compiling a step over hundreds of tensors is
slow), and fastnn.optim with each backend forced.

Bytes per parameter, sp = param element size (grad and state alike):
  Adam / AdamW: read p, g, m, v; write p, m, v          = 7 sp   (28 B in fp32)
  RMSprop: read p, g, v; write p, v                     = 5 sp   (20 B); momentum +2 sp, centered +2 sp
"""

import pytest
import torch

import fastnn
from bench import harness

# (d_model, d_ff, layers, vocab): CUDA 374M params in 219 tensors (a 24-layer, 1024-wide model,
# ~10 GB moved per fp32 Adam step); CPU 5.26M params in 39 tensors; smoke 31,648 in 21 tensors.
MODELS = {"cuda": (1024, 2816, 24, 32000), "cpu": (256, 704, 4, 4000), "smoke": (32, 88, 2, 100)}
VARIANTS = {
    "adam": (torch.optim.Adam, fastnn.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, fastnn.optim.AdamW, {"weight_decay": 0.01}),
    "rmsprop": (torch.optim.RMSprop, fastnn.optim.RMSprop, {}),
    "rmsprop-centered-momentum": (
        torch.optim.RMSprop,
        fastnn.optim.RMSprop,
        {"centered": True, "momentum": 0.9},
    ),
}
CASES = {
    "cuda": [harness.headline(v, "fp32") for v in VARIANTS] + [harness.headline("adamw", "bf16")],
    "cpu": [harness.headline(v, "fp32") for v in VARIANTS],
    "smoke": [("adamw", "fp32"), ("rmsprop-centered-momentum", "fp32"), ("adamw", "bf16")],
}
IMPLS = (
    "eager-forloop",
    "eager",
    "eager-fused",
    # Compiling step() over 219 tensors takes long: after every other case (conftest.py).
    pytest.param("compile", marks=pytest.mark.bench_last),
    "fastnn-torch",
    "fastnn-native",
    "fastnn-triton",
)
FAMILY = {"adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}
# Steps take 3-100 ms on a GPU at this size: fewer rounds than the kernels' default. On the CPU
# more: the dev VM's memory bandwidth drifts over stretches of 0.1-1 s (one process, one step
# after another: 2.9 ms for a while, then 4.5-5 ms, fastnn's centered RMSprop, 2026-11-28), longer
# than a case's 7 rounds take, so 7-round medians of one implementation could all fall in a
# quiet stretch (RMSprop ratios 1.7x-3.0x over five runs). 31 rounds narrow that, not remove it
# (1.74x-1.92x in three runs that day, 2.62x in a fourth).
TIMING = {"cuda": (1, 5, 2), "cpu": (1, 31, 1), "smoke": (0, 1, 1)}


def llama_shapes(d, ff, layers, vocab):
    """Parameter shapes of a LLaMA-style decoder: embedding, per layer q/k/v/o [d, d],
    gate/up [ff, d], down [d, ff] and two norm weights [d], final norm, output head."""
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + layer * layers + [(d,), (vocab, d)]


def optim_bytes(params, variant):
    """(2 + 1 + 2 * states) element sizes per parameter: p read and written, g read, each state
    read and written; grads and states have the params' dtype."""
    states = {"adam": 2, "adamw": 2, "rmsprop": 1, "rmsprop-centered-momentum": 3}[variant]
    return sum(p.numel() * p.element_size() * (3 + 2 * states) for p in params)


def unavailable(impl, variant, dtype_name):
    family = FAMILY.get(variant, "rmsprop")
    if impl == "eager-fused" and family == "rmsprop":
        return "torch.optim.RMSprop has no fused implementation"
    if impl == "compile" and (
        harness.profile() != "cuda" or (variant, dtype_name) != ("adamw", "fp32")
    ):
        return (
            "torch.compile of step() is benchmarked on CUDA for AdamW fp32 only (slow to compile)"
        )
    if impl.startswith("fastnn-"):
        from fastnn import _backend

        why = _backend.unavailable_reason(impl.split("-", 1)[1], family, harness.DEVICE)
        return None if why is None else f"fastnn {impl.split('-', 1)[1]} backend: {why}"
    return None


def check_first_step(params, before, torch_cls, kwargs, impl):
    """Wiring check, before timing so a wrong step gets no numbers: every param moved, and in
    fp32 / fp64 by torch's for-loop step (the updates agree to 1e-4 relative; fastnn's math is
    fp32, torch's for-loop rounds bf16 params' math to bf16, so there only the moving counts)."""
    ref = [b.clone().requires_grad_(True) for b in before]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.clone()
    torch_cls(ref, **kwargs, foreach=False).step()
    for i, (p, b, r) in enumerate(zip(params, before, ref, strict=True)):
        moved = (p.detach() - b).double()
        assert moved.count_nonzero() > 0, f"{impl}: param {i} {list(p.shape)} did not move"
        if p.dtype in (torch.float32, torch.float64):
            err = harness.tolerances.rel_error(moved, (r.detach() - b).double())
            assert err <= 1e-4, f"{impl}: param {i} update off by {err:.1e} from torch's"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant,dtype_name", CASES[harness.profile()])
def test_step(benchmark, variant, dtype_name, impl):
    def setup(impl):
        why = unavailable(impl, variant, dtype_name)
        if why is not None:
            pytest.skip(why)
        dtype = harness.DTYPES[dtype_name]
        torch_cls, fastnn_cls, options = VARIANTS[variant]
        params = []
        for shape in llama_shapes(*MODELS[harness.profile()]):
            p = harness.randn(shape, dtype, scale=0.02).requires_grad_(True)
            p.grad = harness.randn(shape, dtype, scale=1e-3)
            params.append(p)
        kwargs = dict(options, lr=1e-4)

        if impl.startswith("fastnn-"):
            opt = fastnn_cls(params, **kwargs)
            backend = impl.split("-", 1)[1]

            def step():
                with fastnn.use_backend(backend):
                    opt.step()

        else:
            mode = {"eager-forloop": {"foreach": False}, "eager-fused": {"fused": True}}
            opt = torch_cls(params, **kwargs, **mode.get(impl, {"foreach": True}))
            step = torch.compile(opt.step) if impl == "compile" else opt.step

        before = [p.detach().clone() for p in params] if impl.startswith("fastnn-") else None
        step()  # creates the state (and compiles): out of the timing, even in smoke runs
        assert all(torch.isfinite(p).all() for p in params[:3]), f"{impl}: non-finite params"
        if before is not None:
            check_first_step(params, before, torch_cls, kwargs, impl)
        info = {
            "op": variant,
            "mode": "step",
            "impl": impl,
            "dtype": dtype_name,
            "shape": [sum(p.numel() for p in params)],
            "tensors": len(params),
        }
        return step, optim_bytes(params, variant), info

    harness.run_case(
        benchmark,
        impl,
        IMPLS,
        setup,
        case=("step", variant, dtype_name),
        timing=TIMING[harness.profile()],
    )
