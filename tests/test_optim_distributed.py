"""fastnn optimizers under torch.distributed on 2 gloo ranks (127.0.0.1, a free port, processes
from torch.multiprocessing.spawn): DDP with gradients as bucket views, ZeroRedundancyOptimizer
(each rank's fastnn optimizer holds and updates its own share of the params), and FSDP2
(fully_shard on a CPU device mesh, DTensor params updated on their local shards; also with a
compiled step). Each must match
a single-process torch.optim run on the whole batch. And an FSDP2 run checkpointed with
torch.distributed.checkpoint halfway, resumed in fresh objects, must end on the bits of the run
that was never interrupted.

One spawn runs every check on every available backend: starting two processes that import torch
costs seconds, the checks themselves milliseconds."""

import pytest
import torch
import torch.distributed as dist
import two_ranks
from two_ranks import WORLD

STEPS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def _train(model, opt, rank, world, steps=range(STEPS), step_fn=None):
    """Steps on this rank's share of each global batch (everything when world == 1), in the
    model's dtype; step_fn (default opt.step) makes each update."""
    dtype = next(model.parameters()).dtype
    for step in steps:
        x, y = _batch(step)
        x, y = x.chunk(world)[rank].to(dtype), y.chunk(world)[rank].to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        (step_fn or opt.step)()


def _reference(torch_cls, **kw):
    model = _model()
    _train(model, torch_cls(model.parameters(), foreach=False, **kw), 0, 1)
    return [p.detach() for p in model.parameters()]


def _assert_matches_reference(params, what, torch_cls, **kw):
    """Each param (whole tensors) against torch_cls's single-process run with options kw."""
    from tolerances import assert_rel_close

    for i, (p, r) in enumerate(zip(params, _reference(torch_cls, **kw), strict=True)):
        assert_rel_close(p.detach(), r.double(), torch.float32, what=f"{what} param {i}")


def _check_ddp(rank, backend):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastnn

    model = DDP(_model(), gradient_as_bucket_view=True)
    opt = fastnn.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with fastnn.use_backend(backend):
        _train(model, opt, rank, WORLD)
    _assert_matches_reference(
        model.parameters(), f"DDP {backend}", torch.optim.AdamW, lr=0.01, weight_decay=0.1
    )


def _check_zero(rank, backend):
    """ZeRO-1: torch's ZeroRedundancyOptimizer builds one fastnn optimizer per rank over its share
    of the params and broadcasts the updated params; the consolidated state_dict is torch's."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastnn

    model = DDP(_model())
    kw = dict(lr=0.01, amsgrad=True)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastnn.optim.Adam, **kw)
    with fastnn.use_backend(backend):
        _train(model, opt, rank, WORLD)
    params = list(model.parameters())
    assert 0 < len(opt.optim.state) < len(params), "each rank steps only its own share"
    _assert_matches_reference(params, f"ZeRO {backend}", torch.optim.Adam, **kw)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        state = opt.state_dict()["state"]
        keys = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert sorted(state) == list(range(len(params))), f"ZeRO {backend}: {sorted(state)}"
        assert all(set(s) == keys for s in state.values()), f"ZeRO {backend}: {state[0].keys()}"


def _check_fsdp2(rank, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastnn

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    fully_shard(model, mesh=mesh)
    opt = fastnn.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5, centered=True)
    with fastnn.use_backend(backend):
        _train(model, opt, rank, WORLD)
    for p in model.parameters():
        assert isinstance(p, DTensor)
        # State is kept as torch.optim keeps it for DTensor params: sharded like the param.
        state = opt.state[p]
        assert isinstance(state["square_avg"], DTensor)
        assert state["square_avg"].placements == p.placements
    whole = [p.full_tensor() for p in model.parameters()]
    kw = dict(lr=0.01, momentum=0.5, centered=True)
    _assert_matches_reference(whole, f"FSDP2 {backend}", torch.optim.RMSprop, **kw)


def _check_fsdp2_compiled_step(rank, backend):
    """torch.compile(opt.step) over FSDP2 params, whose grads are views into one reduce-scatter
    buffer. With DTensors as the graph's inputs (to_local()) AOTAutograd guarded on size
    symbols Dynamo never saw: IndexError in guard building (torch 2.14); with the grads declared
    written, Inductor raised or, from a warm cache, read the wrong elements of them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fastnn

    mesh = init_device_mesh("cpu", (WORLD,))
    kw = dict(lr=0.01, weight_decay=0.1)
    for compile_backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = fastnn.optim.AdamW(model.parameters(), **kw)
        step = torch.compile(opt.step, backend=compile_backend)
        with fastnn.use_backend(backend):
            _train(model, opt, rank, WORLD, step_fn=step)
        whole = [p.full_tensor() for p in model.parameters()]
        what = f"FSDP2 compiled ({compile_backend}) {backend}"
        _assert_matches_reference(whole, what, torch.optim.AdamW, **kw)
    if backend == "triton":
        return  # (its interpreter truncates fp32 -> bf16: a compiled step restarts the masters)
    # bf16 params with fp32 masters, which a compiled step checks against the params each step:
    # that check wrote the master DTensor and the op its shard, two write-backs into one graph
    # input (AOTAutograd's assert_functional_graph raised). The same bits as an eager run.
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model().to(torch.bfloat16)
        fully_shard(model, mesh=mesh)
        opt = fastnn.optim.AdamW(model.parameters(), master_weights=True, **kw)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else None
        with fastnn.use_backend(backend):
            _train(model, opt, rank, WORLD, step_fn=step)
        runs.append([p.full_tensor() for p in model.parameters()])
    for i, (compiled, eager) in enumerate(zip(runs[1], runs[0], strict=True)):
        assert torch.equal(compiled, eager), f"FSDP2 compiled bf16 masters {backend} param {i}"


def _check_fsdp2_checkpoint(rank, backend):
    """DCP save after 3 of 6 steps, load into a new model and optimizer, 3 more steps: the same
    bits as 6 uninterrupted steps. AdamW keeps fp32 master weights of a bf16 model (the
    state_dict hooks must keep them fp32 through the load), RMSprop all of its options."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastnn

    def whole_tensor(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    mesh = init_device_mesh("cpu", (WORLD,))
    # The Triton interpreter truncates fp32 -> bf16: its bf16 params are not their masters'
    # rounding, and a resumed optimizer restarts such masters from them (test_optim_state.py).
    low = torch.float32 if backend == "triton" else torch.bfloat16
    cases = [
        (fastnn.optim.AdamW, dict(lr=0.01, weight_decay=0.1, master_weights=True), low),
        (fastnn.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True), torch.float32),
    ]
    for k, (cls, kw, dtype) in enumerate(cases):

        def fresh(cls=cls, kw=kw, dtype=dtype):
            model = _model().to(dtype)
            fully_shard(model, mesh=mesh)
            return model, cls(model.parameters(), **kw)

        with fastnn.use_backend(backend):
            whole, whole_opt = fresh()
            _train(whole, whole_opt, rank, WORLD)
            first, first_opt = fresh()
            _train(first, first_opt, rank, WORLD, range(STEPS // 2))
            model_sd, optim_sd = get_state_dict(first, first_opt)
            path = os.path.join(os.environ["TWO_RANKS_DIR"], f"checkpoint-{backend}-{k}")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
            resumed, resumed_opt = fresh()
            model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=path)
            set_state_dict(
                resumed,
                resumed_opt,
                model_state_dict=loaded["model"],
                optim_state_dict=loaded["optim"],
            )
            _train(resumed, resumed_opt, rank, WORLD, range(STEPS // 2, STEPS))
        what = f"{cls.__name__} {backend}"
        for i, (a, b) in enumerate(zip(whole.parameters(), resumed.parameters(), strict=True)):
            assert torch.equal(a.full_tensor(), b.full_tensor()), f"{what}: param {i} differs"
            want, got = whole_opt.state[a], resumed_opt.state[b]
            assert set(got) == set(want), f"{what}: param {i} state {sorted(got)}"
            for key, value in got.items():
                same = torch.equal(whole_tensor(value), whole_tensor(want[key]))
                assert same and value.dtype == want[key].dtype, f"{what}: param {i} {key} differs"
                if key != "step":
                    assert value.dtype == torch.float32, f"{what}: {key} is {value.dtype}"


def run_checks(rank):
    """Every check on every backend that runs both optimizers on the CPU here; returns the
    backends that ran."""
    from fastnn import _backend

    ran = []
    for backend in ("torch", "native", "triton"):
        if _backend.unavailable_reason(backend, "adam", "cpu") is not None:
            continue
        if _backend.unavailable_reason(backend, "rmsprop", "cpu") is not None:
            continue
        _check_ddp(rank, backend)
        _check_zero(rank, backend)
        _check_fsdp2(rank, backend)
        _check_fsdp2_compiled_step(rank, backend)
        _check_fsdp2_checkpoint(rank, backend)
        ran.append(backend)
    return " ".join(ran)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_zero_fsdp2_and_checkpoint_resume(tmp_path):
    ran = two_ranks.run(run_checks, tmp_path)
    from fastnn import _backend

    # Every backend that runs both optimizers on the CPU here (triton only under the interpreter).
    expected = [
        b
        for b in ("torch", "native", "triton")
        if all(_backend.unavailable_reason(b, f, "cpu") is None for f in ("adam", "rmsprop"))
    ]
    assert "torch" in expected
    assert ran == [" ".join(expected)] * WORLD, (ran, expected)
