"""The functional API against torch's own F.rms_norm / F.layer_norm / silu, on every backend."""

import contextlib
import itertools

import pytest
import tolerances
import torch
import torch.nn.functional as F
from conftest import BACKENDS, skip_unless_available
from torch.utils.checkpoint import checkpoint

import fastnn
from fastnn import functional as FF
from fastnn.functional import glu_family as imported_glu_family
from fastnn.functional import layer_norm as imported_layer_norm
from fastnn.functional import rms_norm as imported_rms_norm
from fastnn.functional import swiglu as imported_swiglu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 5)])
def test_rms_norm_matches_torch(backend, shape):
    skip_unless_available(backend, "rms_norm", "cpu")
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.rms_norm(x, (shape[-1],), w)
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_matches_torch(backend):
    skip_unless_available(backend, "layer_norm", "cpu")
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.layer_norm(x, (6,), w, b)
    torch.testing.assert_close(out, F.layer_norm(x, (6,), w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_torch(backend):
    skip_unless_available(backend, "glu", "cpu")
    g, u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    with fastnn.use_backend(backend):
        out = FF.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(g) * u)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_takes_an_integer_weight_as_torch(backend, weight_dtype, dtype):
    """torch's rms_norm multiplies its fp32 (fp64) result by any weight, so an integer or bool
    one works there; its layer_norm refuses one, as fastnn's does (the bad-input table)."""
    skip_unless_available(backend, "rms_norm", "cpu")
    x = torch.randn(3, 8, dtype=dtype)
    w = torch.tensor([0, 1, 2, 3, 1, 0, 5, 7]).to(weight_dtype)
    with fastnn.use_backend(backend):
        out = FF.rms_norm(x, (8,), w)
    assert out.dtype == F.rms_norm(x, (8,), w).dtype == dtype
    tolerances.assert_rel_close(out, F.rms_norm(x.double(), (8,), w.double()), dtype)


def _jagged(seed, requires_grad=False, offsets=None):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(7, 8, generator=g, dtype=torch.float64)
    if offsets is None:
        offsets = torch.tensor([0, 2, 7])
    nt = torch.nested.nested_tensor_from_jagged(values, offsets)
    return nt.detach().requires_grad_(requires_grad)


@pytest.mark.parametrize("fused", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_nested_input_as_torchs_norms(backend, op, fused):
    """A jagged nested tensor ([batch, ragged, N]) normalised over its last dim, as torch's
    norms take one: a nested result with the input's offsets, and its gradients. Its rows
    were flattened as a dense tensor's, an internal error."""
    skip_unless_available(backend, op, "cpu")
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    x = _jagged(0, requires_grad=True)
    r = _jagged(1, requires_grad=True, offsets=x.offsets()) if fused else None
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    r_ref = r.detach().clone().requires_grad_() if fused else None
    with fastnn.use_backend(backend):
        out = getattr(FF, op)(x, (8,), w, residual=r)
    s_ref = x_ref + r_ref if fused else x_ref
    ref = getattr(F, op)(s_ref, (8,), w_ref)
    outs, refs = (out, (ref, s_ref)) if fused else ((out,), (ref,))
    for got, want in zip(outs, refs, strict=True):
        assert got.is_nested and got.shape == x.shape
        torch.testing.assert_close(got.values(), want.values())
    dy = [torch.randn(7, 8, dtype=torch.float64) for _ in outs]
    torch.autograd.backward([o.values() for o in outs], dy)
    torch.autograd.backward([o.values() for o in refs], dy)
    for got, want in [(x, x_ref), (w, w_ref)] + ([(r, r_ref)] if fused else []):
        torch.testing.assert_close(got.grad.values() if got.is_nested else got.grad,
                                   want.grad.values() if want.is_nested else want.grad)  # fmt: skip


def test_nested_input_the_kernels_cannot_take_is_refused_clearly():
    x = _jagged(0)
    strided = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(5, 8)])
    with pytest.raises(RuntimeError, match="strided nested tensor"):
        FF.rms_norm(strided, (8,))
    with pytest.raises(RuntimeError, match="ragged dim 1"):
        FF.layer_norm(x, x.shape[-2:])
    other = _jagged(1, offsets=torch.tensor([0, 3, 7]))
    with pytest.raises(RuntimeError, match="residual of shape"):  # (as torch's x + r refuses)
        FF.rms_norm(x, (8,), residual=other)


# ---- Bad input: a clear error that names the problem ----------------------------------------


def _bad_norm_calls():
    """(fastnn call, the same call of torch's or None, the error type, message)."""
    x = torch.randn(3, 4)
    i64 = torch.ones(3, 4, dtype=torch.int64)
    return [
        (lambda m: m.rms_norm(x, (4,), torch.randn(5)), None, RuntimeError, "weight of shape \\[5\\]"),
        (lambda m: m.rms_norm(x, (5,)), F, RuntimeError, "does not end with normalized_shape \\[5\\]"),
        (lambda m: m.layer_norm(x, (4,), None, torch.randn(3)), F, RuntimeError, "bias of shape \\[3\\]"),
        (lambda m: m.rms_norm(i64, (4,)), F, NotImplementedError, "torch.int64"),
        (lambda m: m.layer_norm(i64, (4,)), F, NotImplementedError, "torch.int64"),
        (lambda m: m.layer_norm(x.to(torch.complex64), (4,)), F, NotImplementedError, "complex64"),
        (lambda m: m.layer_norm(x, (4,), torch.ones(4, dtype=torch.int32)), F, RuntimeError, "weight must be float"),
        (lambda m: m.rms_norm(x, ()), F, RuntimeError, "at least one dim"),
        (lambda m: m.layer_norm(x, ()), F, RuntimeError, "at least one dim"),
        (lambda m: m.rms_norm(x, 4.0), F, TypeError, "a tuple of ints, got 4.0"),
        (lambda m: m.layer_norm(x, (4.0,)), F, TypeError, "a tuple of ints"),
        (lambda m: m.rms_norm(x, 4), F, TypeError, "a tuple of ints, got 4 "),
        (lambda m: m.layer_norm(x, 4), F, TypeError, "a tuple of ints, got 4 "),
        (lambda m: m.rms_norm(x, (2, 3, 4)), F, ValueError, "fewer dims than normalized_shape"),
        (lambda m: m.rms_norm(torch.tensor(1.0), (1,)), F, ValueError, "fewer dims"),
        (lambda m: m.layer_norm(x, (2, 3, 4)), F, RuntimeError, "fewer dims than normalized_shape"),
        (lambda m: m.rms_norm(x, (4,), residual=torch.randn(3, 5)), None, RuntimeError, "residual of shape"),
        (
            lambda m: m.rms_norm(x, (4,), residual=torch.ones(3, 4, dtype=torch.int32)),
            None, RuntimeError, "residual must be float",
        ),
        (lambda m: m.rms_norm(x, (4,), torch.randn(4, device="meta")), None, RuntimeError, "weight is on meta"),
        (
            lambda m: m.layer_norm(x, (4,), residual=torch.randn(3, 4, device="meta")),
            None, RuntimeError, "residual is on meta",
        ),
        (lambda m: m.rms_norm(None, (4,)), F, TypeError, "input must be a Tensor, got NoneType"),
        (lambda m: m.layer_norm(x, (4,), [1.0] * 4), F, TypeError, "weight must be a Tensor, got list"),
        (lambda m: m.layer_norm(x, (4,), None, None, "a"), F, TypeError, "eps must be a float, got str"),
        (lambda m: m.layer_norm(x, (4,), None, None, None), F, TypeError, "eps must be a float, got NoneType"),
        (lambda m: m.rms_norm(x, (4,), None, torch.ones(1)), F, TypeError, "eps must be a float, got Tensor"),
        (
            lambda m: m.rms_norm(x, (4,), None, torch.tensor(0.1, requires_grad=True)),
            F, TypeError, "eps must be a float, got Tensor",
        ),
        (lambda m: m.layer_norm(x, True), F, TypeError, "a tuple of ints, got True"),
        (lambda m: m.layer_norm(x, [torch.tensor(4.0)]), F, TypeError, "a tuple of ints"),
        (lambda m: m.rms_norm(x, [torch.tensor([4, 4])]), F, TypeError, "a tuple of ints"),
        (
            lambda m: m.layer_norm(x, (4,), torch.ones(4, dtype=torch.float64)),
            F, RuntimeError, "float32 input takes weight and bias of its dtype",
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_norm_calls())))
def test_bad_norm_input_is_named(case):
    """A clear message, and the exception type torch raises for the same call, so that code
    catching torch's error catches fastnn's (NotImplementedError is a RuntimeError)."""
    call, torch_module, error, message = _bad_norm_calls()[case]
    with pytest.raises(error, match=message) as raised:
        call(FF)
    if torch_module is not None:
        with pytest.raises(Exception) as theirs:
            call(torch_module)
        assert isinstance(raised.value, type(theirs.value)), (type(theirs.value), theirs.value)


def test_normalized_shape_takes_integer_tensors_as_torch_does():
    x, w = torch.randn(3, 4), torch.randn(4)
    for shape in ([torch.tensor(4)], (torch.tensor([4]),), [torch.tensor(4, dtype=torch.int32)]):
        torch.testing.assert_close(FF.layer_norm(x, shape, w), F.layer_norm(x, shape, w))
        torch.testing.assert_close(FF.rms_norm(x, shape, w), F.rms_norm(x, shape, w))
    # Elements that are not integers: torch's error types (a bool tensor passes its argument
    # parser and fails after it)
    for shape, error in (([torch.tensor(True)], RuntimeError), ([torch.tensor(4.0)], TypeError)):
        for ours, theirs in ((FF.layer_norm, F.layer_norm), (FF.rms_norm, F.rms_norm)):
            with pytest.raises(error):
                theirs(x, shape)
            with pytest.raises(error, match="normalized_shape"):
                ours(x, shape)


def test_bad_glu_input_is_named():
    g = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"gate of shape \[3, 4\] and up of shape \[3, 5\]"):
        FF.swiglu(g, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"\[4\] differ; the GLU ops do not broadcast"):
        FF.swiglu(g, torch.randn(4))  # torch's silu(g) * u would broadcast
    with pytest.raises(RuntimeError, match="torch.bfloat16; the GLU ops do not promote"):
        FF.swiglu(g, g.bfloat16())
    with pytest.raises(RuntimeError, match="torch.int32"):
        FF.swiglu(g.int(), g.int())
    with pytest.raises(RuntimeError, match="up is on meta but gate is on cpu"):
        FF.swiglu(g, torch.randn(3, 4, device="meta"))
    with pytest.raises(RuntimeError, match="even last dim"):
        FF.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="unknown GLU activation 'tanh'"):
        FF.glu_family(g, g, "tanh")
    with pytest.raises(TypeError, match="up must be a Tensor, got float"):
        FF.swiglu(g, 2.0)
    with pytest.raises(TypeError, match="gate must be a Tensor, got list"):
        FF.glu_family([1.0, 2.0], None, "gelu")


def test_norms_take_a_0_dim_tensor_eps_as_torch():
    x, eps = torch.randn(3, 8), torch.tensor(0.5)
    torch.testing.assert_close(FF.rms_norm(x, (8,), None, eps), F.rms_norm(x, (8,), None, 0.5))
    torch.testing.assert_close(FF.layer_norm(x, (8,), eps=eps), F.layer_norm(x, (8,), eps=0.5))


def test_layer_norm_takes_the_param_dtypes_torch_takes():
    """weight and bias of the input's dtype, or both fp32 for fp16 / bf16 input; torch refuses
    the other mixes (fastnn would round fp64 params to fp32 silently)."""
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for x_dtype in floats:
        x = torch.randn(3, 8, dtype=x_dtype)
        for w_dtype in floats:
            for b_dtype in floats:
                args = ((8,), torch.ones(8, dtype=w_dtype), torch.zeros(8, dtype=b_dtype))
                try:
                    F.layer_norm(x, *args)
                except RuntimeError:
                    with pytest.raises(RuntimeError, match="takes weight and bias of its dtype"):
                        FF.layer_norm(x, *args)
                else:
                    assert FF.layer_norm(x, *args).dtype == x_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
def test_norm_results_are_contiguous_new_tensors_as_torch_returns(backend, kind):
    """Not views of the kernels' [rows, N] results (detach_() and in-place updates under
    no_grad work, as on torch's), and contiguous for a transposed input, as torch's. (The fused
    residual sum is the saved tensor or a view of it, with its version counter: see
    test_in_place_change_of_the_residual_output_is_caught.)"""
    skip_unless_available(backend, kind, "cpu")
    norm, theirs = getattr(FF, kind), getattr(F, kind)
    x = torch.randn(8, 4).t()  # [4, 8], dense, not contiguous
    with fastnn.use_backend(backend):
        out, (fused, s) = norm(x, (8,)), norm(x, (8,), residual=torch.randn(4, 8))
        assert out.stride() == theirs(x, (8,)).stride() == (8, 1)
        assert out._base is None and fused._base is None and s.is_contiguous()
        out.detach_()
        w = torch.randn(8, requires_grad=True)
        with torch.no_grad():
            y = norm(torch.randn(2, 3, 8), (8,))
            z, s = norm(torch.randn(2, 3, 8), (8,), residual=torch.randn(2, 3, 8))
        # torch's message for a view: "created in no_grad mode"
        (y.mul_(w).sum() + z.mul_(w).sum() + s.mul_(w).sum()).backward()
        s.detach_()
        # Grad mode on, nothing requiring grad (evaluation without no_grad): nothing is saved.
        _, s = norm(torch.randn(2, 3, 8), (8,), residual=torch.randn(2, 3, 8))
        assert s._base is None
        s.detach_()
    assert w.grad is not None


class _CallsImportedNames(torch.nn.Module):
    """The functional API imported by name, as `from fastnn.functional import rms_norm`."""

    def forward(self, x):
        y = imported_rms_norm(x, (8,), residual=x)[0] + imported_layer_norm(x, x.shape[-1:])
        return imported_swiglu(y, x) + imported_glu_family(y, None, "gelu").repeat(1, 2)


def test_fx_symbolic_trace_records_the_norm_and_glu_calls():
    """torch.fx.symbolic_trace records fastnn's functional calls as nodes, as it does torch's
    F.rms_norm (tracing into their argument checks would branch on a Proxy), also when the
    model imported them by name."""
    x = torch.randn(2, 8)
    modules = [fastnn.RMSNorm(8), fastnn.LayerNorm(8), fastnn.SwiGLUMLP(8, 16)]
    for module in [*modules, _CallsImportedNames()]:
        traced = torch.fx.symbolic_trace(module)
        called = {n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"}
        if isinstance(module, _CallsImportedNames):
            assert called >= {"rms_norm", "layer_norm", "swiglu", "glu_family"}, called
        assert called & {"rms_norm", "layer_norm", "glu_family", "swiglu"}, called
        torch.testing.assert_close(traced(x), module(x))


def test_result_dtype_follows_torch_for_mixed_weight():
    """fp32 weight with bf16 input: torch returns bf16 for both norms; so does fastnn."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(8)
    assert FF.rms_norm(x, (8,), w).dtype == F.rms_norm(x, (8,), w).dtype == torch.bfloat16
    assert FF.layer_norm(x, (8,), w, w).dtype == F.layer_norm(x, (8,), w, w).dtype


def test_residual_returns_sum_and_norm():
    x, r, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
    out, s = FF.rms_norm(x, (8,), w, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (8,), w))
    out, s = FF.layer_norm(x, (8,), w, None, residual=r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (8,), w))


def test_modules_take_the_residual_by_keyword_only():
    """A positional residual is refused: hooks that pass on the first argument alone (torch's
    SequenceParallel) would drop it silently and return the norm of x alone."""
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    for module in (fastnn.RMSNorm(8), fastnn.LayerNorm(8)):
        y, s = module(x, residual=r)
        torch.testing.assert_close(s, x + r)
        torch.testing.assert_close(y, module(x + r))
        with pytest.raises(TypeError, match="positional"):
            module(x, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_residual_of_another_dtype_is_promoted_as_input_plus_residual(backend, kind, dtypes):
    """A bf16 branch output added to an fp32 residual stream (torch.autocast's usual pre-norm
    block): the sum, the norm and the gradients as torch's unfused norm(x + r), in the promoted
    dtype, each gradient in its leaf's dtype."""
    skip_unless_available(backend, kind, "cpu")
    gen = torch.Generator().manual_seed(7)
    x, r = (torch.randn(2, 3, 8, generator=gen).to(dt).requires_grad_() for dt in dtypes)
    x_ref, r_ref = (t.detach().clone().requires_grad_() for t in (x, r))
    w = torch.randn(8, generator=gen)
    norm = getattr(FF, kind)
    with fastnn.use_backend(backend):
        out, s = norm(x, (8,), w, residual=r)
    s_ref = x_ref + r_ref
    out_ref = getattr(F, kind)(s_ref, (8,), w)
    assert out.dtype == out_ref.dtype and s.dtype == s_ref.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref)
    dy = torch.randn(out.shape, generator=gen)
    (out * dy + s).sum().backward()
    (out_ref * dy + s_ref).sum().backward()
    for got, want in ((x.grad, x_ref.grad), (r.grad, r_ref.grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


# How the fused norm's input and residual reach leaves a, b, c (d: the unfused reference's c).
_REACH = {
    "leaves": lambda a, b, c: (a, b),
    "views of leaves": lambda a, b, c: (a.view(a.shape), b.view(b.shape)),
    "behind adds": lambda a, b, c: (a + c, b + 0.0),
    "one leaf": lambda a, b, c: (a * 1.0, b),
    "one tensor for both": lambda a, b, c: (a, a),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("how", list(_REACH))
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_residual_and_input_grads_do_not_share_memory(backend, kind, how, shape):
    """Leaves behind the fused norm's input and residual (given directly, or through adds, which
    pass gradients on untouched) get .grad tensors of their own, as with an unfused `x + r`:
    an in-place clip_grad_norm_ then scales each once. Views of leaves share one, as they do
    in an unfused add (a torch quirk): the same as torch in every case."""
    skip_unless_available(backend, kind, "cpu")
    leaves = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    dy = torch.randn(shape, dtype=torch.float64)
    norm = getattr(FF, kind)

    def grads(fused):
        for t in leaves:
            t.grad = None
        x, r = _REACH[how](*leaves)
        with fastnn.use_backend(backend):
            y = norm(x, (8,), residual=r)[0] if fused else norm(x + r, (8,))
        y.backward(dy)
        with_grad = [t for t in leaves if t.grad is not None]
        shared = len({t.grad.untyped_storage().data_ptr() for t in with_grad}) < len(with_grad)
        torch.nn.utils.clip_grad_norm_(with_grad, 0.1)
        return [t.grad for t in with_grad], shared

    (ours, ours_shared), (theirs, theirs_shared) = grads(True), grads(False)
    assert ours_shared == theirs_shared == (how == "views of leaves")
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
def test_input_as_its_own_residual_compiles_fullgraph(backend, kind):
    """norm(x, residual=x) is norm(x + x): traced in one graph (an autograd.Function given one
    tensor twice makes Dynamo break the graph), x's gradient the sum of both, as eagerly."""
    skip_unless_available(backend, kind, "cpu")
    norm = getattr(FF, kind)

    def fn(x):
        y, s = norm(x, (8,), residual=x)
        return y * s

    x = torch.randn(3, 8, dtype=torch.float64)
    dy = torch.randn(3, 8, dtype=torch.float64)
    results = []
    torch._dynamo.reset()
    with fastnn.use_backend(backend):
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager"), None):
            leaf = x.clone().requires_grad_(True)
            out = f(leaf) if f else norm(leaf + leaf, (8,)) * (leaf + leaf)
            out.backward(dy)
            results.append((out.detach(), leaf.grad))
    for got in results[:2]:
        for a, b in zip(got, results[2], strict=True):
            torch.testing.assert_close(a, b)


def _graph_names(t):
    """Class names of the autograd nodes behind t."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


_EAGER_CASES = {
    "rms_norm": ("rms_norm", lambda x, r, w: FF.rms_norm(x, (8,), w, 1e-6, residual=r)),
    "layer_norm": ("layer_norm", lambda x, r, w: FF.layer_norm(x, (8,), w, w, residual=r)),
    "rms_norm_2d_own_residual": (
        "rms_norm",
        lambda x, r, w: FF.rms_norm(x.flatten(0, 1), (8,), w, residual=x.flatten(0, 1)),
    ),
    "layer_norm_2_dims_no_bias": (
        "layer_norm",
        lambda x, r, w: FF.layer_norm(
            x.transpose(0, 1), (2, 8), w * r[0, :2], residual=r.transpose(0, 1)
        ),
    ),
    "rms_norm_no_weight": ("rms_norm", lambda x, r, w: FF.rms_norm(x * w, (3, 8))),
    "glu": ("glu", lambda x, r, w: FF.glu_family(x, r * w, "gelu")),
    "glu_packed": ("glu", lambda x, r, w: FF.swiglu(torch.cat([x, r * w], -1))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_EAGER_CASES))
def test_eager_calls_match_the_registered_autograd(backend, case, monkeypatch):
    """Eager calls run the ops through ops.eager's autograd.Function (torch's custom-op autograd
    wrapper costs host time); outputs and gradients are bitwise those of the registered
    autograd, which torch.compile and torch.jit.trace use."""
    family, fn = _EAGER_CASES[case]
    skip_unless_available(backend, family, "cpu")
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    w = torch.rand(8) + 0.5

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (x, r, w)]
        with fastnn.use_backend(backend):
            out = fn(*leaves)
        out = out[0] * out[1] if isinstance(out, tuple) else out
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        return out.detach(), [t.grad for t in leaves], _graph_names(out)

    eager = run()
    monkeypatch.setattr(fastnn.ops, "eager", fastnn.ops.get)
    registered = run()
    assert any(n.endswith("_eagerBackward") for n in eager[2]), eager[2]
    assert not any(n.endswith("_eagerBackward") for n in registered[2]), registered[2]
    assert torch.equal(eager[0], registered[0])
    for a, b in zip(eager[1], registered[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # (r unused: no grad)


def test_autocast_policy_runs_the_norms_in_fp32(monkeypatch):
    # The CUDA autocast policy (checked against torch under autocast in test_norms_gpu.py), with
    # its switch forced on here: the norm of bf16 input in fp32, the fused add in bf16.
    monkeypatch.setattr(FF, "_autocast_to_fp32", lambda op, input: True)
    x, r = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    w, b = torch.randn(8), torch.randn(8)
    out = FF.rms_norm(x, (8,), w.bfloat16())
    torch.testing.assert_close(out, F.rms_norm(x.float(), (8,), w.bfloat16().float()))
    out, s = FF.layer_norm(x, (8,), w, b, residual=r)
    assert out.dtype == torch.float32 and s.dtype == torch.bfloat16 and torch.equal(s, x + r)
    torch.testing.assert_close(out, F.layer_norm(s.float(), (8,), w, b))
    x64 = x.double()  # fp64 stays fp64, as torch's autocast leaves it
    assert FF.rms_norm(x64, (8,), w.double()).dtype == torch.float64


def test_glu_family_sigmoid_relates_to_torch_glu_as_documented():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(FF.glu_family(x[:, 5:], x[:, :5], "sigmoid"), F.glu(x))


def _silu_glu(gate, up):
    return F.silu(gate) * up


# name -> (fastnn's function, torch's formula, args); args[0] batched [2, 3, 8], params [8].
def _transform_cases():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    x, r, w, b, u = rand(2, 3, 8), rand(2, 3, 8), rand(8), rand(8), rand(2, 3, 8)
    return {
        "rms_norm": (
            lambda x, r, w: FF.rms_norm(x, (8,), w, residual=r)[0],
            lambda x, r, w: F.rms_norm(x + r, (8,), w),
            (x, r, w),
        ),
        "layer_norm": (
            lambda x, w, b: FF.layer_norm(x, (8,), w, b),
            lambda x, w, b: F.layer_norm(x, (8,), w, b),
            (x, w, b),
        ),
        "swiglu": (FF.swiglu, _silu_glu, (x, u)),
        "swiglu_packed": (
            lambda gu: FF.swiglu(gu, inplace_backward=True),
            lambda gu: _silu_glu(*gu.chunk(2, -1)),
            (torch.cat([x, u], -1),),
        ),
    }


def _scalar(f):
    return lambda *args: f(*args).sin().sum()


def _in_dims(args):
    return tuple(0 if a.dim() == 3 else None for a in args)


_TRANSFORMS = {
    "grad": lambda f, a: torch.func.grad(_scalar(f), argnums=tuple(range(len(a))))(*a),
    "vmap": lambda f, a: torch.func.vmap(f, in_dims=_in_dims(a))(*a),
    "per_sample_grad": lambda f, a: torch.func.vmap(
        torch.func.grad(_scalar(f), argnums=tuple(range(len(a)))), in_dims=_in_dims(a)
    )(*a),
    "jvp": lambda f, a: torch.func.jvp(f, a, tuple(torch.full_like(t, 0.3) for t in a)),
    "jacrev": lambda f, a: torch.func.jacrev(f, argnums=tuple(range(len(a))))(*a),
    "hessian": lambda f, a: _hessian_of_first(f, tuple(t[:1] if t.dim() == 3 else t for t in a)),
}


def _hessian_of_first(f, args):
    return torch.func.hessian(lambda first: _scalar(f)(first, *args[1:]))(args[0])


@pytest.mark.parametrize("transform", _TRANSFORMS)
@pytest.mark.parametrize("case", ["rms_norm", "layer_norm", "swiglu", "swiglu_packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_match_torch(backend, case, transform):
    """torch.func transforms through the functional API (and forward-mode AD, in jvp) give
    torch's results: under a transform the reference formulas run as plain torch ops."""
    skip_unless_available(backend, "glu" if case.startswith("swiglu") else case, "cpu")
    ours, theirs, args = _transform_cases()[case]
    with fastnn.use_backend(backend):
        got = _TRANSFORMS[transform](ours, args)
    torch.testing.assert_close(got, _TRANSFORMS[transform](theirs, args))


@pytest.mark.parametrize("transform", ["grad", "jvp"])
@pytest.mark.parametrize("case", ["rms_norm", "layer_norm", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_torch_func_transforms_match_torch(backend, case, transform):
    """Compiled too (fullgraph): Dynamo traces a transform with it active, so the reference
    formulas run. With the ops, a compiled jvp came back zero, silently, and a compiled grad
    raised. (Against eager torch: torch's own compiled jvp of layer_norm raises.)"""
    skip_unless_available(backend, "glu" if case == "swiglu" else case, "cpu")
    ours, theirs, args = _transform_cases()[case]
    torch._dynamo.reset()  # one lambda's code object for every case: no recompile limit
    compiled = torch.compile(
        lambda *a: _TRANSFORMS[transform](ours, a), backend="aot_eager", fullgraph=True
    )
    with fastnn.use_backend(backend):
        got = compiled(*args)
    torch.testing.assert_close(got, _TRANSFORMS[transform](theirs, args))


def test_forward_mode_ad_carries_tangents():
    from torch.autograd import forward_ad

    x, t, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8), torch.randn(8)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(FF.rms_norm(forward_ad.make_dual(x, t), (8,), w)).tangent
        ref = forward_ad.unpack_dual(F.rms_norm(forward_ad.make_dual(x, t), (8,), w)).tangent
    assert got is not None
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_run_the_backends_ops(backend, monkeypatch):
    """Outside transforms the reference formulas stand in for nothing (the kernels run)."""
    skip_unless_available(backend, "rms_norm", "cpu")

    def refuse(*args):
        raise AssertionError("a reference formula ran outside a transform")

    monkeypatch.setattr(FF, "_REFERENCE_FORWARDS", dict.fromkeys(FF._REFERENCE_FORWARDS, refuse))
    x = torch.randn(4, 8, requires_grad=True)

    def calls(x):
        return FF.rms_norm(x, (8,)).sum() + FF.layer_norm(x, (8,)).sum() + FF.swiglu(x, x).sum()

    with fastnn.use_backend(backend):
        calls(x).backward()
        FF.swiglu(x).sum().backward()
        torch.compile(calls, backend="aot_eager", fullgraph=True)(x).backward()  # compiled too


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")  # no shape check warns
def test_modules_refuse_torch_jit_script_clearly_and_trace():
    """TorchScript cannot compile the custom-op calls: the error names the module and what to
    use instead (scripting a model that holds one too); torch.jit.trace works."""
    x = torch.randn(2, 8)
    for module in (fastnn.RMSNorm(8), fastnn.LayerNorm(8), fastnn.SwiGLUMLP(8, 16)):
        for target in (module, torch.nn.Sequential(torch.nn.Linear(8, 8), module)):
            with pytest.raises(RuntimeError, match=f"fastnn.{type(module).__name__} cannot be"):
                torch.jit.script(target)
        traced = torch.jit.trace(module, x)
        torch.testing.assert_close(traced(x), module(x))


class _WithResidual(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual):
        return self.norm(x, residual=residual)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_traced_norms_take_other_sizes_of_the_traced_rank(backend):
    """A trace records the input's sizes as the input's, not as the traced numbers: other sizes
    of the same rank (zero rows too) give what the module gives; another rank raises."""
    skip_unless_available(backend, "rms_norm", "cpu")
    modules = [
        (fastnn.RMSNorm(8), (2, 3, 8), [(4, 1, 8), (1, 0, 8), (5, 2, 8)]),
        (fastnn.LayerNorm((2, 4)), (2, 2, 4), [(5, 2, 4)]),
    ]
    with fastnn.use_backend(backend):
        for module, traced_shape, shapes in modules:
            traced = torch.jit.trace(module, torch.randn(traced_shape))
            fused = torch.jit.trace(
                _WithResidual(module), (torch.randn(traced_shape), torch.randn(traced_shape))
            )
            for shape in shapes:
                x, r = torch.randn(shape), torch.randn(shape)
                dy = torch.randn(shape)
                grads = []
                for call in (traced, module):
                    leaf = x.clone().requires_grad_()
                    out = call(leaf)
                    out.backward(dy)
                    grads.append(leaf.grad)
                    if call is module:
                        torch.testing.assert_close(traced(x), out.detach())
                torch.testing.assert_close(grads[0], grads[1])
                for got, want in zip(fused(x, r), module(x, residual=r), strict=True):
                    torch.testing.assert_close(got, want)
            module(torch.randn(2, *traced_shape))  # one more leading dim: eager takes it
            with pytest.raises(RuntimeError):
                traced(torch.randn(2, *traced_shape))


class _LinearThenFusedNorm(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.proj, self.norm = torch.nn.Linear(8, 8), norm

    def forward(self, x, residual):
        return self.norm(self.proj(x), residual=residual)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("traced_under", ["grad", "no_grad"])
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_fused_norm_passes_gradients_through_the_residual_sum(backend, norm, traced_under):
    """The residual sum of a trace needs grad as x + residual does, whatever needed grad when it
    was traced. A trace made under no_grad returned it detached for good (every gradient
    through the residual stream lost, no error), and with a layer in front torch.jit.trace's own
    check, which traces again without grad mode, failed on the detach's one-node difference."""
    skip_unless_available(backend, "rms_norm", "cpu")
    torch.manual_seed(0)
    module = _LinearThenFusedNorm(getattr(fastnn, norm)(8))
    x, r, dy, ds = (torch.randn(2, 3, 8) for _ in range(4))
    with fastnn.use_backend(backend):
        with torch.no_grad() if traced_under == "no_grad" else contextlib.nullcontext():
            traced = torch.jit.trace(module, (x, r))  # check_trace on, as by default
        grads = []
        for call in (traced, module):
            module.zero_grad()
            leaf = r.clone().requires_grad_()
            y, s = call(x, leaf)
            assert s.requires_grad
            ((y * dy).sum() + (s * ds).sum()).backward()
            grads.append((leaf.grad, module.proj.weight.grad, module.norm.weight.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_export_keeps_a_dynamic_normalized_dim(op, strict):
    """normalized_shape read off a dynamic dim stays symbolic, as with torch's F.rms_norm /
    F.layer_norm: non-strict export (the default) refused the dim, fixed at its traced size."""

    class Norm(torch.nn.Module):
        def forward(self, x, w):
            return getattr(FF, op)(x, (x.shape[-1],), w)

    hidden = torch.export.Dim("hidden")
    program = torch.export.export(
        Norm(), (torch.randn(2, 8), torch.randn(8)), dynamic_shapes=({1: hidden}, {0: hidden}),
        strict=strict,
    )  # fmt: skip
    x, w = torch.randn(2, 12), torch.randn(12)  # (rows stay static)
    torch.testing.assert_close(program.module()(x, w), getattr(F, op)(x, (12,), w))


@pytest.mark.parametrize("strict", [False, True])
def test_export_records_the_registered_ops(strict):
    """torch.export (strict and not) records fastnn's ops, not the eager autograd.Function."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.ln = fastnn.RMSNorm(8), fastnn.LayerNorm(8)

        def forward(self, x, r):
            y, s = self.norm(x, residual=r)
            return self.ln(y) + FF.swiglu(s, y)

    block, x, r = Block(), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    program = torch.export.export(block, (x, r), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    for family in ("rms_norm", "layer_norm", "glu"):
        prefix = fastnn.ops.PREFIX[fastnn._backend.resolve(family, "cpu")]
        assert f"fastnn.{prefix}{family}_fwd.default" in targets, targets
    torch.testing.assert_close(program.module()(x, r), block(x, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("shape", [(2, 3, 8), (6, 8)])  # reshaped results, or the op's own
@pytest.mark.parametrize("leaves", ["x, r and w", "w alone"])
def test_in_place_change_of_the_residual_output_is_caught(backend, kind, shape, leaves):
    """The backward saves residual_out: changing it in place raises at backward, as torch does
    for the unfused x + r (it once went unseen and the gradients came out silently wrong), also
    when only the weight requires grad (the sum then does not, as x + r)."""
    skip_unless_available(backend, kind, "cpu")
    activations = leaves != "w alone"
    x, r = (torch.randn(shape, requires_grad=activations) for _ in range(2))
    w = torch.ones(8, requires_grad=True)
    with fastnn.use_backend(backend):
        out, s = getattr(FF, kind)(x, (8,), w, residual=r)
    assert s.requires_grad == activations
    s.mul_(100)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("compiled", [False, True])
def test_residual_sum_requires_grad_as_input_plus_residual(backend, kind, compiled):
    """The sum requires grad when x or r does (a weight that requires grad makes the normalised
    output require it, not the sum: it once did, with a grad_fn, and .numpy() refused it)."""
    skip_unless_available(backend, kind, "cpu")
    fn = getattr(FF, kind)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for x_grad, r_grad, w_grad in itertools.product((False, True), repeat=3):
        x = torch.randn(2, 3, 8, requires_grad=x_grad)
        r = torch.randn(2, 3, 8, requires_grad=r_grad)
        w = torch.ones(8, requires_grad=w_grad)
        with fastnn.use_backend(backend):
            out, s = fn(x, (8,), w, residual=r)
        assert s.requires_grad == (x + r).requires_grad, (x_grad, r_grad, w_grad)
        assert out.requires_grad == (x_grad or r_grad or w_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("used", ["out", "sum"])
@pytest.mark.parametrize("shape", [(2, 3, 8), (6, 8)])
def test_backward_through_one_of_the_fused_outputs(backend, kind, used, shape):
    """Gradients when only the normalised output or only the residual sum feeds the loss (the
    eager backward then gets None, not zeros, for the other: materialize_grads=False), as
    torch's unfused norm(x + r)."""
    skip_unless_available(backend, kind, "cpu")
    leaves = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    leaves.append(torch.rand(8, dtype=torch.float64) + 0.5)

    def grads(fused):
        x, r, w = (t.clone().requires_grad_(True) for t in leaves)
        if fused:
            with fastnn.use_backend(backend):
                out, s = getattr(FF, kind)(x, (8,), w, residual=r)
        else:
            s = x + r
            out = getattr(F, kind)(s, (8,), w)
        loss = (out if used == "out" else s).sin().sum()
        return torch.autograd.grad(loss, (x, r, w), allow_unused=True)

    for got, want in zip(grads(True), grads(False), strict=True):
        if want is None:  # w, when only the sum is used: None, not zeros (an optimizer
            assert got is None  # skips a param without grad, but decays one with zeros)
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_EAGER_CASES))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_mode_enable_grad"])
def test_calls_without_grad_mode_match_calls_with_it(backend, case, mode):
    """With grad mode off (or in inference mode, which records nothing even under enable_grad)
    the eager call runs the op alone (no autograd.Function): results bitwise those of a call
    that records a graph, and needing no grad."""
    family, fn = _EAGER_CASES[case]
    skip_unless_available(backend, family, "cpu")
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    w = (torch.rand(8) + 0.5).requires_grad_(True)
    with fastnn.use_backend(backend):
        recorded = fn(x, r, w)
        with getattr(torch, mode.removesuffix("_enable_grad"))():
            with torch.enable_grad() if mode.endswith("enable_grad") else contextlib.nullcontext():
                plain = fn(x, r, w)
    recorded, plain = ((o,) if isinstance(o, torch.Tensor) else o for o in (recorded, plain))
    assert recorded[0].requires_grad  # (a fused residual sum needs none: x and r need none)
    for a, b in zip(recorded, plain, strict=True):
        assert not b.requires_grad and b.grad_fn is None
        assert torch.equal(a, b)


class _CheckpointedBlock(torch.nn.Module):
    """Both fused residual norms and a SwiGLU MLP, as a transformer block chains them."""

    def __init__(self, inplace_backward):
        super().__init__()
        self.attn_norm, self.mlp_norm = fastnn.RMSNorm(8), fastnn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)
        self.mlp = fastnn.SwiGLUMLP(8, 20, inplace_backward=inplace_backward)

    def forward(self, x, residual):
        h, residual = self.attn_norm(x, residual=residual)
        h, residual = self.mlp_norm(self.proj(h), residual=residual)
        return self.mlp(h), residual


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_grads_of_a_plain_backward(
    backend, inplace_backward, use_reentrant
):
    """torch.utils.checkpoint reruns the block's forward in the backward (reentrant: inside a
    backward of its own; not: recomputing each saved tensor as it is unpacked); the in-place
    GLU backward then writes over recomputed gate / up. Same kernels on the same inputs: the
    same bits as without checkpointing."""
    for family in ("rms_norm", "layer_norm", "glu"):
        skip_unless_available(backend, family, "cpu")
    torch.manual_seed(0)
    block = _CheckpointedBlock(inplace_backward)
    x, r = torch.randn(4, 3, 8), torch.randn(4, 3, 8)

    def grads(checkpointed):
        inputs = [t.clone().requires_grad_(True) for t in (x, r)]
        with fastnn.use_backend(backend):
            if checkpointed:
                out, s = checkpoint(block, *inputs, use_reentrant=use_reentrant)
            else:
                out, s = block(*inputs)
            block.zero_grad()  # reentrant checkpointing takes .backward() only, not .grad()
            (out.square().sum() + s.sin().sum()).backward()
            return [t.grad for t in (*inputs, *block.parameters())]

    for i, (got, want) in enumerate(zip(grads(True), grads(False), strict=True)):
        assert torch.equal(got, want), f"grad {i}"


_INFERENCE_INPUT_CASES = {
    "rms_norm": ("rms_norm", lambda x, w: FF.rms_norm(x, (8,), w)),
    "layer_norm": ("layer_norm", lambda x, w: FF.layer_norm(x, (8,), w, w)),
    "glu": ("glu", lambda x, w: FF.glu_family(x, w.expand(x.shape), "gelu")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_INFERENCE_INPUT_CASES))
def test_inputs_made_in_inference_mode_train_as_other_tensors(backend, case):
    """An eager forward that records a graph on an input made under torch.inference_mode (a
    batch cached by an inference pass): autograd refuses to save an inference tensor, so the op
    saves a copy, and the weights get the grads an ordinary input gives (torch.nn.RMSNorm
    accepts such inputs too; under torch.compile torch refuses them for any op)."""
    family, fn = _INFERENCE_INPUT_CASES[case]
    skip_unless_available(backend, family, "cpu")
    with torch.inference_mode():
        x_inference = torch.randn(2, 3, 8)
    w = (torch.rand(8) + 0.5).requires_grad_(True)
    grads = []
    with fastnn.use_backend(backend):
        for x in (x_inference, x_inference.clone()):
            (grad,) = torch.autograd.grad(fn(x, w).square().sum(), w)
            grads.append(grad)
    assert not grads[1].is_inference()
    torch.testing.assert_close(*grads, rtol=0, atol=0)


def test_compiled_autograd_traces_an_eager_forward_in_one_graph():
    """A forward run eagerly, its backward under compiled autograd: one graph, torch's grads."""
    from torch._dynamo import compiled_autograd

    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64) + 0.5
    grads = []
    for compiled in (False, True):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = FF.layer_norm(xs, (8,), ws, ws, residual=xs * 2)[0].square().sum()
        torch._dynamo.reset()
        if compiled:
            compiler = torch.compile(backend="aot_eager", fullgraph=True)
            with compiled_autograd._enable(compiler):
                loss.backward()
        else:
            loss.backward()
        grads.append((xs.grad, ws.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
