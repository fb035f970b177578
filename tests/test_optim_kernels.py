"""The native optimizer-update ops (fastnn::adam_step_, fastnn::rmsprop_step_) called directly on
the CPU, against fastnn/reference (the torch backend) run in float64 on the same rounded inputs.

Every option, fp32 / bf16 / fp16 / fp64 params, fp32 or low-precision state, fp32 master weights,
grad_scale (unscaled inside the kernel), found_inf (nothing written), lr_tensor, per-tensor step
counts, zero-size tensors, many tensors of mixed sizes (the threads split the concatenated
elements, so tensors straddle thread boundaries), layouts, bad input, and opcheck. The math lives
in csrc/include/fastnn/{adam,rmsprop}_math.h, shared with the CUDA kernels.
"""

import itertools

import pytest
import torch
from conftest import skip_unless_available
from tolerances import FORWARD, RTOL, assert_rel_close

from fastnn import ops
from fastnn.reference import adam as ref_adam
from fastnn.reference import rmsprop as ref_rmsprop

LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# 0 and 1 element, odd, one vector + tail, above the 512-element tile, above the 32K-element
# parallel grain (so two threads split the list inside it), and a 2-D one.
SIZES = ((0,), (1,), (7,), (5,), (1000,), (40001,), (33, 65))
ADAM_KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
RMSPROP_KW = dict(lr=1e-2, alpha=0.99, eps=1e-8)


@pytest.fixture(autouse=True)
def _native_available():
    skip_unless_available("native", "adam", "cpu")
    skip_unless_available("native", "rmsprop", "cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _to64(lists):
    return [[t.double() for t in ts] for ts in lists]


# ---- Adam ---------------------------------------------------------------------------------------


def _adam_state(sizes, dtype, state_dtype, amsgrad, master, seed=0, scale=1.0, grad_dtype=None):
    """[params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params] and per-tensor
    steps (1, 2, ... 11, cycling: bias corrections differ per tensor). Grads in grad_dtype, or
    the params' dtype."""
    g = _gen(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    grads = [(torch.randn(s, generator=g) * scale).to(grad_dtype or dtype) for s in sizes]
    m = [(0.1 * torch.randn(s, generator=g)).to(state_dtype) for s in sizes]
    v = [(0.01 * torch.rand(s, generator=g)).to(state_dtype) for s in sizes]
    vmax = [(t.float() + 0.01 * torch.rand(t.shape, generator=g)).to(state_dtype) for t in v]
    vmax = vmax if amsgrad else []
    masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=g) for p in params]
    masters = masters if master else []
    steps = [torch.tensor(float(1 + (3 * i) % 11)) for i in range(len(sizes))]
    return [params, grads, m, v, vmax, masters], steps


def _adam(backend, lists, steps, lr_tensor=None, grad_scale=None, found_inf=None, **kw):
    params, grads, m, v, vmax, masters = lists
    op = ops.get(backend, "adam_step_") if backend == "native" else ref_adam.adam_step_
    counts = [s.clone() for s in steps]  # the op counts them: each call starts from `steps`
    op(params, grads, m, v, vmax, counts, masters, lr_tensor, grad_scale, found_inf, **kw)


def _rel_errors(outs, refs):
    """Per-tensor ||out - ref|| / ||ref|| in fp64 (the tolerance table's measure), computed for
    the whole list in a few ops: one concatenation and two segment sums."""
    outs = [o.reshape(-1).double() for o in outs]
    refs = [r.reshape(-1).double() for r in refs]
    seg = torch.repeat_interleave(torch.tensor([r.numel() for r in refs]))
    num = torch.zeros(len(refs), dtype=torch.float64).index_add_(
        0, seg, (torch.cat(outs) - torch.cat(refs)).square()
    )
    den = torch.zeros(len(refs), dtype=torch.float64).index_add_(0, seg, torch.cat(refs).square())
    return torch.where(den > 0, num.sqrt() / den.sqrt(), num.sqrt())


def _check(out_lists, ref64_lists, eager_lists, names):
    """Each tensor of out against the fp64 reference with the table's forward tolerance; for
    fp16 / bf16 tensors also no more than twice the error of the eager same-dtype reference."""
    for name, outs, refs, eagers in zip(names, out_lists, ref64_lists, eager_lists, strict=True):
        if not outs:
            continue
        assert [o.dtype for o in outs] == [e.dtype for e in eagers], name
        dtype = outs[0].dtype
        err = _rel_errors(outs, refs)
        worst = int(err.argmax())
        tol = RTOL[dtype][FORWARD]
        assert err[worst] <= tol, f"{name}[{worst}] ({dtype}): rel error {err[worst]:.3e} > {tol}"
        if dtype in LOW:
            bound = 2 * _rel_errors(eagers, refs) + 1e-7
            bad = (err > bound).nonzero().flatten().tolist()
            assert not bad, f"{name}{bad} ({dtype}): error above twice the eager dtype's error"


ADAM_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params")


def _run_adam_case(
    dtype, state_dtype, master, grad_scale=None, found_inf=None, lr_tensor=None, sizes=SIZES, **kw
):
    lists, steps = _adam_state(sizes, dtype, state_dtype, kw["amsgrad"], master)
    eager, ref64 = _clone(lists), _to64(lists)
    extra = dict(lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    _adam("native", lists, steps, **extra, **kw)
    if dtype in LOW or state_dtype in LOW:  # the eager same-dtype run bounds low precision
        _adam("torch", eager, steps, **extra, **kw)
    _adam("torch", ref64, steps, **extra, **kw)
    _check(lists, ref64, eager, ADAM_NAMES)
    return lists


# Each weight-decay mode with amsgrad off and on, and maximize both ways across them.
ADAM_OPTIONS = [
    (d, a, (d == "decoupled") != a) for d in ("none", "l2", "decoupled") for a in (0, 1)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay,amsgrad,maximize", ADAM_OPTIONS)
def test_adam_options(dtype, decay, amsgrad, maximize):
    _run_adam_case(
        dtype,
        dtype,
        master=False,
        weight_decay=0.0 if decay == "none" else 0.1,
        decoupled_weight_decay=decay == "decoupled",
        amsgrad=amsgrad,
        maximize=maximize,
        **ADAM_KW,
    )


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("state_dtype", ["param", "fp32"])
@pytest.mark.parametrize("master", [False, True])
def test_adam_low_precision_state_and_master(dtype, state_dtype, master):
    sdt = dtype if state_dtype == "param" else torch.float32
    lists = _run_adam_case(
        dtype,
        sdt,
        master,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        amsgrad=True,
        maximize=False,
        **ADAM_KW,
    )
    if master:  # the low-precision params are the rounded master weights
        for p, w in zip(lists[0], lists[5], strict=True):
            assert torch.equal(p, w.to(dtype))


# 1024: a power of two (GradScaler's), applied as an exact multiply; 3: a true division.
@pytest.mark.parametrize("scale_value", [1024.0, 3.0])
def test_adam_grad_scale_lr_tensor_and_found_inf_zero(scale_value):
    """grad_scale divides the grads inside the kernel; lr_tensor overrides lr; found_inf = 0
    changes nothing."""
    scale = torch.tensor(scale_value)
    kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=False, amsgrad=False, maximize=True)
    kw["lr"] = 123.0  # ignored: lr_tensor wins
    lists, steps = _adam_state(SIZES, torch.float32, torch.float32, False, False, scale=scale_value)
    ref64 = _to64(lists)
    _adam(
        "native",
        lists,
        steps,
        lr_tensor=torch.tensor(1e-2),
        grad_scale=scale,
        found_inf=torch.tensor(0.0),
        **kw,
    )
    ref64[1] = [g / scale_value for g in ref64[1]]
    _adam("torch", ref64, steps, **dict(kw, lr=1e-2))
    for name, outs, refs in zip(
        ADAM_NAMES[2:4] + ADAM_NAMES[:1],
        (lists[2], lists[3], lists[0]),
        (ref64[2], ref64[3], ref64[0]),
        strict=True,
    ):
        for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
            assert_rel_close(out, ref, torch.float32, FORWARD, f"{name}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_found_inf_writes_nothing(dtype):
    kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=False)
    lists, steps = _adam_state(SIZES, dtype, dtype, True, dtype != torch.float32)
    before = _clone(lists)
    _adam("native", lists, steps, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0), **kw)
    for outs, befores in zip(lists, before, strict=True):
        for out, b in zip(outs, befores, strict=True):
            assert torch.equal(out, b)


def test_adam_many_tensors_mixed_sizes():
    """150 tensors of random sizes (many tiny, two large) in one call: one pass, split over the
    threads by elements, tensors straddling the split."""
    g = _gen(3)
    sizes = [(int(n),) for n in torch.randint(0, 3000, (150,), generator=g)]
    sizes[10], sizes[100] = (100_003,), (65_537,)
    _run_adam_case(
        torch.float32,
        torch.float32,
        False,
        sizes=sizes,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        amsgrad=False,
        maximize=False,
        **ADAM_KW,
    )


def test_thread_count_does_not_change_results():
    """Elementwise work: 1 thread and 2 threads give the same bits (tiles, vector bodies and
    scalar tails all run the same math)."""
    sizes = [(n,) for n in (3, 1000, 70_001, 17, 40_000)]
    kw = dict(ADAM_KW, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True, maximize=False)
    rkw = dict(RMSPROP_KW, centered=True, momentum=0.9, weight_decay=0.0, maximize=False)
    results = []
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            lists, steps = _adam_state(sizes, torch.bfloat16, torch.float32, True, True)
            _adam("native", lists, steps, **kw)
            rlists = _rmsprop_state(sizes, torch.float32, torch.float32, True, True, False)
            _rmsprop("native", rlists, **rkw)
            results.append(lists + rlists)
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_adam_trajectory_fp32():
    """Ten steps in a row (step counts advancing as the optimizer advances them)."""
    kw = dict(
        ADAM_KW, weight_decay=0.01, decoupled_weight_decay=False, amsgrad=True, maximize=False
    )
    lists, _ = _adam_state(((257,), (4, 33)), torch.float32, torch.float32, True, False)
    ref64 = _to64(lists)
    g = _gen(5)
    for step in range(1, 11):
        grads = [torch.randn(p.shape, generator=g) for p in lists[0]]
        lists[1], ref64[1] = grads, [x.double() for x in grads]
        steps = [torch.tensor(float(step))] * len(grads)
        _adam("native", lists, steps, **kw)
        _adam("torch", ref64, steps, **kw)
    for name, outs, refs in zip(ADAM_NAMES, lists, ref64, strict=True):
        for out, ref in zip(outs, refs, strict=True):
            assert_rel_close(out, ref, torch.float32, FORWARD, name)


def test_adam_layouts():
    """A channels_last param with channels_last state, and a transposed (non-contiguous) grad,
    match the contiguous result."""
    kw = dict(
        ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False
    )
    g = _gen(7)
    p = torch.randn(2, 3, 4, 5, generator=g)
    grad = torch.randn(2, 3, 4, 5, generator=g)
    m, v = 0.1 * torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (p, m, v)]
    grad_t = grad.transpose(0, 3).contiguous().transpose(0, 3)  # same values, other strides
    assert not grad_t.is_contiguous()
    lists = [[cl[0]], [grad_t], [cl[1]], [cl[2]], [], []]
    ref = [[p.clone()], [grad], [m.clone()], [v.clone()], [], []]
    steps = [torch.tensor(2.0)]
    _adam("native", lists, steps, **kw)
    _adam("native", ref, steps, **kw)
    for a, b in zip(lists, ref, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert cl[0].is_contiguous(memory_format=torch.channels_last)


def test_adam_zero_size_only():
    lists, steps = _adam_state(((0,), (0, 3)), torch.float32, torch.float32, False, False)
    _adam(
        "native",
        lists,
        steps,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        amsgrad=False,
        maximize=False,
        **ADAM_KW,
    )


# ---- RMSprop ------------------------------------------------------------------------------------


def _rmsprop_state(
    sizes, dtype, state_dtype, centered, momentum, master, seed=0, scale=1.0, grad_dtype=None
):
    """[params, grads, square_avgs, grad_avgs, momentum_buffers, master_params]."""
    g = _gen(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    grads = [(torch.randn(s, generator=g) * scale).to(grad_dtype or dtype) for s in sizes]
    # square_avg above grad_avg^2 (as it is after any real step) keeps the centered sqrt real.
    sq = [(0.5 + torch.rand(s, generator=g)).to(state_dtype) for s in sizes]
    ga = [(0.1 * torch.randn(s, generator=g)).to(state_dtype) for s in sizes]
    buf = [(0.1 * torch.randn(s, generator=g)).to(state_dtype) for s in sizes]
    masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=g) for p in params]
    return [
        params,
        grads,
        sq,
        ga if centered else [],
        buf if momentum else [],
        masters if master else [],
    ]


def _rmsprop(backend, lists, lr_tensor=None, grad_scale=None, found_inf=None, **kw):
    params, grads, sq, ga, buf, masters = lists
    op = ops.get(backend, "rmsprop_step_") if backend == "native" else ref_rmsprop.rmsprop_step_
    steps = [torch.zeros((), device=p.device) for p in params]
    op(params, grads, sq, ga, buf, steps, masters, lr_tensor, grad_scale, found_inf, **kw)


RMSPROP_NAMES = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "master_params")


def _run_rmsprop_case(dtype, state_dtype, master, grad_scale=None, sizes=SIZES, **kw):
    lists = _rmsprop_state(sizes, dtype, state_dtype, kw["centered"], kw["momentum"] > 0, master)
    eager, ref64 = _clone(lists), _to64(lists)
    _rmsprop("native", lists, grad_scale=grad_scale, **kw)
    if dtype in LOW or state_dtype in LOW:
        _rmsprop("torch", eager, grad_scale=grad_scale, **kw)
    _rmsprop("torch", ref64, grad_scale=grad_scale, **kw)
    _check(lists, ref64, eager, RMSPROP_NAMES)
    return lists


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "centered,momentum,weight_decay,maximize",
    # every (centered, momentum, weight decay) with maximize both ways across them
    [(c, m, w, (w > 0) != c) for c, m, w in itertools.product((0, 1), (0.0, 0.9), (0.0, 0.1))],
)
def test_rmsprop_options(dtype, centered, momentum, weight_decay, maximize):
    _run_rmsprop_case(
        dtype,
        dtype,
        False,
        centered=centered,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
        **RMSPROP_KW,
    )


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("state_dtype", ["param", "fp32"])
@pytest.mark.parametrize("master", [False, True])
def test_rmsprop_low_precision_state_and_master(dtype, state_dtype, master):
    sdt = dtype if state_dtype == "param" else torch.float32
    lists = _run_rmsprop_case(
        dtype,
        sdt,
        master,
        centered=True,
        momentum=0.9,
        weight_decay=0.01,
        maximize=False,
        **RMSPROP_KW,
    )
    if master:
        for p, w in zip(lists[0], lists[5], strict=True):
            assert torch.equal(p, w.to(dtype))


def test_rmsprop_grad_scale_lr_tensor_and_found_inf():
    kw = dict(RMSPROP_KW, centered=True, momentum=0.9, weight_decay=0.1, maximize=True)
    lists = _rmsprop_state(SIZES, torch.float32, torch.float32, True, True, False, scale=64.0)
    before = _clone(lists)
    _rmsprop("native", lists, grad_scale=torch.tensor(64.0), found_inf=torch.tensor(1.0), **kw)
    for outs, befores in zip(lists, before, strict=True):
        for out, b in zip(outs, befores, strict=True):
            assert torch.equal(out, b)
    ref64 = _to64(lists)
    ref64[1] = [g / 64.0 for g in ref64[1]]
    _rmsprop(
        "native",
        lists,
        lr_tensor=torch.tensor(1e-2),
        grad_scale=torch.tensor(64.0),
        found_inf=torch.tensor(0.0),
        **dict(kw, lr=5.0),
    )
    _rmsprop("torch", ref64, **kw)
    for name, outs, refs in zip(RMSPROP_NAMES, lists, ref64, strict=True):
        if name == "grads":
            continue
        for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
            assert_rel_close(out, ref, torch.float32, FORWARD, f"{name}[{i}]")


def test_rmsprop_many_tensors_mixed_sizes():
    g = _gen(4)
    sizes = [(int(n),) for n in torch.randint(0, 3000, (150,), generator=g)]
    sizes[7] = (100_003,)
    _run_rmsprop_case(
        torch.float32,
        torch.float32,
        False,
        sizes=sizes,
        centered=True,
        momentum=0.9,
        weight_decay=0.0,
        maximize=False,
        **RMSPROP_KW,
    )


# ---- Bad input and opcheck ----------------------------------------------------------------------


def _adam_call(**changes):
    lists, steps = _adam_state(((3,), (4,)), torch.float32, torch.float32, False, False)
    args = dict(
        params=lists[0],
        grads=lists[1],
        exp_avgs=lists[2],
        exp_avg_sqs=lists[3],
        max_exp_avg_sqs=[],
        steps=steps,
        master_params=[],
    )
    kw = dict(
        ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False
    )
    for k, v in changes.items():
        (kw if k in kw else args)[k] = v
    op = ops.get("native", "adam_step_")
    return lambda found_inf=None: op(*args.values(), None, None, found_inf, **kw)


def _bad_calls():
    p = [torch.randn(3), torch.randn(4)]
    return [
        (_adam_call(grads=[torch.randn(3)]), "grads has 1 tensors but params has 2"),
        (_adam_call(amsgrad=True), "max_exp_avg_sqs \\(amsgrad=True\\) has 0 tensors"),
        (
            _adam_call(exp_avgs=[torch.zeros(3, dtype=torch.float64), torch.zeros(4)]),
            "exp_avgs\\[0\\] is Double; optimizer state must be float32 or its param's dtype",
        ),
        (
            _adam_call(exp_avg_sqs=[torch.zeros(3), torch.zeros(5)]),
            "exp_avg_sqs\\[1\\] has shape \\[5\\] but params\\[1\\] has shape \\[4\\]",
        ),
        (
            _adam_call(grads=[torch.randn(3, dtype=torch.float64), torch.randn(4)]),
            "grads\\[0\\] is Double but params\\[0\\] is Float",
        ),
        (
            _adam_call(master_params=[torch.randn(3), torch.randn(4)]),
            "master_params are fp32 copies of float16 / bfloat16 params",
        ),
        (_adam_call(steps=[torch.tensor(1), torch.tensor(1.0)]), "steps\\[0\\] must be"),
        (_adam_call(params=[torch.ones(3, dtype=torch.int64), p[1]]), "Long"),
        (_adam_call(exp_avgs=[torch.zeros(6)[::2], torch.zeros(4)]), "strides"),
    ]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# found_inf set (GradScaler saw an inf: the op writes nothing) refuses the same calls.
FOUND_INF = [None, torch.tensor(1.0)]


@pytest.mark.parametrize("found_inf", FOUND_INF, ids=["no_inf", "found_inf"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_a_clear_error(case, found_inf):
    call, message = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        call(found_inf)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("found_inf", FOUND_INF, ids=["no_inf", "found_inf"])
def test_bad_scalar_arguments_are_refused_on_steps_that_skip_too(found_inf, device, backend):
    """A host found_inf != 0 skips the step, but only after grad_scale and lr_tensor pass their
    checks: a bad one fails on every step, not only on those without an inf, on every backend."""
    skip_unless_available(backend, "adam", device)
    lists, steps = _adam_state(((3,), (4,)), torch.float32, torch.float32, False, False)
    lists = [[t.to(device) for t in ts] for ts in lists]
    steps = [t.to(device) for t in steps]
    op = ops.get(backend, "adam_step_")
    kw = dict(
        ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False
    )
    two = torch.ones(2, device=device)
    for lr_tensor, grad_scale, name in ((two, None, "lr_tensor"), (None, two, "grad_scale")):
        with pytest.raises(RuntimeError, match=f"{name} must have one element"):
            op(*lists[:5], steps, [], lr_tensor, grad_scale, found_inf, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
@pytest.mark.parametrize("family", ["adam", "rmsprop"])
def test_keep_grads_ops_step_as_the_others_and_refuse_a_grad_scale(family, backend):
    """adam_step_keep_grads_ / rmsprop_step_keep_grads_ (what step() calls without a
    GradScaler): the update of adam_step_ / rmsprop_step_, the grads left as they were, and a
    grad_scale (which would write them) refused."""
    skip_unless_available(backend, family, "cpu")
    sizes = ((3,), (40,))
    if family == "adam":
        lists, steps = _adam_state(sizes, torch.float32, torch.float32, False, False)
        lists = [*lists[:5], [s.clone() for s in steps]]
        kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False)
    else:
        lists = _rmsprop_state(sizes, torch.float32, torch.float32, True, True, False)[:5]
        lists = [*lists, [torch.zeros(()) for _ in sizes]]
        kw = dict(RMSPROP_KW, weight_decay=0.1, momentum=0.9, centered=True)
    kw["maximize"] = False
    keep = ops.get(backend, f"{family}_step_keep_grads_")
    ours, ref = _clone(lists), _clone(lists)
    keep(*ours, [], None, None, None, **kw)
    ops.get(backend, f"{family}_step_")(*ref, [], None, None, None, **kw)
    for a, b in zip(ours, ref, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    grads = [g.clone() for g in ours[1]]
    with pytest.raises(RuntimeError, match="take no grad_scale"):
        keep(*ours, [], None, torch.tensor(2.0), None, **kw)
    assert all(torch.equal(g, h) for g, h in zip(ours[1], grads, strict=True))


@pytest.mark.parametrize("found_inf", FOUND_INF, ids=["no_inf", "found_inf"])
def test_bad_rmsprop_input_is_a_clear_error(found_inf):
    lists = _rmsprop_state(((3,), (4,)), torch.float32, torch.float32, True, True, False)
    op = ops.get("native", "rmsprop_step_")
    kw = dict(RMSPROP_KW, weight_decay=0.0, momentum=0.9, centered=True, maximize=False)
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(RuntimeError, match="steps has 1 tensors but params has 2"):
        op(*lists[:5], steps[:1], [], None, None, found_inf, **kw)
    with pytest.raises(RuntimeError, match="grad_avgs \\(centered=True\\) has 0 tensors"):
        op(lists[0], lists[1], lists[2], [], lists[4], steps, [], None, None, found_inf, **kw)
    bufs = [lists[4][0].half(), lists[4][1]]
    with pytest.raises(RuntimeError, match="momentum_buffers\\[0\\] is Half, expected Float"):
        op(lists[0], lists[1], lists[2], lists[3], bufs, steps, [], None, None, found_inf, **kw)
    grads = [lists[1][0].long(), lists[1][1]]
    with pytest.raises(RuntimeError, match="grads\\[0\\] is Long but params\\[0\\] is Float"):
        op(lists[0], grads, *lists[2:5], steps, [], None, None, found_inf, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
@pytest.mark.parametrize("found_inf", FOUND_INF, ids=["no_inf", "found_inf"])
def test_lists_of_the_wrong_length_are_refused_on_every_backend(found_inf, backend):
    """A list the options use without one tensor per param: the same RuntimeError from every
    backend, on a step a host found_inf skips too (the torch backend gave an IndexError, and it
    and the Triton one accepted the call when found_inf was set)."""
    skip_unless_available(backend, "adam", "cpu")
    lists, steps = _adam_state(((3,), (4,)), torch.bfloat16, torch.float32, False, True)
    kw = dict(ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    adam = ops.get(backend, "adam_step_")
    params, grads, m, v, _, masters = lists
    adam_calls = [
        ((params, grads[:1], m, v, [], steps, []), False, "grads has 1 tensors"),
        ((params, grads, m, v[:1], [], steps, []), False, "exp_avg_sqs has 1 tensors"),
        ((params, grads, m, v, [], steps[:1], []), False, "steps has 1 tensors"),
        ((params, grads, m, v, [], steps, []), True, "max_exp_avg_sqs \\(amsgrad=True\\) has 0"),
        ((params, grads, m, v, [], steps, masters[:1]), False, "master_params has 1 tensors"),
    ]
    for args, amsgrad, message in adam_calls:
        with pytest.raises(RuntimeError, match=f"fastnn: adam_step_: {message}"):
            adam(*args, None, None, found_inf, amsgrad=amsgrad, **kw)
    params, grads, sq, ga, buf, _ = _rmsprop_state(
        ((3,), (4,)), torch.float32, torch.float32, True, True, False
    )
    steps = [torch.zeros(()), torch.zeros(())]
    kw = dict(RMSPROP_KW, weight_decay=0.0, momentum=0.9, centered=True, maximize=False)
    rmsprop = ops.get(backend, "rmsprop_step_")
    rmsprop_calls = [
        ((params, grads, sq[:1], ga, buf), "square_avgs has 1 tensors"),
        ((params, grads, sq, [], buf), "grad_avgs \\(centered=True\\) has 0 tensors"),
        ((params, grads, sq, ga, buf[:1]), "momentum_buffers \\(momentum > 0\\) has 1"),
    ]
    for args, message in rmsprop_calls:
        with pytest.raises(RuntimeError, match=f"fastnn: rmsprop_step_: {message}"):
            rmsprop(*args, steps, [], None, None, found_inf, **kw)
    assert all(torch.equal(s, torch.zeros(())) for s in steps)  # no call counted a step


def test_opcheck_native_ops():
    """Schema, fake tensor and AOT dispatch checks, with every optional input given."""
    dtype = torch.bfloat16
    lists, steps = _adam_state(((7,), (3, 4)), dtype, torch.float32, True, True)
    torch.library.opcheck(
        ops.get("native", "adam_step_"),
        (*lists[:5], steps, lists[5], torch.tensor(1e-3), torch.tensor(2.0), torch.tensor(0.0)),
        dict(ADAM_KW, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True, maximize=True),
    )
    lists = _rmsprop_state(((7,), (3, 4)), dtype, torch.float32, True, True, True)
    torch.library.opcheck(
        ops.get("native", "rmsprop_step_"),
        (*lists[:5], [torch.tensor(3.0), torch.tensor(4.0)], lists[5], torch.tensor(1e-3))
        + (torch.tensor(2.0), torch.tensor(0.0)),
        dict(RMSPROP_KW, weight_decay=0.01, momentum=0.9, centered=True, maximize=False),
    )


# ---- CUDA (runs where a GPU is present; the kernels share the math tested above) ---------------


def _to(lists, device):
    return [[t.to(device) for t in ts] for ts in lists]


def _misaligned(t, offset=1):
    """t's values in a view `offset` elements past the start of its allocation: one element is
    not 16-byte aligned, so the kernel takes its scalar path."""
    view = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:].view(t.shape)
    return view.copy_(t)


def _lr_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("grad_offset", [0, 4], ids=["aligned", "grads_16_bytes_in"])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["adam", "rmsprop"])
def test_fp32_grads_of_low_precision_params(family, dtype, master, grad_offset, device):
    """fp32 grads of fp16 / bf16 params (Tensor.grad_dtype): the kernels read them unrounded
    (the fp32 first moment is far closer to the fp64 reference than a step on the grads rounded
    to the params' dtype gets) and, with a grad_scale, write them back unscaled in fp32. Grads
    16 bytes into their buffer (a DDP bucket view) take CUDA's vector path too, in 16-byte
    packs: 8 fp32 grads beside 8 16-bit params are two."""
    skip_unless_available("native", family, device)
    if family == "adam":
        kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)
        lists, steps = _adam_state(
            SIZES, dtype, torch.float32, True, master, scale=4.0, grad_dtype=torch.float32
        )
        names = ADAM_NAMES

        def run(backend, ls):
            scale = torch.tensor(4.0, device=ls[0][0].device)
            _adam(backend, ls, steps, grad_scale=scale, maximize=False, **kw)

    else:
        kw = dict(RMSPROP_KW, centered=True, momentum=0.9, weight_decay=0.1)
        lists = _rmsprop_state(
            SIZES, dtype, torch.float32, True, True, master, scale=4.0, grad_dtype=torch.float32
        )
        names = RMSPROP_NAMES

        def run(backend, ls):
            scale = torch.tensor(4.0, device=ls[0][0].device)
            _rmsprop(backend, ls, grad_scale=scale, maximize=False, **kw)

    rounded, eager, ref64 = _clone(lists), _clone(lists), _to64(lists)
    rounded[1] = [g.to(dtype) for g in rounded[1]]
    out = _to(lists, device)
    if grad_offset:
        out[1] = [_misaligned(g, grad_offset) for g in out[1]]
    for backend, ls in (("native", out), ("native", rounded), ("torch", eager), ("torch", ref64)):
        run(backend, ls)
    out = _to(out, "cpu")
    assert all(g.dtype == torch.float32 for g in out[1])
    _check(out, ref64, eager, names)
    # exp_avgs / square_avgs: fp32 state, off by the grads' rounding if they were rounded
    err, err_rounded = _rel_errors(out[2], ref64[2]), _rel_errors(rounded[2], ref64[2])
    assert err.max() < err_rounded.max() / 100, (err.max(), err_rounded.max())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_adam_cuda(dtype, capturable, misaligned):
    """CUDA kernel vs the fp64 reference: host or device steps / lr, device grad_scale and
    found_inf = 0, master weights for fp16 / bf16, aligned (vector) and misaligned (scalar)."""
    skip_unless_available("native", "adam", "cuda")
    kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True)
    master = dtype in LOW
    lists, steps = _adam_state(SIZES, dtype, torch.float32 if master else dtype, True, master)
    lists[1] = [g * 4 for g in lists[1]]  # scaled grads (exact: a power of two)
    eager, ref64 = _clone(lists), _to64(lists)
    dev = _to(lists, "cuda")
    if misaligned:
        dev = [[_misaligned(t) for t in ts] for ts in dev]
    _adam(
        "native",
        dev,
        [s.cuda() for s in steps] if capturable else steps,
        # fp64 params get an fp64 lr tensor: float32(1e-2) would be off by 2e-10 relative
        lr_tensor=torch.tensor(kw["lr"], dtype=_lr_dtype(dtype), device="cuda")
        if capturable
        else None,
        grad_scale=torch.tensor(4.0, device="cuda"),
        # on the device with device step counts only (the fused protocol: a skipped step must
        # leave the counts without a host sync; host counts take a host found_inf)
        found_inf=torch.tensor(0.0, device="cuda" if capturable else "cpu"),
        **kw,
    )
    _adam("torch", eager, steps, grad_scale=torch.tensor(4.0), **kw)
    _adam("torch", ref64, steps, grad_scale=torch.tensor(4.0), **kw)
    _check(_to(dev, "cpu"), ref64, eager, ADAM_NAMES)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_rmsprop_cuda(dtype, misaligned):
    skip_unless_available("native", "rmsprop", "cuda")
    kw = dict(RMSPROP_KW, centered=True, momentum=0.9, weight_decay=0.1, maximize=True)
    master = dtype in LOW
    lists = _rmsprop_state(SIZES, dtype, torch.float32 if master else dtype, True, True, master)
    lists[1] = [g * 4 for g in lists[1]]
    eager, ref64 = _clone(lists), _to64(lists)
    dev = _to(lists, "cuda")
    if misaligned:
        dev = [[_misaligned(t) for t in ts] for ts in dev]
    _rmsprop(
        "native",
        dev,
        lr_tensor=torch.tensor(kw["lr"], dtype=_lr_dtype(dtype), device="cuda"),
        grad_scale=torch.tensor(4.0, device="cuda"),
        found_inf=torch.tensor(0.0, device="cuda"),
        **kw,
    )
    _rmsprop("torch", eager, grad_scale=torch.tensor(4.0), **kw)
    _rmsprop("torch", ref64, grad_scale=torch.tensor(4.0), **kw)
    _check(_to(dev, "cpu"), ref64, eager, RMSPROP_NAMES)


@needs_cuda
def test_cuda_many_tensors_several_launches():
    """800 tensors: more than one launch's kernel parameters hold (about 370 for Adam)."""
    skip_unless_available("native", "adam", "cuda")
    sizes = [(int(n),) for n in torch.randint(0, 5000, (800,), generator=_gen(11))]
    sizes[5] = (300_001,)
    kw = dict(
        ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False
    )
    lists, steps = _adam_state(sizes, torch.float32, torch.float32, False, False)
    ref64, dev = _to64(lists), _to(lists, "cuda")
    _adam("native", dev, steps, **kw)
    _adam("torch", ref64, steps, **kw)
    _check(_to(dev, "cpu"), ref64, _clone(lists), ADAM_NAMES)
    rkw = dict(RMSPROP_KW, centered=False, momentum=0.0, weight_decay=0.0, maximize=False)
    rlists = _rmsprop_state(sizes, torch.float32, torch.float32, False, False, False)
    ref64, dev = _to64(rlists), _to(rlists, "cuda")
    _rmsprop("native", dev, **rkw)
    _rmsprop("torch", ref64, **rkw)
    _check(_to(dev, "cpu"), ref64, _clone(rlists), RMSPROP_NAMES)


@needs_cuda
def test_cuda_found_inf_on_device_writes_nothing():
    skip_unless_available("native", "adam", "cuda")
    kw = dict(ADAM_KW, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=False)
    lists, steps = _adam_state(SIZES, torch.bfloat16, torch.float32, True, True)
    dev = _to(lists, "cuda")
    before = _clone(dev)
    found = torch.tensor(1.0, device="cuda")
    scale = torch.tensor(2.0, device="cuda")
    _adam("native", dev, [s.cuda() for s in steps], grad_scale=scale, found_inf=found, **kw)
    rkw = dict(RMSPROP_KW, centered=True, momentum=0.9, weight_decay=0.1, maximize=False)
    rlists = _to(_rmsprop_state(SIZES, torch.float16, torch.float16, True, True, True), "cuda")
    rbefore = _clone(rlists)
    _rmsprop("native", rlists, grad_scale=scale, found_inf=found, **rkw)
    for outs, befores in zip(dev + rlists, before + rbefore, strict=True):
        for out, b in zip(outs, befores, strict=True):
            assert torch.equal(out, b)


@needs_cuda
def test_cuda_graph_replay_reads_lr_and_steps_from_the_device():
    """A captured step replays with the current device lr and step counts."""
    skip_unless_available("native", "adam", "cuda")
    kw = dict(
        ADAM_KW, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False
    )
    lists, steps = _adam_state(((1000,), (33, 65)), torch.float32, torch.float32, False, False)
    dev = _to(lists, "cuda")
    dsteps = [s.cuda() for s in steps]
    lr = torch.tensor(1e-2, device="cuda")

    def step():
        _adam("native", dev, dsteps, lr_tensor=lr, **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    ref64 = _to64(_to(dev, "cpu"))
    lr.fill_(5e-3)
    for s in dsteps:
        s.add_(1)
    graph.replay()
    _adam("torch", ref64, [s.cpu() for s in dsteps], **dict(kw, lr=5e-3))
    _check(_to(dev, "cpu"), ref64, _to(dev, "cpu"), ADAM_NAMES)
