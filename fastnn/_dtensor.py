"""DTensor inputs (tensor and sequence parallelism, torch.distributed.tensor): the norms and the
GLU family run on each rank's local shard, as torch's own sharding rules for F.rms_norm /
F.layer_norm and elementwise ops do, and return DTensors of the input's layout.

The kernels need whole rows: a norm input sharded over a normalized dim, or a packed GLU input
over its last dim, is gathered on that mesh dim first; a Partial (pending sum) input is summed
first. Weight and bias are replicated, and their local gradients are partial sums over the mesh
dims the input is sharded on (declared Partial, so DTensor sums them where the parameter needs
it). A plain tensor mixed with DTensors raises, as torch's ops do: its gradient would silently
miss the other ranks' rows.
"""

import sys

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t):
    # Plain tensors return first: every norm / GLU call and step() ask this. No DTensor exists
    # before torch.distributed.tensor is imported, so it is not imported here. (isinstance,
    # which torch.compile traces; a check of the class name and hasattr(t, "to_local") did not
    # see DTensors there.)
    if type(t) in _PLAIN:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def any_dtensor(*tensors):
    # (a loop, not any() over a generator: 0.2 us instead of 0.47 for a LayerNorm call's four
    # tensors, one AMD EPYC core)
    for t in tensors:
        if t is not None and type(t) not in _PLAIN and is_dtensor(t):
            return True
    return False


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _whole(placements, first_whole_dim):
    """placements with Partial and Shard(d >= first_whole_dim) made Replicate."""
    from torch.distributed.tensor import Replicate

    return [
        Replicate() if p.is_partial() or (p.is_shard() and p.dim >= first_whole_dim) else p
        for p in placements
    ]


def _redistributed(t, placements):
    return t if list(t.placements) == list(placements) else t.redistribute(placements=placements)


def _like(t, name, ref, ref_name, placements):
    """t (a DTensor on ref's mesh) redistributed to `placements`."""
    if t is None:
        return None
    if not is_dtensor(t):
        raise RuntimeError(
            f"fastnn: {ref_name} is a DTensor but {name} is a torch.Tensor; make {name} a "
            "DTensor on the same mesh (parallelize_module does, for module parameters)"
        )
    if t.device_mesh != ref.device_mesh:
        raise RuntimeError(
            f"fastnn: {name} and {ref_name} are DTensors on different device meshes "
            f"({t.device_mesh} and {ref.device_mesh})"
        )
    return _redistributed(t, placements)


def _from_local(t, mesh, placements, shape):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t, mesh, placements, run_check=False, shape=shape, stride=_contiguous_strides(shape)
    )


def norm(call, input, residual, params, normalized_dims):
    """A norm over the last `normalized_dims` dims of DTensor input, on local shards:
    call(input, residual, *params) runs fastnn's norm on local tensors; params is a list of
    (name, tensor or None)."""
    from torch.distributed.tensor import Partial, Replicate

    if not is_dtensor(input):
        name = next(n for n, t in [("residual", residual), *params] if is_dtensor(t))
        raise RuntimeError(
            f"fastnn: {name} is a DTensor but input is a torch.Tensor; make input a DTensor "
            "on the same mesh"
        )
    mesh = input.device_mesh
    placements = _whole(input.placements, input.dim() - normalized_dims)
    x = _redistributed(input, placements)
    r = _like(residual, "residual", input, "input", placements)
    replicated = [Replicate()] * mesh.ndim
    # Each rank's weight / bias gradient sums its own rows: a partial sum where rows are split.
    partial = [Partial() if p.is_shard() else Replicate() for p in placements]
    local_params = [
        None
        if p is None
        else _like(p, name, input, "input", replicated).to_local(grad_placements=partial)
        for name, p in params
    ]
    result = call(x.to_local(), None if r is None else r.to_local(), *local_params)
    if residual is None:
        return _from_local(result, mesh, placements, input.shape)
    return tuple(_from_local(t, mesh, placements, input.shape) for t in result)


def glu(call, gate, up):
    """act(gate) * up on local shards of DTensor gate and up (up=None: packed [gate | up], its
    last dim whole on every rank); call(gate, up) runs fastnn's GLU on local tensors."""
    if not is_dtensor(gate):
        raise RuntimeError(
            "fastnn: up is a DTensor but gate is a torch.Tensor; make gate a DTensor on the "
            "same mesh"
        )
    mesh = gate.device_mesh
    packed = up is None
    placements = _whole(gate.placements, gate.dim() - 1 if packed else gate.dim())
    g = _redistributed(gate, placements)
    u = _like(up, "up", gate, "gate", placements)
    out = call(g.to_local(), None if u is None else u.to_local())
    shape = (*gate.shape[:-1], gate.shape[-1] // 2) if packed else gate.shape
    return _from_local(out, mesh, placements, torch.Size(shape))
