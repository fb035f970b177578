"""fastnn.optim as a drop-in for torch.optim beyond the update itself: GradScaler and the fused
scaler protocol, torch's own validation errors, complex params, what step() hands the ops (one
call per device and dtype group, hooks, closures, schedulers, torch.compile), and opcheck of
the ops."""

import pytest
import torch
from conftest import BACKENDS, DEVICES, skip_unless_available
from optim_cases import (
    STEPS,
    assert_params_close,
    assert_states_close,
    clone_leaves,
    make_grads,
    make_params,
    run,
    use,
)
from tolerances import assert_rel_close

import fastnn
from fastnn.optim import Adam, AdamW

pytestmark = pytest.mark.usefixtures("small_triton_chunks")


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
@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32-grads"],
)
def test_fused_protocol_leaves_grads_unscaled(backend, cls, dtype, grad_dtype, device):
    # torch's fused Adam writes grad / grad_scale back into .grad (its sign kept under maximize)
    # and leaves .grad alone when found_inf is set. So does every fastnn backend, also for a grad
    # the kernels read through a copy (a transposed param with a contiguous grad), for a length
    # that ends in the kernels' scalar tail (7) and for fp32 grads of bf16 params.
    skip_unless_available(backend, "rmsprop" if cls == "RMSprop" else "adam", device)
    torch.manual_seed(0)
    base = [torch.randn(9, 6, dtype=dtype), torch.randn(7, dtype=dtype)]
    base = [b.to(device) for b in base]
    ours = [torch.nn.Parameter(base[0].t()), torch.nn.Parameter(base[1].clone())]
    for p in ours:
        p.grad_dtype = grad_dtype
    grad_dtype = grad_dtype or dtype
    scaled = [torch.randn(p.shape, dtype=grad_dtype).mul_(1024.0).to(device) for p in ours]
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
            want = g if found_inf else (g.float() / 1024.0).to(grad_dtype)
            assert torch.equal(p.grad, want), f"found_inf={found_inf}"
    if cls == "RMSprop" or grad_dtype != dtype:
        return  # torch has no fused RMSprop, and its fused Adam refuses fp32 grads of bf16
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


def _params_over_shared_memory(n, seed):
    """[a, c, b, d]: a and b two Parameters over the same n elements (a weight tied through
    .data), c and d over overlapping three quarters of one buffer of 2n. Laid end to end, a and
    c fill the first half of the elements, b and d the second: a CPU kernel's two threads
    would take a and b at the same time, then c and d."""
    g = torch.Generator().manual_seed(seed)
    tied, halves = torch.randn(n, generator=g), torch.randn(2 * n, generator=g)
    P = torch.nn.Parameter
    return [P(tied), P(halves[n // 2 :]), P(tied.detach()), P(halves[: 3 * n // 2])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "RMSprop"])
def test_params_over_one_memory_step_in_turn_as_torchs_for_loop(backend, cls):
    """torch's for-loop step updates each param in turn, so a later param over the same memory
    steps from the earlier one's result. In one op call the native CPU kernel's two threads
    updated both at once: 38,636 of 262,144 tied elements lost a whole Adam step (0.1 at lr 0.1),
    different ones each run. Large enough on the CPU for both threads to share each param."""
    skip_unless_available(backend, "adam" if cls != "RMSprop" else "rmsprop", "cpu")
    n = 2048 if backend == "triton" else 2**18
    ours, ref = _params_over_shared_memory(n, 0), _params_over_shared_memory(n, 0)
    kw = dict(lr=0.1, momentum=0.9, centered=True) if cls == "RMSprop" else dict(lr=0.1)
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, foreach=False, **kw)
    grads = make_grads(ref, 3)
    with use(backend):
        run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert ours[0].data_ptr() == ours[2].data_ptr()  # still one memory


def test_overlap_rounds_pass_over_params_without_addresses():
    """Address 0 (meta tensors, wrapper subclasses such as quantised-weight wrappers) is no
    memory of the param's own: such params share one op call (all at 0, each had one of its
    own: a step over 200 wrapper params 13x slower). Overlapping ones keep their list order."""
    from fastnn.optim._common import _overlap_rounds

    assert [list(r) for r in _overlap_rounds([(0, 32)] * 3 + [(64, 0), (96, 8)])] == [
        [0, 1, 2, 3, 4]
    ]
    # 1 overlaps 0 (tied), 3 overlaps 2 and comes first in memory; 4 stands alone
    spans = [(100, 40), (100, 40), (300, 16), (296, 8), (500, 4)]
    assert [list(r) for r in _overlap_rounds(spans)] == [[0, 2, 4], [1, 3]]


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_a_step_under_fake_tensor_mode_reads_no_addresses(monkeypatch, cls):
    """Memory tools step under FakeTensorMode: the overlap check must not read a fake param's
    data_ptr (torch warns, once per process, that it is a bug and will raise)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def data_ptr(self):
        raise AssertionError("data_ptr of a FakeTensor read")

    monkeypatch.setattr(FakeTensor, "data_ptr", data_ptr)
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
        for p in params:
            p.grad = torch.randn_like(p)
        getattr(fastnn.optim, cls)(params).step()


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_steps_of_meta_params_count_as_torchs(cls):
    """A shape-only model (deferred init, planning) steps on the meta device: torch's step
    counts state["step"] (a CPU tensor); fastnn's op ran its fake there, counting nothing."""
    counts = []
    for opt_cls, kw in (
        (getattr(fastnn.optim, cls), {}),
        (getattr(torch.optim, cls), {"foreach": False}),
    ):
        p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        opt = opt_cls([p], lr=0.1, **kw)
        for _ in range(2):
            p.grad = torch.empty(4, 3, device="meta")
            opt.step()
        counts.append(opt.state[p]["step"])
    assert counts[0].device == counts[1].device
    assert counts[0].item() == counts[1].item() == 2


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
@pytest.mark.parametrize("compiled", [None, "aot_eager", "inductor"])
def test_complex_params(backend, cls, compiled):
    """As real views; compiled too, where the op writes copies of them (torch 2.14's
    functionalization of the op writing the real views themselves failed under both
    backends)."""
    skip_unless_available(backend, cls.lower(), "cpu")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    grads = [[torch.randn(5, 3, dtype=torch.complex64, generator=g)] for _ in range(STEPS)]
    ours, ref = [torch.nn.Parameter(base.clone())], [torch.nn.Parameter(base.clone())]
    kw = dict(lr=0.01, weight_decay=0.1)
    opt = getattr(fastnn.optim, cls)(ours, **kw)
    torch._dynamo.reset()
    if compiled:
        opt.step = torch.compile(opt.step, backend=compiled)
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


def _grads_in_one_buffer(params, grads):
    """grads as views into one flat buffer, two elements apart, each laid out as its param
    (DDP's gradient_as_bucket_view, FSDP2's reduce-scatter output): views with storage offsets,
    aliasing each other."""
    flat = torch.zeros(sum(p.numel() + 2 for p in params), dtype=params[0].dtype)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        view = flat[offset : offset + p.numel()].as_strided(p.shape, p.stride())
        p.grad = view.copy_(g)
        offset += p.numel() + 2


def _separate_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "set_grads", [_separate_grads, _grads_in_one_buffer], ids=["separate", "one_buffer"]
)
@pytest.mark.parametrize(
    "cls,kw",
    [("Adam", dict(amsgrad=True)), ("AdamW", {}), ("RMSprop", dict(momentum=0.9, centered=True))],
)
def test_compiled_step_matches_eager(backend, cls, kw, set_grads):
    """torch.compile(fullgraph=True) of a function calling step(): the update ops trace as
    opaque calls and the compiled steps follow torch's eager trajectory, the grads only read.
    Also over grads aliasing one buffer: with them declared written (the op that unscales
    them), torch 2.14's Inductor raised there, or read the wrong elements (FSDP2, or clones of
    such grads), silently; step() without a grad_scale calls the op that only reads them.
    The first param is transposed: Dynamo failed comparing its grad's strides at offset 0."""
    skip_unless_available(backend, "adam", "cpu")
    torch._dynamo.reset()
    params = [torch.randn(6, 4).t(), *make_params(backend=backend)]
    grads = make_grads(params, 3)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False, **kw)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    with fastnn.use_backend(backend):
        for step_grads in grads:
            set_grads(ours, step_grads)
            compiled_step()
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    assert_states_close(opt, ref_opt, ours, ref)
    for p, g in zip(ours, grads[-1], strict=True):
        assert torch.equal(p.grad, g), "the grads were written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_fused_scaler_step_unscales_grads_that_are_views_of_one_buffer(backend):
    """The fused GradScaler protocol (grad_scale / found_inf set on a fused=True optimizer)
    compiled with Inductor over grads aliasing one buffer: the grads come out unscaled and the
    params follow torch's step on the unscaled grads; a step with an inf changes nothing."""
    skip_unless_available(backend, "adam", "cpu")
    torch._dynamo.reset()
    params = make_params(backend=backend)
    grads = make_grads(params, 3)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt = fastnn.optim.AdamW(ours, lr=0.01, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, foreach=False)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    compiled_step = torch.compile(opt.step)
    with fastnn.use_backend(backend):
        for step_grads in grads:
            _grads_in_one_buffer(ours, [4 * g for g in step_grads])
            compiled_step()
        for p, g in zip(ours, grads[-1], strict=True):
            assert torch.equal(p.grad, g), "grads unscaled in place"
        before = [p.detach().clone() for p in ours]
        opt.found_inf.fill_(1.0)
        _grads_in_one_buffer(ours, grads[0])
        compiled_step()
    for p, b, g in zip(ours, before, grads[0], strict=True):
        assert torch.equal(p, b) and torch.equal(p.grad, g), "a step with an inf wrote"
    run(ref_opt, ref, grads)
    assert_params_close(ours, ref)


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
