"""fastnn.optim.Adam / AdamW / RMSprop against torch.optim's for-loop implementation
(foreach=False), on every backend (Triton under the interpreter, small tensors; native once its
kernels are registered). Trajectories run 20+ steps with identical gradients; fp32 results must
agree to the fp32 tolerance of tests/tolerances.py."""

import copy
import itertools

import pytest
import torch
from conftest import BACKENDS, DEVICES, skip_unless_available
from optim_cases import (
    STEPS,
    assert_params_close,
    assert_states_close,
    centered_rmsprop_at_cancellation,
    clone_leaves,
    make_grads,
    make_params,
    run,
)
from tolerances import FORWARD, RTOL, assert_rel_close, rel_error

import fastnn
from fastnn.optim import Adam, AdamW, RMSprop
from fastnn.triton_kernels import adam as triton_adam

pytestmark = pytest.mark.usefixtures("small_triton_chunks")


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


def _fp32_grad_leaves(params):
    leaves = clone_leaves(params)
    for p in leaves:
        p.grad_dtype = torch.float32  # torch keeps this param's grads in fp32
    return leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_fp32_grads_of_bf16_params(backend, cls, master):
    # Tensor.grad_dtype = float32: a bf16 param with fp32 grads, which every backend reads
    # unrounded. With master weights the masters follow an fp32 run fed the same fp32 grads to
    # fp32 tolerance, 1e-5 (grads rounded to bf16 put them 1.3e-4 to 1e-3 off); without, the ratio check of
    # test_low_precision_without_master_weights, against torch's bf16 run fed the grads rounded
    # (torch's Adam and centered RMSprop refuse fp32 grads of bf16 params).
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    if backend == "triton" and not master:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 (see the test above)")
    dtype = torch.bfloat16
    params = make_params(dtype, backend=backend)
    grads = make_grads([p.float() for p in params], STEPS)
    kw = dict(lr=0.02, weight_decay=0.1)
    if cls == "RMSprop":
        kw.update(momentum=0.5, centered=True)
    ours = _fp32_grad_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, master_weights=master, **kw)
    with fastnn.use_backend(backend):
        run(opt, ours, grads)
    assert all(p.grad.dtype == torch.float32 for p in ours)
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    run(getattr(torch.optim, cls)(ref32, foreach=False, **kw), ref32, grads)
    if master:
        for i, (p, r) in enumerate(zip(ours, ref32, strict=True)):
            master_param = opt.state[p]["master_param"]
            assert_rel_close(master_param, r.detach().double(), torch.float32, what=f"master {i}")
        return
    eager = clone_leaves(params)
    run(
        getattr(torch.optim, cls)(eager, foreach=False, **kw),
        eager,
        [[g.to(dtype) for g in gs] for gs in grads],
    )
    for i, (a, e, r) in enumerate(zip(ours, eager, ref32, strict=True)):
        err, eager_err = rel_error(a.detach(), r.detach()), rel_error(e.detach(), r.detach())
        assert err <= 2 * eager_err + RTOL[dtype][FORWARD], f"param {i}: {err} vs eager {eager_err}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "param_dtype,grad_dtype",
    [
        (torch.bfloat16, torch.float16),
        (torch.float32, torch.float64),
        (torch.float16, torch.float64),
    ],
)
def test_grads_of_another_dtype_are_refused(backend, param_dtype, grad_dtype):
    # Only a param's own dtype, or fp32 for an fp16 / bf16 param: the same error on every
    # backend, before any param of any group is stepped.
    skip_unless_available(backend, "adam", "cpu")
    first = torch.nn.Parameter(torch.ones(3))
    odd = torch.nn.Parameter(torch.ones(4, dtype=param_dtype))
    odd.grad_dtype = grad_dtype
    first.grad, odd.grad = torch.ones(3), torch.ones(4, dtype=grad_dtype)
    opt = Adam([{"params": [first]}, {"params": [odd]}], lr=0.1)
    message = f"a {param_dtype} param \\(shape \\(4,\\)\\) has a {grad_dtype} grad"
    with fastnn.use_backend(backend), pytest.raises(RuntimeError, match=message):
        opt.step()
    assert torch.equal(first.detach(), torch.ones(3)) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls,option,value,key",
    [
        ("Adam", "amsgrad", True, "max_exp_avg_sq"),
        ("RMSprop", "momentum", 0.9, "momentum_buffer"),
        ("RMSprop", "centered", True, "grad_avg"),
    ],
)
def test_an_option_turned_on_mid_run_starts_its_state_at_zero(backend, cls, option, value, key):
    # torch's for-loop step raises KeyError on the state the option needs; fastnn starts it at
    # zero, as a first step does: torch's trajectory when given that zero state.
    skip_unless_available(backend, cls.lower(), "cpu")
    params = make_params(backend=backend)
    grads = make_grads(params, STEPS)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False)
    half = STEPS // 2
    with fastnn.use_backend(backend):
        run(opt, ours, grads[:half])
    run(ref_opt, ref, grads[:half])
    opt.param_groups[0][option] = ref_opt.param_groups[0][option] = value
    for p in ref:
        ref_opt.state[p][key] = torch.zeros_like(p)
    with fastnn.use_backend(backend):
        run(opt, ours, grads[half:])
    run(ref_opt, ref, grads[half:])
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)
