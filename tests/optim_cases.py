"""Shared by the optimizer tests (tests/test_optim*.py): parameter sets, per-step gradients, a
training loop, and comparisons with torch.optim's states and params."""

import torch
from conftest import skip_unless_available
from tolerances import FORWARD, assert_rel_close

import fastnn
from fastnn.optim import RMSprop

# 1 element, odd, zero-size, 3-D. The Triton interpreter runs each kernel op in Python (about
# 0.3-1 ms an op, 100 ops a program here), so the Triton cases use fewer tensors and tiles of 128
# (conftest.py's small_triton_chunks): 231 elements are one full tile and a tail.
# test_triton_multi_chunk covers several chunks per tensor.
SHAPES = [(1,), (33, 7), (0,), (130,), (4, 5, 6)]
TRITON_SHAPES = [(33, 7), (0,), (5,)]
STEPS = 20


def make_params(dtype=torch.float32, seed=0, shapes=None, backend=None):
    if shapes is None:
        shapes = TRITON_SHAPES if backend == "triton" else SHAPES
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def make_grads(params, steps, seed=1):
    """Per step, one gradient per param (None for params listed as frozen by the caller)."""
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
        for _ in range(steps)
    ]


def clone_leaves(params):
    return [torch.nn.Parameter(p.clone()) for p in params]


def run(opt, params, grads, skip=()):
    """Apply `grads` (a list of per-step lists) with `opt`; params in `skip` get no grad."""
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = None if i in skip else g.clone()
        opt.step()


def assert_params_close(ours, ref, dtype=torch.float32):
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_rel_close(a.detach(), b.detach().double(), dtype, FORWARD, what=f"param {i}")


def assert_states_close(opt, ref_opt, params, ref_params, dtype=torch.float32):
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        s, r = opt.state[p], ref_opt.state[q]
        assert set(s) == set(r), f"param {i}: state keys {sorted(s)} != torch's {sorted(r)}"
        for k in r:
            if k == "step":
                assert float(s[k]) == float(r[k]), f"param {i}: step {s[k]} != {r[k]}"
            else:
                assert_rel_close(s[k], r[k].double(), dtype, FORWARD, what=f"param {i} {k}")


def use(backend):
    skip_unless_available(backend, "adam", "cpu")
    return fastnn.use_backend(backend)


def centered_rmsprop_at_cancellation(backend, device):
    """A steady gradient: centered RMSprop's square_avg - grad_avg^2 cancels, and only rounded
    once (torch's addcmul on the CPU) it stays above 0 where rounded twice it hits exactly 0 at
    step 1225 and the step divides by eps alone (a param 5e4x off torch's). A 1e25 gradient:
    square_avg and grad_avg^2 overflow, inf - inf would be NaN; once rounded, the update is 0,
    as torch's. The oracle is torch's for-loop on the CPU for every device (a CUDA addcmul may
    round the product first, as a + value * (t1 * t2))."""
    devices = (device, "cpu")
    steady = [torch.nn.Parameter(torch.zeros(20, device=d)) for d in devices]
    huge = [torch.nn.Parameter(torch.ones(3, device=d)) for d in devices]
    opts = [RMSprop([steady[0], huge[0]], lr=1e-3, centered=True)]
    opts.append(torch.optim.RMSprop([steady[1], huge[1]], lr=1e-3, centered=True, foreach=False))
    for k, opt in enumerate(opts):
        with fastnn.use_backend(backend):
            for step in range(1500):
                steady[k].grad = torch.full_like(steady[k], 1.4809523820877075)
                huge[k].grad = (
                    torch.tensor([1e25, 1.0, 1.0], device=devices[k]) if step == 0 else None
                )
                opt.step()
    torch.testing.assert_close(steady[0].cpu(), steady[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(huge[0].cpu(), huge[1], rtol=1e-6, atol=0)
