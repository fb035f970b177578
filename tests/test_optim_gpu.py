"""fastnn optimizers on a CUDA device (skipped without one): trajectories against torch.optim's
for-loop on the GPU for every backend, the native CUDA kernels' bits against the CPU kernels', no
host synchronisation in step(), the fused GradScaler protocol in capturable mode, and CUDA-graph
capture of step()."""

import pytest
import torch
from conftest import BACKENDS, skip_unless_available
from optim_cases import centered_rmsprop_at_cancellation
from tolerances import FORWARD, assert_rel_close

import fastnn
from fastnn.optim import Adam, AdamW, RMSprop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# Sizes around the kernels' boundaries: 1, odd, a few 64K chunks plus a tail, 0.
SHAPES = [(1,), (33, 7), (3 * 65536 + 5,), (0,), (256, 1024)]
STEPS = 20
CASES = [
    ("Adam", dict(weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(maximize=True, betas=(0.8, 0.9))),
    ("AdamW", dict(weight_decay=0.1)),
    ("RMSprop", dict(weight_decay=0.1, momentum=0.9, centered=True)),
    ("RMSprop", dict(alpha=0.9)),
]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=g).to(dtype) for s in SHAPES]


def _grads(params, steps, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [[torch.randn(p.shape, device="cuda", generator=g).to(p.dtype) for p in params]
            for _ in range(steps)]  # fmt: skip


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("capturable", [False, True])
def test_trajectory_cuda(backend, cls, kw, capturable):
    skip_unless_available(backend, cls.lower().rstrip("w"), "cuda")
    params = _params()
    grads = _grads(params, STEPS)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    lr = torch.tensor(0.01, device="cuda") if capturable else 0.01
    opt = getattr(fastnn.optim, cls)(ours, lr=lr, capturable=capturable, **kw)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False, **kw)
    with fastnn.use_backend(backend):
        _run(opt, ours, grads)
    _run(ref_opt, ref, grads)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_rel_close(a.detach(), b.detach().double(), torch.float32, FORWARD, f"param {i}")


# Every CUDA case in fp32 at lr 0.01, and fp64 AdamW at an lr and weight decay whose
# 1 - lr * wd rounds differently in double when fused (tests/test_optim_math_contraction.py).
BITWISE_CASES = [(cls, kw, 0.01, torch.float32) for cls, kw in CASES] + [
    ("AdamW", dict(weight_decay=0.0889), 0.0909, torch.float64)
]


@pytest.mark.parametrize("cls,kw,lr,dtype", BITWISE_CASES)
def test_native_cuda_steps_give_the_cpu_kernels_bits(cls, kw, lr, dtype):
    """One header (fastnn/adam_math.h, rmsprop_math.h) for both devices, IEEE sqrt and division
    on both, a fused multiply-add exactly where it writes fma_ (mul_ keeps nvcc from contracting
    the others); per tensor the coefficients are computed in double from the same host-side lr
    and bias corrections (glibc's pow on the host step counts: not capturable, whose device
    steps go through CUDA's pow): the CUDA kernels' 20 steps must land on the CPU kernels' bits."""
    for device in ("cuda", "cpu"):
        skip_unless_available("native", cls.lower().rstrip("w"), device)
    params = _params(dtype)
    grads = _grads(params, STEPS)
    on_gpu = [torch.nn.Parameter(p.clone()) for p in params]
    on_cpu = [torch.nn.Parameter(p.cpu()) for p in params]
    opts = [getattr(fastnn.optim, cls)(ps, lr=lr, **kw) for ps in (on_gpu, on_cpu)]
    with fastnn.use_backend("native"):
        _run(opts[0], on_gpu, grads)
        _run(opts[1], on_cpu, [[g.cpu() for g in gs] for gs in grads])
    for i, (a, b) in enumerate(zip(on_gpu, on_cpu, strict=True)):
        differ = (a.detach().cpu() != b.detach()).sum().item()
        assert differ == 0, f"param {i} {list(a.shape)}: {differ} elements off the CPU's bits"


@pytest.mark.parametrize("backend", ["native", "triton"])  # the reference may sync: the oracle
@pytest.mark.parametrize("capturable", [False, True])
def test_step_does_not_sync(backend, capturable):
    skip_unless_available(backend, "adam", "cuda")
    params = [torch.nn.Parameter(p) for p in _params()]
    opt = AdamW(params, lr=torch.tensor(0.01, device="cuda"), capturable=capturable)
    for p in params:
        p.grad = torch.randn_like(p)
    with fastnn.use_backend(backend):
        opt.step()  # state creation and table building may allocate; the next steps may not sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_rmsprop_rounds_its_variance_once_as_torch_cuda(backend):
    skip_unless_available(backend, "rmsprop", "cuda")
    centered_rmsprop_at_cancellation(backend, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_master_weights_bf16_cuda(backend, cls, grad_dtype):
    # fp32 grads (Tensor.grad_dtype) are read unrounded: the masters follow the fp32 run fed them.
    skip_unless_available(backend, cls.lower(), "cuda")
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip(f"torch {torch.__version__} has no Tensor.grad_dtype")
    params = _params(torch.bfloat16)
    grads = _grads([p.to(grad_dtype) for p in params], STEPS)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    for p in ours:
        p.grad_dtype = grad_dtype
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01, master_weights=True)
    ref_opt = getattr(torch.optim, cls)(ref32, lr=0.01, foreach=False)
    with fastnn.use_backend(backend):
        _run(opt, ours, grads)
    _run(ref_opt, ref32, [[g.float() for g in gs] for gs in grads])
    for i, (p, r) in enumerate(zip(ours, ref32, strict=True)):
        master = opt.state[p]["master_param"]
        assert_rel_close(master, r.detach().double(), torch.float32, FORWARD, f"master {i}")
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_fused_protocol_cuda(backend):
    skip_unless_available(backend, "adam", "cuda")
    params = _params()
    grads = _grads(params, 5)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Adam(ours, lr=0.01, fused=True)
    ref_opt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=1000)
    with fastnn.use_backend(backend):
        for step, gs in enumerate(grads):
            for p in ours:
                p.grad = None
            loss = sum((p * g).sum() for p, g in zip(ours, gs, strict=True))
            scaler.scale(loss).backward()  # grads g * 4096: exact (a power of two)
            if step == 2:
                ours[1].grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in ours]
            scaler.step(opt)
            scaler.update()
            if step == 2:
                assert all(torch.equal(a, b) for a, b in zip(ours, before, strict=True))
            else:
                _run(ref_opt, ref, [gs])
    assert float(opt.state[ours[0]]["step"]) == 4
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_rel_close(a.detach(), b.detach().double(), torch.float32, FORWARD, f"param {i}")


def _evict_launch_tables():
    """More distinct launch tables than the Triton launcher caches (64), each reusing memory the
    previous ones freed: a table a graph captured must outlive this."""
    for i in range(80):
        p = torch.nn.Parameter(torch.randn(1000 + i, device="cuda"))
        p.grad = torch.randn_like(p)
        fastnn.optim.Adam([p], lr=0.1).step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_cuda_graph_capture(backend, cls):
    # Capturable mode: lr and step live on the GPU, so a captured step() replays correctly with
    # new grads and a new lr, and matches eager steps.
    skip_unless_available(backend, cls.lower(), "cuda")
    params = _params()
    grads = _grads(params, 6)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    eager = [torch.nn.Parameter(p.clone()) for p in params]
    lr = torch.tensor(0.01, device="cuda")
    opt = getattr(fastnn.optim, cls)(ours, lr=lr, capturable=True)
    eager_opt = getattr(fastnn.optim, cls)(eager, lr=torch.tensor(0.01, device="cuda"))
    for p, g in zip(ours, grads[0], strict=True):
        p.grad = g.clone()  # static grads, refilled before each replay
    with fastnn.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()  # warm-up: state, compiled kernels, launch tables
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        # The capture itself ran nothing: replay steps 2..6 (the warm-up was step 1).
        _run(eager_opt, eager, grads[:1])
        _evict_launch_tables()
        for step, gs in enumerate(grads[1:]):
            if step == 3:
                lr.fill_(0.003)
                eager_opt.param_groups[0]["lr"].fill_(0.003)
            for p, g in zip(ours, gs, strict=True):
                p.grad.copy_(g)
            graph.replay()
            _run(eager_opt, eager, [gs])
    torch.cuda.synchronize()
    assert float(opt.state[ours[0]]["step"]) == 6
    for i, (a, b) in enumerate(zip(ours, eager, strict=True)):
        assert_rel_close(a.detach(), b.detach().double(), torch.float32, FORWARD, f"param {i}")


def test_auto_backend_on_cuda_is_not_torch_when_kernels_exist():
    # With a kernel available, auto must not fall back to the reference on a GPU.
    from fastnn import _backend

    kernels = [
        b for b in ("native", "triton") if _backend.unavailable_reason(b, "adam", "cuda") is None
    ]
    if not kernels:
        pytest.skip("no Adam kernel for CUDA here (neither the extension's nor Triton's)")
    assert _backend.resolve("adam", "cuda") in kernels


def test_adam_and_adamw_classes_on_cuda_share_state_layout():
    p = torch.nn.Parameter(torch.randn(10, device="cuda"))
    for cls in (Adam, AdamW, RMSprop):
        opt = cls([p], lr=0.01, capturable=True)
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state[p]["step"].device == p.device
