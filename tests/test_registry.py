"""The op registry: every schema exists for every backend with one signature, and every
registered op passes torch.library.opcheck (schema, fake tensor, autograd registration, AOT
dispatch) on the CPU."""

import pytest
import torch
from conftest import BACKENDS, skip_unless_available

from fastnn import _extension, ops

FAMILY = {
    "rms_norm_fwd": "rms_norm",
    "rms_norm_bwd": "rms_norm",
    "layer_norm_fwd": "layer_norm",
    "layer_norm_bwd": "layer_norm",
    "glu_fwd": "glu",
    "glu_bwd": "glu",
    "glu_packed_fwd": "glu",
    "glu_packed_bwd": "glu",
    "glu_bwd_": "glu",
    "glu_packed_bwd_": "glu",
    "adam_step_": "adam",
    "rmsprop_step_": "rmsprop",
    "adam_step_keep_grads_": "adam",
    "rmsprop_step_keep_grads_": "rmsprop",
}


def _args_of(schema):
    return str(schema).split("(", 1)[1]


def test_every_op_is_registered_for_every_backend():
    assert set(ops._SCHEMAS) == set(FAMILY)
    for name in FAMILY:
        for backend in ops.available_backends():
            assert ops.get(backend, name) is not None


@pytest.mark.skipif(not _extension.load(), reason="native extension not built")
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_python_schemas_equal_the_cpp_declarations(name):
    """fastnn::ref_<op> and fastnn::triton_<op> take exactly the arguments of fastnn::<op>."""
    native = ops.get("native", name)._schema
    for backend in ("torch", "triton"):
        other = ops.get(backend, name)._schema
        assert _args_of(other) == _args_of(native), f"{backend} {name}: {other} vs {native}"


@pytest.mark.skipif(not _extension.load(), reason="native extension not built")
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_native_ops_that_write_bump_versions(name):
    """A native op that writes an argument has the ADInplaceOrView kernel of csrc/library.cpp
    (which bumps the written tensors' versions); the others need none."""
    op = ops.get("native", name)
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(op._name, "ADInplaceOrView")
    assert has_kernel == writes, f"{name}: writes {writes}, ADInplaceOrView kernel {has_kernel}"


def _norm_cases(dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, requires_grad=False):
        t = torch.randn(*shape, generator=g, dtype=dtype)
        return t.requires_grad_(requires_grad)

    rows, n = 5, 12
    x, r = randn(rows, n, requires_grad=True), randn(rows, n, requires_grad=True)
    w, b = randn(n, requires_grad=True), randn(n, requires_grad=True)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rstd = torch.rand(rows, generator=g, dtype=stat) + 0.5
    mean = torch.randn(rows, generator=g, dtype=stat)
    dy = randn(rows, n)
    g2 = randn(rows, 2 * n, requires_grad=True)
    # Backward ops run inside a backward pass, on tensors that do not require grad.
    xd, rd, wd, bd, g2d = (t.detach() for t in (x, r, w, b, g2))
    return {
        "rms_norm_fwd": [(x, r, w, 1e-6), (x, None, None, 1e-5)],
        "rms_norm_bwd": [(dy, dy, xd, wd, rstd), (dy, None, xd, None, rstd)],
        "layer_norm_fwd": [(x, r, w, b, 1e-5), (x, None, w, None, 1e-5)],
        "layer_norm_bwd": [
            (dy, dy, xd, wd, bd, mean, rstd),
            (dy, None, xd, None, None, mean, rstd),
        ],
        "glu_fwd": [(x, r, "silu"), (x, r, "gelu_tanh")],
        "glu_bwd": [(dy, xd, rd, "silu"), (dy, xd, rd, "sigmoid")],
        "glu_packed_fwd": [(g2, "silu"), (g2, "relu")],
        "glu_packed_bwd": [(dy, g2d, "silu")],
    }


@pytest.mark.parametrize("backend", BACKENDS)
# The in-place ops (names ending in _) have their own opchecks: test_optim_api.py, test_glu.py.
@pytest.mark.parametrize("name", [n for n in sorted(FAMILY) if not n.endswith("_")])
def test_opcheck_layer_ops(backend, name):
    skip_unless_available(backend, FAMILY[name], "cpu")
    for args in _norm_cases(torch.float32)[name]:
        torch.library.opcheck(ops.get(backend, name), args)


def _optimizer_args(name):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=g), torch.randn(3, 4, generator=g)]
    grads = [torch.randn_like(p) for p in params]
    state = [[torch.rand_like(p) for p in params] for _ in range(3)]
    if name.startswith("adam"):
        steps = [torch.tensor(3.0) for _ in params]
        args = (params, grads, state[0], state[1], state[2], steps, [], None, None, None)
        kwargs = dict(
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            decoupled_weight_decay=True,
            amsgrad=True,
            maximize=False,
        )
    else:
        steps = [torch.tensor(3.0) for _ in params]
        args = (params, grads, state[0], state[1], state[2], steps, [], None, None, None)
        kwargs = dict(
            lr=1e-2,
            alpha=0.99,
            eps=1e-8,
            weight_decay=0.0,
            momentum=0.9,
            centered=True,
            maximize=False,
        )
    return args, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name", ["adam_step_", "rmsprop_step_", "adam_step_keep_grads_", "rmsprop_step_keep_grads_"]
)
def test_opcheck_optimizer_ops(backend, name):
    # The *_keep_grads_ twins' schemas say the grads are only read: opcheck holds them to it.
    skip_unless_available(backend, FAMILY[name], "cpu")
    args, kwargs = _optimizer_args(name)
    torch.library.opcheck(ops.get(backend, name), args, kwargs)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_registered_ops_double_backward(backend):
    """The registered ops (what torch.compile, export and jit.trace see) differentiate twice:
    each backward op's autograd is its reference's vector-Jacobian product."""
    skip_unless_available(backend, "rms_norm", "cpu")
    gen = torch.Generator().manual_seed(5)
    x, r, g, u = (torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    w, b = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2))
    gu = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    cases = [
        ("rms_norm_fwd", (x, r, w), lambda op, x, r, w: op(x, r, w, 1e-6)[:2]),
        ("layer_norm_fwd", (x, r, w, b), lambda op, x, r, w, b: op(x, r, w, b, 1e-6)[:2]),
        ("glu_fwd", (g, u), lambda op, g, u: op(g, u, "gelu")),
        ("glu_packed_fwd", (gu,), lambda op, gu: op(gu, "silu")),
    ]
    for name, inputs, call in cases:
        op = ops.get(backend, name)
        inputs = [t.clone().requires_grad_() for t in inputs]
        assert torch.autograd.gradgradcheck(lambda *a, op=op, call=call: call(op, *a), inputs)


@pytest.mark.skipif(not _extension.load(), reason="needs the built extension")
def test_an_extension_built_from_older_sources_is_named():
    """An op the Python side defines but the built fastnn._C lacks (sources pulled, extension
    not rebuilt): a clear error that says to rebuild, before anything is registered."""
    with pytest.raises(RuntimeError, match="built from older sources.*rebuild"):
        ops.define("op_the_extension_lacks", "(Tensor x) -> Tensor", None, "", None)
    assert "op_the_extension_lacks" not in ops._SCHEMAS
