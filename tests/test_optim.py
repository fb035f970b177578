"""fastnn.optim.Adam / AdamW / RMSprop against torch.optim's for-loop implementation
(foreach=False), on every backend (Triton under the interpreter, small tensors; native once its
kernels are registered). Trajectories run 20+ steps with identical gradients; fp32 results must
agree to the fp32 tolerance of tests/tolerances.py."""

import copy
import itertools

import pytest
import torch
from conftest import BACKENDS, DEVICES, skip_unless_available
from tolerances import FORWARD, RTOL, assert_rel_close, rel_error

import fastnn
from fastnn.optim import Adam, AdamW, RMSprop
from fastnn.triton_kernels import adam as triton_adam

# 1 element, odd, zero-size, 3-D. The Triton interpreter runs each kernel op in Python (about
# 0.3-1 ms an op, 100 ops a program here), so the Triton cases use fewer tensors and tiles of 128
# (fixture below): 231 elements are one full tile and a tail. test_triton_multi_chunk covers
# several chunks per tensor.
SHAPES = [(1,), (33, 7), (0,), (130,), (4, 5, 6)]
TRITON_SHAPES = [(33, 7), (0,), (5,)]
STEPS = 20


@pytest.fixture(autouse=True)
def _small_triton_chunks(monkeypatch):
    monkeypatch.setattr(triton_adam, "CHUNK", 256)
    monkeypatch.setattr(triton_adam, "BLOCK", 128)


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


# ---- Trajectories over every option combination ----------------------------------------------

ADAM_CASES = list(
    itertools.product(
        (0.0, 0.1),  # weight_decay
        (False, True),  # amsgrad
        (False, True),  # maximize
        (False, True),  # decoupled_weight_decay
        (False, True),  # lr as a tensor
    )
)


def backend_cases(cases, triton_cases):
    """Every case on torch and native; on Triton (interpreted, slow) a subset in which every
    option is on and off at least once."""
    return [(b, *c) for b in BACKENDS for c in (triton_cases if b == "triton" else cases)]


TRITON_ADAM_CASES = [
    (0.0, False, False, False, False),
    (0.1, False, True, False, True),
    (0.1, True, False, True, False),
    (0.1, True, True, True, True),
]


@pytest.mark.parametrize(
    "backend,wd,amsgrad,maximize,decoupled,tensor_lr", backend_cases(ADAM_CASES, TRITON_ADAM_CASES)
)
def test_adam_trajectory(backend, wd, amsgrad, maximize, decoupled, tensor_lr):
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    kw = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    kw["decoupled_weight_decay"] = decoupled
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = Adam(ours, lr=lr, **kw)
    ref_opt = torch.optim.Adam(ref, lr=lr.clone() if tensor_lr else lr, foreach=False, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lerp_weight_one_gives_the_grad(backend, device):
    """beta1 = 0 (Adam) and alpha = 0 (centered RMSprop): torch's lerp_ takes its second form,
    end - (1 - w) (end - start), for |w| >= 0.5, and so returns the grad exactly at weight 1;
    exp_avg and grad_avg are then the grads, on every backend too."""
    skip_unless_available(backend, "adam", device)
    cases = [("Adam", dict(betas=(0.0, 0.99)), "exp_avg"), ("RMSprop", dict(alpha=0.0, centered=True), "grad_avg")]  # fmt: skip
    for cls, kw, key in cases:
        p = torch.nn.Parameter(torch.randn(1000, device=device))
        opt = getattr(fastnn.optim, cls)([p], lr=0.1, **kw)
        for step in range(3):
            p.grad = torch.randn(1000, device=device)
            with fastnn.use_backend(backend):
                opt.step()
            assert torch.equal(opt.state[p][key], p.grad), (cls, step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_trajectory(backend, amsgrad):
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = AdamW(ours, lr=0.02, weight_decay=0.3, amsgrad=amsgrad)
    ref_opt = torch.optim.AdamW(ref, lr=0.02, weight_decay=0.3, amsgrad=amsgrad, foreach=False)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


RMSPROP_CASES = list(
    itertools.product(
        (0.0, 0.1),  # weight_decay
        (0.0, 0.9),  # momentum
        (False, True),  # centered
        (False, True),  # maximize
        (0.99, 0.5),  # alpha
    )
)


TRITON_RMSPROP_CASES = [
    (0.0, 0.0, False, False, 0.99),
    (0.1, 0.9, False, True, 0.5),
    (0.1, 0.0, True, False, 0.5),
    (0.1, 0.9, True, True, 0.99),
]


@pytest.mark.parametrize(
    "backend,wd,momentum,centered,maximize,alpha",
    backend_cases(RMSPROP_CASES, TRITON_RMSPROP_CASES),
)
def test_rmsprop_trajectory(backend, wd, momentum, centered, maximize, alpha):
    skip_unless_available(backend, "rmsprop", "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    # A tensor lr in half the cases (those with momentum), so every option meets both lr kinds.
    lr = torch.tensor(0.003) if momentum else 0.003
    kw = dict(alpha=alpha, eps=1e-6, weight_decay=wd, momentum=momentum, centered=centered)
    kw["maximize"] = maximize
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = RMSprop(ours, lr=lr, **kw)
    ref_opt = torch.optim.RMSprop(ref, lr=lr.clone() if momentum else lr, foreach=False, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


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


@pytest.mark.parametrize("backend", ["torch", "native"])  # the interpreter's tl.fma rounds twice
def test_centered_rmsprop_rounds_its_variance_once_as_torch(backend):
    skip_unless_available(backend, "rmsprop", "cpu")
    centered_rmsprop_at_cancellation(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_capturable_on_cpu(backend, cls):
    # torch's for-loop refuses capturable=True on a CPU; fastnn keeps the step on the params'
    # device (the CPU) and matches torch's non-capturable run.
    skip_unless_available(backend, cls.lower(), "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, lr=torch.tensor(0.01), capturable=True)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert not opt._step_supports_amp_scaling  # as torch's: GradScaler's fused path is fused=True's


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_trajectory(backend):
    # fp64 params: fp64 math and fp64 hyperparameters, to fp64 precision.
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(torch.float64, backend=backend)
    grads = make_grads(params, STEPS)
    for cls, kw in ((Adam, dict(weight_decay=0.1, amsgrad=True)), (RMSprop, dict(momentum=0.5))):
        ours, ref = clone_leaves(params), clone_leaves(params)
        opt, ref_opt = (
            cls(ours, lr=0.01, **kw),
            getattr(torch.optim, cls.__name__)(ref, lr=0.01, foreach=False, **kw),
        )
        with fastnn.use_backend(backend):
            run(opt, ours, grads)
        run(ref_opt, ref, grads)
        assert_params_close(ours, ref, torch.float64)


# ---- Groups, frozen params, zero-size params ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_frozen_and_zero_size(backend):
    skip_unless_available(backend, "adam", "cpu")
    params = make_params()
    grads = make_grads(params, STEPS)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.03, "betas": (0.5, 0.9), "amsgrad": True},
            {"params": ps[2:4], "weight_decay": 0.2},
            {"params": ps[4:], "lr": 0.005, "maximize": True},
        ]

    ours, ref = clone_leaves(params), clone_leaves(params)
    opt, ref_opt = (
        Adam(groups(ours), lr=0.01),
        torch.optim.Adam(groups(ref), lr=0.01, foreach=False),
    )
    # Param 1 is frozen throughout: untouched, no state. Param 3 gets no grad on the first 5
    # steps, so its step count differs from its bucket's others (per-tensor bias corrections).
    with fastnn.use_backend(backend):
        run(opt, ours, grads[:5], skip=(1, 3))
        run(opt, ours, grads[5:], skip=(1,))
    run(ref_opt, ref, grads[:5], skip=(1, 3))
    run(ref_opt, ref, grads[5:], skip=(1,))
    assert ours[1] not in opt.state and torch.equal(ours[1], params[1])
    assert float(opt.state[ours[3]]["step"]) == STEPS - 5
    assert opt.state[ours[2]]["exp_avg"].shape == (0,)  # zero-size params get state, as torch's
    assert_params_close(ours, ref)
    assert_states_close(
        opt, ref_opt, [ours[i] for i in (0, 2, 3, 4)], [ref[i] for i in (0, 2, 3, 4)]
    )


@pytest.mark.parametrize(
    "cls,kw,added",
    [
        ("Adam", dict(lr=0.01), dict(lr=0.05, amsgrad=True, weight_decay=0.1)),
        ("RMSprop", dict(lr=0.01), dict(lr=0.02, momentum=0.9, centered=True)),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_added_mid_run_steps_as_torchs(backend, cls, kw, added):
    """add_param_group after 5 steps (unfreezing a layer): the new group's options, defaults
    filled in from the constructor's, its params' states starting at step 0."""
    skip_unless_available(backend, "adam" if cls == "Adam" else "rmsprop", "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    first = len(params) // 2
    results = []
    for make, extra in (
        (getattr(fastnn.optim, cls), {}),
        (getattr(torch.optim, cls), {"foreach": False}),
    ):
        ps = clone_leaves(params)
        opt = make(ps[:first], **kw, **extra)
        with fastnn.use_backend(backend):
            run(opt, ps, grads[:5], skip=range(first, len(ps)))
            opt.add_param_group({"params": ps[first:], **added})
            run(opt, ps, grads[5:])
        results.append((opt, ps))
    (opt, ours), (ref_opt, ref) = results
    assert opt.param_groups[1].keys() >= ref_opt.param_groups[1].keys()
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_params_and_grads(backend, cls):
    # A transposed param (its state is transposed too: preserve_format) with a contiguous grad,
    # as a DDP bucket view gives it; and a param that is a strided slice (not dense: the kernels
    # update a dense copy, written back), whose base is otherwise untouched.
    skip_unless_available(backend, cls.lower(), "cpu")
    base = make_params(shapes=[(9, 6), (8, 10)])
    before = base[1].detach().clone()
    ours = [torch.nn.Parameter(base[0].t()), torch.nn.Parameter(base[1][:, ::2])]
    ref = [torch.nn.Parameter(base[0].t().clone()), torch.nn.Parameter(base[1][:, ::2].clone())]
    grads = make_grads(ref, STEPS)
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False)
    with fastnn.use_backend(backend):
        run(opt, ours, [[g.contiguous() for g in gs] for gs in grads])
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert ours[1].data_ptr() == base[1].data_ptr()  # still the slice of base, updated in place
    assert torch.equal(base[1][:, 1::2], before[:, 1::2])


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_follows_a_param_whose_layout_changes(backend, cls):
    # Module.to(memory_format=...) after the first steps swaps each param's .data for one in the
    # new layout (the state keeps the old one), and a state_dict saved for a transposed param
    # loads into a contiguous one: torch's elementwise steps take any mix, and so does fastnn.
    skip_unless_available(backend, cls.lower(), "cpu")
    kw = dict(lr=0.01, amsgrad=True) if cls == "Adam" else dict(lr=0.01, momentum=0.9)
    shape = (2, 3, 4, 4) if backend != "triton" else (2, 3, 2, 2)
    ours, ref = clone_leaves(make_params(shapes=[shape])), clone_leaves(make_params(shapes=[shape]))
    grads = make_grads(ref, 6)
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, foreach=False, **kw)
    for k, layout in enumerate((torch.channels_last, torch.contiguous_format, torch.channels_last)):
        for p in ours + ref:
            p.data = p.data.contiguous(memory_format=layout)
        with fastnn.use_backend(backend):
            run(opt, ours, grads[2 * k : 2 * k + 2])
        run(ref_opt, ref, grads[2 * k : 2 * k + 2])
        assert_params_close(ours, ref)
    transposed = torch.nn.Parameter(torch.randn(5, 4).t())
    saved = getattr(torch.optim, cls)([transposed], **kw)
    transposed.grad = torch.randn(4, 5)
    saved.step()
    contiguous = torch.nn.Parameter(transposed.detach().contiguous())
    loaded = getattr(fastnn.optim, cls)([contiguous], **kw)
    loaded.load_state_dict(copy.deepcopy(saved.state_dict()))  # (its step tensors are shared)
    contiguous.grad = transposed.grad.contiguous()
    with fastnn.use_backend(backend):
        loaded.step()
    saved.step()
    assert_params_close([contiguous], [transposed])


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_triton_multi_chunk(monkeypatch, cls):
    # Tensors over several 64-element chunks of 16-element tiles: each program finds its chunk
    # in the table, full tiles and tails; one tensor joins late so step counts differ.
    skip_unless_available("triton", cls.lower(), "cpu")
    monkeypatch.setattr(triton_adam, "CHUNK", 64)
    monkeypatch.setattr(triton_adam, "BLOCK", 16)
    params = make_params(shapes=[(150,), (3, 7)])
    grads = make_grads(params, 4)
    ours, ref = clone_leaves(params), clone_leaves(params)
    kw = dict(lr=0.01, weight_decay=0.1)
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, foreach=False, **kw)
    with fastnn.use_backend("triton"):
        run(opt, ours, grads[:1], skip=(1,))
        run(opt, ours, grads[1:])
    run(ref_opt, ref, grads[:1], skip=(1,))
    run(ref_opt, ref, grads[1:])
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


def test_triton_table_of_memory_seen_as_another_dtype(monkeypatch):
    """The launch table places each chunk by element size: a step on memory an earlier step saw
    as fp32, now viewed as bf16 (a second model in freed blocks at the same addresses), gets a
    table of its own, and updates what it would with no earlier step, nothing past its tensors."""
    skip_unless_available("triton", "adam", "cpu")
    from fastnn.triton_kernels import multi_tensor

    monkeypatch.setattr(triton_adam, "CHUNK", 64)
    monkeypatch.setattr(triton_adam, "BLOCK", 16)
    n = 150  # three chunks
    raw = [torch.zeros(4 * n, dtype=torch.uint8) for _ in range(4)]  # param, grad, m, v
    values = torch.randn(2, n, generator=torch.Generator().manual_seed(0))

    def step(dtype):
        for r in raw:
            r.zero_()
        p, g, m, v = (r.view(dtype)[:n] for r in raw)
        p.copy_(values[0])
        g.copy_(values[1])
        triton_adam.adam_step_(
            [p], [g], [m], [v], [], [torch.tensor(0.0)], [], None, None, None, lr=0.1,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return raw[0].clone()

    step(torch.float32)
    after_fp32_step = step(torch.bfloat16)
    multi_tensor._TABLES.clear()
    alone = step(torch.bfloat16)
    assert torch.equal(after_fp32_step, alone)
    assert not alone[2 * n :].any()  # nothing written past the bf16 param


# ---- Low precision: bf16 / fp16 params, with and without master weights --------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_low_precision_without_master_weights(backend, dtype, cls):
    # Ratio check (testing.md method 2), on norms: the kernel computes in fp32 and rounds once,
    # so its distance from an fp32 run from the same rounded start and grads is at most twice
    # that of torch.optim run in `dtype`.
    skip_unless_available(backend, cls.lower(), "cpu")
    if backend == "triton":
        pytest.skip(
            "the Triton interpreter truncates fp32 -> bf16 / fp16, a bias that adds up over a "
            "trajectory; test_triton_low_precision_step_within_one_ulp checks single steps"
        )
    params = make_params(dtype, backend=backend)
    grads = make_grads(params, STEPS)
    # eps 1e-3: 1e-8 is 0 in fp16, and torch's fp16 Adam then divides by zero (NaN).
    kw = dict(lr=0.02, weight_decay=0.1, eps=1e-3)
    ours, eager = clone_leaves(params), clone_leaves(params)
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(getattr(torch.optim, cls)(eager, foreach=False, **kw), eager, grads)
    run(
        getattr(torch.optim, cls)(ref32, foreach=False, **kw),
        ref32,
        [[g.float() for g in gs] for gs in grads],
    )
    assert opt.state[ours[1]]["square_avg" if cls == "RMSprop" else "exp_avg"].dtype == dtype
    for i, (a, e, r) in enumerate(zip(ours, eager, ref32, strict=True)):
        assert a.dtype == dtype
        err, eager_err = rel_error(a.detach(), r.detach()), rel_error(e.detach(), r.detach())
        assert err <= 2 * eager_err + RTOL[dtype][FORWARD], f"param {i}: {err} vs eager {eager_err}"


def _one_ulp(x, dtype):
    return torch.finfo(dtype).eps * x.float().abs().clamp_min(torch.finfo(dtype).tiny)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("op", ["adam_step_", "rmsprop_step_"])
def test_triton_low_precision_step_within_one_ulp(dtype, master, op):
    # One step of the Triton op and the reference op on identical low-precision inputs (with a
    # grad_scale): every result within one ulp (the interpreter truncates, testing.md).
    family = op.split("_")[0]
    skip_unless_available("triton", family, "cpu")
    g = torch.Generator().manual_seed(3)

    def rand(shape, positive=False):
        t = torch.randn(shape, generator=g)
        return (t.abs() if positive else t).to(dtype)

    shape = (300,)
    p, grad = rand(shape), rand(shape)
    sdt = torch.float32 if master else dtype
    if op == "adam_step_":
        states = [rand(shape).to(sdt), rand(shape, True).to(sdt), rand(shape, True).to(sdt)]
        kw = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3, weight_decay=0.1)
        kw.update(decoupled_weight_decay=False, amsgrad=True, maximize=False)
    else:
        sq = rand(shape, True).to(sdt) + 2
        # |grad_avg| < 1 < sqrt(square_avg): the centered variance stays positive.
        states = [sq, (rand(shape).float().clamp(-2, 2) / 3).to(sdt), rand(shape).to(sdt)]
        kw = dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.1, momentum=0.5, centered=True)
        kw["maximize"] = True
    outs = []
    for backend in ("triton", "torch"):
        ps, ss = [p.clone()], [[s.clone()] for s in states]
        masters = [p.float()] if master else []
        steps = [torch.tensor(7.0)]
        args = [ps, [grad * 4], *ss, steps, masters, None, torch.tensor(4.0), torch.tensor(0.0)]
        fastnn.ops.get(backend, op)(*args, **kw)
        outs.append([ps[0], *(s[0] for s in ss), *masters])
    for i, (a, b) in enumerate(zip(*outs, strict=True)):
        tol = _one_ulp(b, b.dtype) if b.dtype != torch.float32 else 1e-6 * b.abs() + 1e-7
        assert ((a.float() - b.float()).abs() <= tol).all(), f"output {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_master_weights_track_fp32_run(backend, dtype, cls):
    # With master_weights=True the update runs on fp32 copies with fp32 moments, so the masters
    # follow an fp32 run fed the same (low-precision) grads to fp32 tolerance, and each param is
    # its master rounded to `dtype`.
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    params = make_params(dtype, backend=backend)
    grads = make_grads(params, STEPS)
    kw = dict(lr=0.02, weight_decay=0.1)
    if cls == "RMSprop":
        kw.update(momentum=0.5, centered=True)
    ours = clone_leaves(params)
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    opt = getattr(fastnn.optim, cls)(ours, master_weights=True, **kw)
    ref_opt = getattr(torch.optim, cls)(ref32, foreach=False, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(ref_opt, ref32, [[g.float() for g in gs] for gs in grads])
    for i, (p, r) in enumerate(zip(ours, ref32, strict=True)):
        state = opt.state[p]
        master = state["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        assert_rel_close(master, r.detach().double(), torch.float32, what=f"master {i}")
        for k, v in state.items():
            if k != "step":
                assert v.dtype == torch.float32, f"{k} is {v.dtype}"
        rounded = master.to(dtype)
        if backend == "triton":
            # The Triton interpreter truncates fp32 -> low precision: one ulp (testing.md).
            assert ((p.float() - rounded.float()).abs() <= _one_ulp(rounded, dtype)).all()
        else:
            assert torch.equal(p.detach(), rounded)


# ---- state_dict: layout and round trips with torch.optim ------------------------------------


def _split(grads):
    return grads[:10], grads[10:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", dict(amsgrad=True, weight_decay=0.1)),
        ("AdamW", dict()),
        ("RMSprop", dict(momentum=0.9, centered=True)),
    ],
)
@pytest.mark.parametrize("direction", ["torch_to_fastnn", "fastnn_to_torch"])
def test_state_dict_round_trip(backend, cls, kw, direction):
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    params = make_params(backend=backend)
    first, second = _split(make_grads(params, STEPS))
    fast_cls, torch_cls = getattr(fastnn.optim, cls), getattr(torch.optim, cls)
    # The uninterrupted torch run.
    ref = clone_leaves(params)
    ref_opt = torch_cls(ref, lr=0.01, foreach=False, **kw)
    run(ref_opt, ref, first + second)
    # Half a run in one library, the state_dict handed to the other, the rest there.
    a, b = clone_leaves(params), None
    with fastnn.use_backend(backend):
        if direction == "torch_to_fastnn":
            opt_a = torch_cls(a, lr=0.01, foreach=False, **kw)
            run(opt_a, a, first)
            b = [torch.nn.Parameter(p.detach().clone()) for p in a]
            opt_b = fast_cls(b, lr=0.5, **kw)  # lr comes from the state_dict
        else:
            opt_a = fast_cls(a, lr=0.01, **kw)
            run(opt_a, a, first)
            b = [torch.nn.Parameter(p.detach().clone()) for p in a]
            opt_b = torch_cls(b, lr=0.5, foreach=False, **kw)
        sd = opt_a.state_dict()
        opt_b.load_state_dict(sd)
        run(opt_b, b, second)
    assert_params_close(b, ref)
    assert_states_close(opt_b, ref_opt, b, ref)


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_integer_steps_in_a_state_dict_count_on(cls):
    # A state_dict whose step counts are integer tensors: torch's for-loop steps on from it, and
    # so does fastnn (its kernels count in floating point: the count is converted once).
    params = make_params()
    first, second = _split(make_grads(params, STEPS))
    ref = clone_leaves(params)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False)
    run(ref_opt, ref, first)
    sd = copy.deepcopy(ref_opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(int(entry["step"]))
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01)
    opt.load_state_dict(sd)
    run(opt, ours, second)
    run(ref_opt, ref, second)
    assert_params_close(ours, ref)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in ours)
    assert float(opt.state[ours[0]]["step"]) == STEPS


def test_state_dict_layout_is_torchs():
    params = make_params()
    grads = make_grads(params, 3)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt, ref_opt = AdamW(ours, amsgrad=True), torch.optim.AdamW(ref, amsgrad=True)
    run(opt, ours, grads)
    run(ref_opt, ref, grads)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k, v in ref_sd["state"].items():
        assert list(sd["state"][k]) == list(v)  # same keys, same order
        assert sd["state"][k]["step"].device == v["step"].device
    assert sd["param_groups"] == ref_sd["param_groups"]  # the same keys and values
    assert opt.defaults == ref_opt.defaults and repr(opt) == repr(ref_opt)
    with_masters = AdamW(clone_leaves(params), amsgrad=True, master_weights=True)
    extra = set(with_masters.state_dict()["param_groups"][0]) - set(ref_sd["param_groups"][0])
    assert extra == {"master_weights"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_state_dict_round_trip(backend):
    # Saved master weights and fp32 moments come back fp32 (torch.optim's loader would cast them
    # to bf16), and training continues exactly as without the interruption.
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(torch.bfloat16, backend=backend)
    first, second = _split(make_grads(params, STEPS))
    ref = clone_leaves(params)
    with fastnn.use_backend(backend):
        ref_opt = AdamW(ref, lr=0.02, master_weights=True)
        run(ref_opt, ref, first + second)
        a = clone_leaves(params)
        opt_a = AdamW(a, lr=0.02, master_weights=True)
        run(opt_a, a, first)
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        opt_b = AdamW(b, lr=0.02, master_weights=True)
        opt_b.load_state_dict(opt_a.state_dict())
        assert opt_b.state[b[1]]["master_param"].dtype == torch.float32
        assert opt_b.state[b[1]]["exp_avg_sq"].dtype == torch.float32
        run(opt_b, b, second)
    for p, q in zip(b, ref, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_b.state[p]["master_param"], ref_opt.state[q]["master_param"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_master_weights_follow_writes_outside_step(backend, cls):
    """A param written between steps (a model's load_state_dict, a clamp under no_grad) keeps
    the write: its master restarts from it, as an fp32 run written the same way (the stale
    master made the next step undo the write)."""
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    params = make_params(torch.bfloat16, shapes=[(33, 7), (5,)], backend=backend)
    grads = make_grads(params, 4)
    ours = clone_leaves(params)
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    opt = getattr(fastnn.optim, cls)(ours, lr=0.02, master_weights=True)
    ref_opt = getattr(torch.optim, cls)(ref32, lr=0.02, foreach=False)
    grads32 = [[g.float() for g in gs] for gs in grads]
    with fastnn.use_backend(backend):
        run(opt, ours, grads[:2])
        run(ref_opt, ref32, grads32[:2])
        with torch.no_grad():
            for p, r in zip(ours, ref32, strict=True):
                p.fill_(5.0)
                r.fill_(5.0)
        run(opt, ours, grads[2:])
        run(ref_opt, ref32, grads32[2:])
    for p, r in zip(ours, ref32, strict=True):
        assert_rel_close(opt.state[p]["master_param"], r.detach().double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_loaded_with_the_model_hold(backend):
    """Resuming in the same process (the model's params copied back, then the optimizer's
    state_dict loaded) keeps the saved fp32 masters, not masters rounded from the params."""
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(torch.bfloat16, shapes=[(33, 7), (5,)], backend=backend)
    grads = make_grads(params, 4)
    ours, fresh = clone_leaves(params), None
    with fastnn.use_backend(backend):
        opt = AdamW(ours, lr=0.02, master_weights=True)
        run(opt, ours, grads[:2])
        saved_params = [p.detach().clone() for p in ours]
        saved = copy.deepcopy(opt.state_dict())
        run(opt, ours, grads[2:3])
        with torch.no_grad():
            for p, q in zip(ours, saved_params, strict=True):
                p.copy_(q)
        opt.load_state_dict(copy.deepcopy(saved))  # (the steps count in the loaded tensors)
        run(opt, ours, grads[3:])
        fresh = [torch.nn.Parameter(q.clone()) for q in saved_params]
        fresh_opt = AdamW(fresh, lr=0.02, master_weights=True)
        fresh_opt.load_state_dict(saved)
        run(fresh_opt, fresh, grads[3:])
    for p, q in zip(ours, fresh, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], fresh_opt.state[q]["master_param"])


def test_user_load_state_dict_pre_hooks_edit_the_master_weights_state():
    """fastnn's own pre-hook (which keeps fp32 state from torch's cast) runs after the user's,
    on the state_dict they return."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = AdamW([p], lr=0.01, master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()

    def zero_exp_avg(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = torch.zeros(3)
        return state_dict

    opt.register_load_state_dict_pre_hook(zero_exp_avg)
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_master_weights_from_torch_state_dict():
    # A torch.optim state_dict has no master weights: the optimizer's own choice stays, masters
    # start from the params and the loaded bf16 moments become fp32.
    params = make_params(torch.bfloat16)
    grads = make_grads(params, 4)
    a = clone_leaves(params)
    ref_opt = torch.optim.Adam(a, lr=0.01)
    run(ref_opt, a, grads[:2])
    opt = Adam(a, lr=0.01, master_weights=True)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.param_groups[0]["master_weights"] is True
    assert opt.state[a[1]]["exp_avg"].dtype == torch.float32
    run(opt, a, grads[2:])
    assert opt.state[a[1]]["master_param"].dtype == torch.float32


# ---- GradScaler ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop", "Adam-fused"])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler(backend, cls, unscale_first):
    # A step with an inf in one grad changes nothing (params, state, step counts); the others
    # match torch's run on the unscaled grads. As for torch's optimizers, GradScaler unscales and
    # skips step() itself, except with fused=True (Adam): the fused protocol, GradScaler hands
    # grad_scale / found_inf to step(). unscale_first: the user unscales (e.g. to clip) before
    # scaler.step.
    cls, fused = cls.split("-")[0], cls.endswith("-fused")
    skip_unless_available(backend, cls.lower(), "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, 6)
    kw = dict(lr=0.01, weight_decay=0.1)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, **kw, **({"fused": True} if fused else {}))
    ref_opt = getattr(torch.optim, cls)(ref, foreach=False, **kw)
    assert opt._step_supports_amp_scaling == fused
    post_hooks = []
    opt.register_step_post_hook(lambda *args: post_hooks.append(1))
    k = next(i for i, p in enumerate(ours) if p.dim() == 2)  # the param that gets the inf
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    with fastnn.use_backend(backend):
        for step, gs in enumerate(grads):
            poisoned = step == 3
            for p in ours:
                p.grad = None
            loss = sum((p * g).sum() for p, g in zip(ours, gs, strict=True))
            scaler.scale(loss).backward()  # grads g * 1024: exact (a power of two)
            if poisoned:
                ours[k].grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in ours]
            state_before = {n: v.clone() for n, v in opt.state[ours[k]].items()} if step else {}
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            if poisoned:
                assert all(torch.equal(a, b) for a, b in zip(ours, before, strict=True))
                for n, v in state_before.items():
                    assert torch.equal(opt.state[ours[k]][n], v), f"{n} changed"
            else:
                run(ref_opt, ref, [gs])
    assert float(opt.state[ours[0]]["step"]) == 5
    assert len(post_hooks) == (6 if fused else 5)  # skipped steps run no hooks, as torch's
    assert_params_close(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_protocol_leaves_grads_unscaled(backend, cls, dtype, device):
    # torch's fused Adam writes grad / grad_scale back into .grad (its sign kept under maximize)
    # and leaves .grad alone when found_inf is set. So does every fastnn backend, also for a grad
    # the kernels read through a copy (a transposed param with a contiguous grad) and for a
    # length that ends in the kernels' scalar tail (7).
    skip_unless_available(backend, "rmsprop" if cls == "RMSprop" else "adam", device)
    torch.manual_seed(0)
    base = [torch.randn(9, 6, dtype=dtype), torch.randn(7, dtype=dtype)]
    base = [b.to(device) for b in base]
    ours = [torch.nn.Parameter(base[0].t()), torch.nn.Parameter(base[1].clone())]
    scaled = [torch.randn(p.shape, dtype=dtype).mul_(1024.0).to(device) for p in ours]
    # On a GPU the fused protocol needs the step counts on the device (capturable).
    kw = dict(lr=0.01, weight_decay=0.1, maximize=True, capturable=device != "cpu")
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    for found_inf in (1.0, 0.0):
        for p, g in zip(ours, scaled, strict=True):
            p.grad = g.clone()
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.tensor(found_inf, device=device)
        with fastnn.use_backend(backend):
            opt.step()
        for p, g in zip(ours, scaled, strict=True):
            want = g if found_inf else (g.float() / 1024.0).to(dtype)
            assert torch.equal(p.grad, want), f"found_inf={found_inf}"
    if cls == "RMSprop":
        return  # torch has no fused RMSprop to compare with
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in base]
    # contiguous: torch's fused CUDA kernel needs a param and its grad in one layout.
    theirs[0] = torch.nn.Parameter(base[0].t().contiguous())
    fused = getattr(torch.optim, cls)(theirs, lr=0.01, weight_decay=0.1, maximize=True, fused=True)
    for p, g in zip(theirs, scaled, strict=True):
        p.grad = g.clone()
    fused.grad_scale = torch.tensor(1024.0, device=device)
    fused.found_inf = torch.tensor(0.0, device=device)
    fused.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


# ---- Errors: torch's own, and nothing changed ------------------------------------------------


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_sparse_grad_error_changes_nothing(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = getattr(fastnn.optim, cls)([{"params": [dense]}, {"params": emb.parameters()}], lr=0.1)
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = (dense.detach().clone(), emb.weight.detach().clone())
    with pytest.raises(RuntimeError, match="does not support sparse gradients.*SparseAdam"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(emb.weight, before[1])
    assert len(opt.state) == 0  # not even the dense param of the first group stepped


def _errors(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever torch raises
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", dict(lr=-1.0)),
        ("Adam", dict(eps=-1.0)),
        ("Adam", dict(betas=(1.0, 0.999))),
        ("Adam", dict(betas=(0.9, -0.1))),
        ("Adam", dict(weight_decay=-1.0)),
        ("Adam", dict(lr=torch.tensor([0.1, 0.2]))),
        ("Adam", dict(lr=torch.tensor(0.1), foreach=True)),
        ("Adam", dict(fused=True, foreach=True)),
        ("AdamW", dict(betas=(0.9, 1.5))),
        ("RMSprop", dict(alpha=-0.5)),
        ("RMSprop", dict(momentum=-0.5)),
        ("RMSprop", dict(lr=-0.1)),
        ("RMSprop", dict(eps=-1.0)),
    ],
)
def test_validation_errors_are_torchs(cls, kw):
    p = torch.nn.Parameter(torch.randn(3))
    expected = _errors(lambda: getattr(torch.optim, cls)([p], **kw))
    assert expected is not None
    assert _errors(lambda: getattr(fastnn.optim, cls)([p], **kw)) == expected


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_duplicate_params_and_empty_list_errors_are_torchs(cls):
    p = torch.nn.Parameter(torch.randn(3))
    for params in ([{"params": [p]}, {"params": [p]}], []):
        expected = _errors(lambda params=params: getattr(torch.optim, cls)(params))
        assert expected is not None
        assert _errors(lambda params=params: getattr(fastnn.optim, cls)(params)) == expected


@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_a_param_listed_twice_steps_twice_as_torchs_for_loop(backend, cls, scaled):
    """torch warns of it and its for-loop step updates the param twice in turn, each update
    counting its own step; fastnn makes one op call per occurrence (one call holding a tensor
    twice would update its memory from two places at once). With the fused GradScaler
    protocol both updates read the grad unscaled once, as after GradScaler's unscale_."""
    params = make_params(backend=backend)
    ours, ref = clone_leaves(params), clone_leaves(params)
    kw = dict(lr=1e-2, momentum=0.9, centered=True) if cls == "RMSprop" else dict(lr=1e-2)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = getattr(fastnn.optim, cls)([*ours, ours[0]], **kw)
        ref_opt = getattr(torch.optim, cls)([*ref, ref[0]], foreach=False, **kw)
    grads = [[*g, g[0]] for g in make_grads(params, 5)]
    with use(backend):
        for step_grads in grads:
            for p, g in zip(ours, step_grads[:-1], strict=True):  # the last: ours[0]'s again
                p.grad = g * 1024.0 if scaled else g.clone()
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
            opt.step()
    run(ref_opt, [*ref, ref[0]], grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_differentiable_is_refused_clearly(cls):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        getattr(fastnn.optim, cls)([p], differentiable=True)


def test_signatures_and_defaults_are_torchs():
    import inspect

    for cls in ("Adam", "AdamW", "RMSprop"):
        ours = inspect.signature(getattr(fastnn.optim, cls)).parameters
        theirs = inspect.signature(getattr(torch.optim, cls)).parameters
        assert list(ours)[: len(theirs)] == list(theirs) or set(ours) - {"master_weights"} == set(
            theirs
        )
        for name, par in theirs.items():
            assert ours[name].default == par.default, (cls, name)
            assert ours[name].kind == par.kind, (cls, name)
        assert ours["master_weights"].kind == inspect.Parameter.KEYWORD_ONLY
    # The class relations of torch's: AdamW is an Adam.
    for cls in ("Adam", "AdamW", "RMSprop"):
        assert issubclass(getattr(fastnn.optim, cls), getattr(torch.optim, cls))
    assert issubclass(fastnn.optim.AdamW, fastnn.optim.Adam)


def test_foreach_and_fused_accepted():
    p = torch.nn.Parameter(torch.randn(4))
    for kw in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
        opt = Adam([p], lr=0.1, **kw)
        p.grad = torch.ones(4)
        opt.step()
    # fused=True puts the step on the param's device, as torch's fused Adam does.
    assert opt.state[p]["step"].device == p.device


# ---- Complex params: handled as real views, as torch.optim does --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_complex_params(backend, cls):
    skip_unless_available(backend, cls.lower(), "cpu")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    grads = [[torch.randn(5, 3, dtype=torch.complex64, generator=g)] for _ in range(STEPS)]
    ours, ref = [torch.nn.Parameter(base.clone())], [torch.nn.Parameter(base.clone())]
    kw = dict(lr=0.01, weight_decay=0.1)
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    run(getattr(torch.optim, cls)(ref, foreach=False, **kw), ref, grads)
    assert ours[0].dtype == torch.complex64
    assert_rel_close(
        torch.view_as_real(ours[0].detach()),
        torch.view_as_real(ref[0].detach()).double(),
        torch.float32,
    )


# ---- The step() engine: what it passes to the op ---------------------------------------------


def test_one_op_call_per_device_dtype_group(monkeypatch):
    calls = []
    real = fastnn.ops.get

    def spy(backend, name):
        op = real(backend, name)

        def wrapped(*args, **kwargs):
            calls.append([t.dtype for t in args[0]])
            return op(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fastnn.ops, "get", spy)
    ps = [torch.nn.Parameter(torch.randn(3, dtype=d)) for d in (torch.float32, torch.float64) * 3]
    opt = Adam(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    with fastnn.use_backend("torch"):
        opt.step()
    assert sorted(map(str, calls)) == sorted(map(str, [[torch.float32] * 3, [torch.float64] * 3]))


def test_step_hooks_and_closure():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adam([p], lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen == ["pre", "post"] and loss is not None and float(opt.state[p]["step"]) == 1


def test_pickled_optimizer_keeps_master_weights_fp32_on_load():
    import pickle

    q = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt = RMSprop([q], master_weights=True)
    q.grad = torch.ones(5, dtype=torch.bfloat16)
    opt.step()
    copy = pickle.loads(pickle.dumps(opt))  # torch.optim drops hooks when pickling
    copy.load_state_dict(opt.state_dict())
    (p,) = copy.param_groups[0]["params"]
    assert copy.state[p]["master_param"].dtype == torch.float32
    assert copy.state[p]["square_avg"].dtype == torch.float32


def test_lr_scheduler_with_tensor_lr():
    # Schedulers write a tensor lr in place; the kernels read it on every step.
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt, ref = AdamW([p], lr=torch.tensor(0.1)), torch.optim.AdamW([q], lr=torch.tensor(0.1))
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(6):
        for x in (p, q):
            x.grad = torch.full((4,), float(step + 1))
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
    assert (
        float(opt.param_groups[0]["lr"])
        == float(ref.param_groups[0]["lr"])
        == pytest.approx(0.0125)
    )
    assert_params_close([p], [q])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [("Adam", dict(amsgrad=True)), ("AdamW", {}), ("RMSprop", dict(momentum=0.9, centered=True))],
)
def test_compiled_step_matches_eager(backend, cls, kw):
    """torch.compile(fullgraph=True) of a function calling step(): the update ops trace as
    opaque calls and the compiled steps follow torch's eager trajectory."""
    skip_unless_available(backend, "adam", "cpu")
    torch._dynamo.reset()
    params = make_params(backend=backend)
    grads = make_grads(params, 3)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False, **kw)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    with fastnn.use_backend(backend):
        for step_grads in grads:
            for p, g in zip(ours, step_grads, strict=True):
                p.grad = g.clone()
            compiled_step()
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [("AdamW", {}), ("RMSprop", dict(momentum=0.9, centered=True))])
def test_compiled_step_follows_a_scheduler_without_recompiling(backend, cls, kw, device):
    """A compiled step under an lr scheduler that changes a float lr every step: two graphs (the
    first step, which creates the state, and the rest), and the eager step's params bitwise."""
    skip_unless_available(backend, "adam", device)
    from torch._dynamo.utils import counters

    def train(compiled):
        torch._dynamo.reset()
        counters.clear()
        params = [p.to(device) for p in make_params(backend=backend)]
        opt = getattr(fastnn.optim, cls)(params, lr=0.01, **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (epoch + 1))
        step = torch.compile(opt.step) if compiled else opt.step
        with fastnn.use_backend(backend):
            for step_grads in make_grads(params, 6):
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.to(device)
                step()
                sched.step()
        return params, counters["stats"]["unique_graphs"]

    compiled, graphs = train(True)
    eager, _ = train(False)
    assert graphs == 2
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adam_step_", "rmsprop_step_"])
def test_opcheck(backend, op):
    # Schema, fake implementation and mutation annotations of the registered op.
    skip_unless_available(backend, op.split("_")[0], "cpu")
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]

    def like(positive=False):
        return [torch.randn(p.shape, generator=g).abs() if positive else torch.randn(p.shape, generator=g) for p in ps]  # fmt: skip

    scalars = [torch.tensor(0.01), torch.tensor(2.0), torch.tensor(0.0)]  # lr, scale, found_inf
    if op == "adam_step_":
        steps = [torch.tensor(2.0), torch.tensor(5.0)]
        args = [ps, like(), like(), like(True), like(True), steps, [], *scalars]
        kw = dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        kw.update(decoupled_weight_decay=True, amsgrad=True, maximize=False)
    else:
        sq = [t + 4 for t in like(True)]
        args = [
            ps,
            like(),
            sq,
            like(),
            like(),
            [torch.tensor(2.0), torch.tensor(5.0)],
            [],
            *scalars,
        ]
        kw = dict(lr=0.0, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True)
        kw["maximize"] = False
    torch.library.opcheck(fastnn.ops.get(backend, op), args, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adam_step_", "rmsprop_step_"])
def test_ops_count_the_steps(backend, op):
    # Each op adds one to every step count (torch.optim's state["step"]; a zero-size param's
    # too) before it uses them, and with found_inf != 0 writes nothing, counts included.
    skip_unless_available(backend, op.split("_")[0], "cpu")
    ps = [torch.randn(3), torch.zeros(0)]

    def like(positive=False):
        return [torch.rand(p.shape) + 1 if positive else torch.randn(p.shape) for p in ps]

    for found_inf, want in ((0.0, [2.0, 5.0]), (1.0, [1.0, 4.0])):
        steps = [torch.tensor(1.0), torch.tensor(4.0, dtype=torch.float64)]
        scalars = [None, None, torch.tensor(found_inf)]
        if op == "adam_step_":
            args = [ps, like(), like(), like(True), [], steps, [], *scalars]
            kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
            kw.update(decoupled_weight_decay=False, amsgrad=False, maximize=False)
        else:
            args = [ps, like(), like(True), [], [], steps, [], *scalars]
            kw = dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0)
            kw.update(centered=False, maximize=False)
        fastnn.ops.get(backend, op)(*args, **kw)
        assert [float(s) for s in steps] == want, f"found_inf={found_inf}"
        assert steps[1].dtype == torch.float64


def test_betas_as_a_list_as_checkpoint_loaders_hand_them_back():
    """torch.distributed.checkpoint's set_state_dict returns betas as a list; step() takes it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = fastnn.optim.AdamW([p], betas=[0.9, 0.95])
    ref_opt = torch.optim.AdamW([ref], betas=(0.9, 0.95), foreach=False)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        ref.grad = torch.ones_like(ref)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p, ref)


def test_a_refused_update_leaves_its_step_counts():
    # The op refuses a corrupted state (an int64 moment): the error propagates and the counts of
    # the refused update stay where they were, so a retry uses the right bias correction.
    p = torch.nn.Parameter(torch.randn(5))
    opt = Adam([p], lr=0.01)
    p.grad = torch.ones(5)
    opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_bumps_versions_so_stale_graphs_are_refused(backend, cls):
    # As with torch.optim: a graph that saved a param before step() refuses a second backward.
    skip_unless_available(backend, cls.lower(), "cpu")
    p = torch.nn.Parameter(torch.randn(4))
    opt = getattr(fastnn.optim, cls)([p], lr=0.1)
    loss = (p * p).sum()
    loss.backward(retain_graph=True)
    with fastnn.use_backend(backend):
        opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_keeps_a_nan_in_max_exp_avg_sq_as_torch(backend):
    skip_unless_available(backend, "adam", "cpu")
    ours, ref = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Adam([ours], lr=0.1, amsgrad=True)
    ref_opt = torch.optim.Adam([ref], lr=0.1, amsgrad=True, foreach=False)
    for grads in ([1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0]):
        ours.grad, ref.grad = torch.tensor(grads), torch.tensor(grads)
        with fastnn.use_backend(backend):
            opt.step()
        ref_opt.step()
    mine, theirs = opt.state[ours]["max_exp_avg_sq"], ref_opt.state[ref]["max_exp_avg_sq"]
    assert torch.equal(mine.isnan(), theirs.isnan()) and theirs.isnan().any()
