"""The norms and the GLU family on DTensors (tensor / sequence parallelism) on 2 gloo ranks: each
result, its layout and its gradients against torch's unsharded formula, on every backend.

One spawn runs every check (starting two processes that import torch costs seconds)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import two_ranks
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, assert_rel_close

D = 8


def _close(got, want, kind, what):
    from torch.distributed.tensor import DTensor

    got = got.full_tensor() if isinstance(got, DTensor) else got
    assert_rel_close(got.detach(), want.detach().double(), torch.float32, kind, what)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_sequence_parallel(mesh, rank):
    """parallelize_module(SequenceParallel()) on fastnn's modules, as on torch's: the sequence
    dim sharded, outputs and weight gradients DTensors matching the unsharded module."""
    import copy

    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    import fastnn

    x, dy = _randn(2, 4, D, seed=1), _randn(2, 4, D, seed=2)
    for cls in (fastnn.RMSNorm, fastnn.LayerNorm):
        module = cls(D)
        with torch.no_grad():
            module.weight.copy_(_randn(D, seed=3))
        sharded = parallelize_module(copy.deepcopy(module), mesh, SequenceParallel())
        x_local = distribute_tensor(x, mesh, [Shard(1)]).to_local().requires_grad_()
        y = sharded(x_local)
        assert isinstance(y, DTensor) and y.placements == (Shard(1),)
        y.backward(distribute_tensor(dy, mesh, [Shard(1)]))
        x_ref = x.clone().requires_grad_()
        y_ref = module(x_ref)
        y_ref.backward(dy)
        name = cls.__name__
        _close(y, y_ref, FORWARD, f"{name} output")
        want = x_ref.grad.chunk(two_ranks.WORLD, dim=1)[rank]
        _close(x_local.grad, want, INPUT_GRAD, f"{name} input grad")
        _close(sharded.weight.grad, module.weight.grad, PARAM_GRAD, f"{name} weight grad")
        # A fused residual by keyword, as a DTensor (SequenceParallel's input hook passes on
        # the first positional argument alone): both results sharded as the input.
        r = _randn(2, 4, D, seed=4)
        y, s = sharded(x_local.detach(), residual=distribute_tensor(r, mesh, [Shard(1)]))
        assert y.placements == s.placements == (Shard(1),)
        y_ref, s_ref = module(x, residual=r)
        _close(y, y_ref, FORWARD, f"{name} output with a residual")
        _close(s, s_ref, FORWARD, f"{name} residual sum")
        local_r = distribute_tensor(r, mesh, [Shard(1)]).to_local()
        try:
            sharded(x_local.detach(), residual=local_r)
        except RuntimeError as e:
            assert "pass the residual as a DTensor too" in str(e), str(e)
        else:
            raise AssertionError("a local residual beside a sequence-sharded input went unseen")


def _check_optimizer_takes_partial_grads(mesh):
    """A SequenceParallel norm's weight grad is a Partial sum on a Replicate param: fastnn's
    optimizers sum it first (torch.optim's ops do so implicitly) and step as on one process."""
    import copy

    from torch.distributed.tensor import Partial, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    import fastnn

    module = fastnn.RMSNorm(D)
    x = _randn(2, 4, D, seed=9)
    sharded = parallelize_module(copy.deepcopy(module), mesh, SequenceParallel())
    opt = fastnn.optim.AdamW(sharded.parameters(), lr=0.1)
    ref_opt = torch.optim.AdamW(module.parameters(), lr=0.1, foreach=False)
    for _ in range(2):
        sharded(distribute_tensor(x, mesh, [Shard(1)]).to_local()).to_local().sin().sum().backward()
        assert sharded.weight.grad.placements == (Partial(),)
        opt.step()
        opt.zero_grad()
        module(x).sin().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _close(sharded.weight, module.weight, FORWARD, "AdamW on a Partial grad")


def _check_compiled(mesh):
    """torch.compile of a SequenceParallel norm traces the DTensor path (no graph break into
    the op with DTensor arguments, which has no sharding rule) and matches eager."""
    import copy

    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    import fastnn

    module = parallelize_module(fastnn.RMSNorm(D), mesh, SequenceParallel())
    compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
    x = distribute_tensor(_randn(2, 4, D, seed=8), mesh, [Shard(1)]).to_local()
    for m in (module, compiled):
        m(x).to_local().sin().sum().backward()
    _close(compiled.weight.grad, module.weight.grad.full_tensor(), PARAM_GRAD, "compiled")


def _check_fused_residual(mesh):
    """rms_norm / layer_norm(input, residual=) on DTensors sharded unevenly (5 rows on 2 ranks),
    and sharded over the normalized dim (gathered first), against torch's unfused norm(x + r)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastnn.functional as FF

    x, r, w, b = (
        _randn(2, 5, D, seed=4),
        _randn(2, 5, D, seed=5),
        _randn(D, seed=6),
        _randn(D, seed=7),
    )
    for kind in ("rms_norm", "layer_norm"):
        for dim in (1, 2):
            shard = [Shard(dim)]
            leaves = [distribute_tensor(t, mesh, shard).requires_grad_() for t in (x, r)]
            leaves += [distribute_tensor(t, mesh, [Replicate()]).requires_grad_() for t in (w, b)]
            refs = [t.clone().requires_grad_() for t in (x, r, w, b)]
            if kind == "rms_norm":
                y, s = FF.rms_norm(leaves[0], (D,), leaves[2], 1e-6, residual=leaves[1])
                s_ref = refs[0] + refs[1]
                y_ref = F.rms_norm(s_ref, (D,), refs[2], 1e-6)
                used = 3
            else:
                y, s = FF.layer_norm(leaves[0], (D,), *leaves[2:], 1e-6, residual=leaves[1])
                s_ref = refs[0] + refs[1]
                y_ref = F.layer_norm(s_ref, (D,), *refs[2:], 1e-6)
                used = 4
            # Rows stay sharded; a sharded normalized dim was gathered (whole rows).
            assert y.placements == s.placements == (Shard(1) if dim == 1 else Replicate(),)
            (y.sin() + s.square()).sum().backward()
            (y_ref.sin() + s_ref.square()).sum().backward()
            what = f"{kind} Shard({dim})"
            _close(y, y_ref, FORWARD, f"{what} output")
            _close(s, s_ref, FORWARD, f"{what} residual sum")
            for name, leaf, ref in zip("xrwb"[:used], leaves, refs, strict=False):
                kind_of = INPUT_GRAD if name in "xr" else PARAM_GRAD
                _close(leaf.grad, ref.grad, kind_of, f"{what} grad {name}")


def _check_partial_input(mesh, rank):
    """A Partial (pending sum) input, as a row-parallel Linear leaves it, is summed first."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    import fastnn.functional as FF

    parts = [_randn(3, D, seed=10 + i) for i in range(two_ranks.WORLD)]
    x = DTensor.from_local(parts[rank], mesh, [Partial()])
    y = FF.rms_norm(x, (D,), None, 1e-6)
    assert y.placements == (Replicate(),)
    _close(y, F.rms_norm(sum(parts), (D,), None, 1e-6), FORWARD, "Partial input")


def _check_glu(mesh):
    """GLU on the intermediate dim sharded (a column-parallel gate / up projection's output);
    packed [gate | up] sharded on its last dim is gathered first (each rank needs both halves)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastnn.functional as FF

    g, u = _randn(2, 5, 6, seed=20), _randn(2, 5, 6, seed=21)
    leaves = [distribute_tensor(t, mesh, [Shard(2)]).requires_grad_() for t in (g, u)]
    h = FF.glu_family(*leaves, "gelu_tanh")
    assert h.placements == (Shard(2),)
    refs = [t.clone().requires_grad_() for t in (g, u)]
    h_ref = F.gelu(refs[0], approximate="tanh") * refs[1]
    h.sin().sum().backward()
    h_ref.sin().sum().backward()
    _close(h, h_ref, FORWARD, "GLU output")
    for name, leaf, ref in zip(("gate", "up"), leaves, refs, strict=True):
        _close(leaf.grad, ref.grad, INPUT_GRAD, f"GLU grad {name}")
    packed = distribute_tensor(torch.cat([g, u], dim=-1), mesh, [Shard(2)])
    h = FF.swiglu(packed)
    assert h.placements == (Replicate(),) and h.shape == g.shape
    _close(h, F.silu(g) * u, FORWARD, "packed GLU output")


def _check_mixed_is_refused(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastnn.functional as FF

    x = distribute_tensor(_randn(2, 4, D, seed=30), mesh, [Shard(0)])
    with pytest.raises(RuntimeError, match="input is a DTensor but weight is a torch.Tensor"):
        FF.rms_norm(x, (D,), torch.ones(D))
    with pytest.raises(RuntimeError, match="residual is a DTensor but input is a torch.Tensor"):
        FF.layer_norm(torch.ones(2, 4, D), (D,), residual=x)
    # inplace_backward=True over a DTensor parameter: its local shard is no leaf, the DTensor is.
    w = torch.nn.Parameter(distribute_tensor(_randn(2, 4, D, seed=31), mesh, [Shard(0)]))
    with pytest.raises(RuntimeError, match="over gate, a leaf tensor that requires grad"):
        FF.swiglu(w, w * 2.0, inplace_backward=True)


def run_checks(rank):
    """Every check on every backend that has the norms and the GLU on the CPU here; returns
    the backends that ran."""
    from torch.distributed.device_mesh import init_device_mesh

    import fastnn
    from fastnn import _backend

    mesh = init_device_mesh("cpu", (two_ranks.WORLD,))
    ran = []
    for backend in ("torch", "native", "triton"):
        families = ("rms_norm", "layer_norm", "glu")
        if any(_backend.unavailable_reason(backend, f, "cpu") for f in families):
            continue
        with fastnn.use_backend(backend):
            _check_sequence_parallel(mesh, rank)
            _check_fused_residual(mesh)
            _check_partial_input(mesh, rank)
            _check_glu(mesh)
        ran.append(backend)
    _check_mixed_is_refused(mesh)
    _check_compiled(mesh)
    _check_optimizer_takes_partial_grads(mesh)
    return " ".join(ran)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_dtensor_inputs_match_unsharded_torch(tmp_path):
    from fastnn import _backend

    expected = [
        b
        for b in ("torch", "native", "triton")
        if not any(
            _backend.unavailable_reason(b, f, "cpu") for f in ("rms_norm", "layer_norm", "glu")
        )
    ]
    assert "torch" in expected
    assert two_ranks.run(run_checks, tmp_path) == [" ".join(expected)] * two_ranks.WORLD
