"""GLU family (out = act(gate) * up) on every backend against the fp64 reference, on the CPU
(Triton under the interpreter): forward, backward and the packed [gate | up] layout over shapes,
dtypes and activations; eager-torch ratio check in fp16 / bf16; extreme gates; non-contiguous
and zero-size inputs; gradcheck; opcheck; torch.compile; SwiGLUMLP (fused weights, state_dict
interop); bad inputs. GPU-only cases are in test_glu_gpu.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, skip_unless_available
from tolerances import FORWARD, INPUT_GRAD, RTOL, assert_ratio_close, assert_rel_close

import fastnn
from bench.triton_sweep import nan_filled_allocations
from fastnn import functional as FF
from fastnn import ops
from fastnn.reference import glu as ref

ACTIVATIONS = ref.ACTIVATIONS
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# 1 element, odd, prime above a Triton block (1031 > 1024), 3-D, a ragged packed row (H = 130).
SHAPES = [(1,), (3, 17), (2, 1031), (2, 3, 130)]


def eager(gate, up, activation):
    """What a user writes in plain torch, in the tensors' own dtype."""
    act = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
    }[activation]
    return act(gate) * up


def make_inputs(shape, dtype, scale=2.0, seed=0):
    """gate, up, grad_out rounded to `dtype`, and their fp64 copies."""
    gen = torch.Generator().manual_seed(seed)
    g, u, dh = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    g = g * scale  # reach the tails of the activations
    low = [t.to(dtype) for t in (g, u, dh)]
    return low, [t.double() for t in low]


def ref64(g, u, dh, activation):
    out = ref.glu_fwd(g, u, activation)
    dg, du = ref.glu_bwd(dh, g, u, activation)
    return out, dg, du


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_against_fp64_reference(backend, activation, dtype, shape):
    """Separate and packed forward / backward ops against the fp64 reference (testing.md table;
    bf16 under the Triton interpreter truncates instead of rounding, within the bf16 row)."""
    skip_unless_available(backend, "glu", "cpu")
    (g, u, dh), (g64, u64, dh64) = make_inputs(shape, dtype)
    out64, dg64, du64 = ref64(g64, u64, dh64, activation)

    gu = torch.cat([g, u], dim=-1)
    with nan_filled_allocations():  # an element the op leaves unwritten is NaN, not a stale 0
        out = ops.get(backend, "glu_fwd")(g, u, activation)
        dg, du = ops.get(backend, "glu_bwd")(dh, g, u, activation)
        out_p = ops.get(backend, "glu_packed_fwd")(gu, activation)
        dgu = ops.get(backend, "glu_packed_bwd")(dh, gu, activation)
    for t in (out, dg, du):
        assert t.dtype == dtype and t.shape == g.shape
    assert_rel_close(out, out64, dtype, FORWARD, "out")
    assert_rel_close(dg, dg64, dtype, INPUT_GRAD, "grad_gate")
    assert_rel_close(du, du64, dtype, INPUT_GRAD, "grad_up")

    assert out_p.shape == g.shape and dgu.shape == gu.shape
    assert_rel_close(out_p, out64, dtype, FORWARD, "packed out")
    assert_rel_close(dgu, torch.cat([dg64, du64], dim=-1), dtype, INPUT_GRAD, "packed grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_eager_error(backend, activation, dtype):
    """|fastnn - ref64| <= 2 |eager same dtype - ref64| + 1 ulp, elementwise, for the output and
    both gradients through the public function (autograd)."""
    skip_unless_available(backend, "glu", "cpu")
    (g, u, dh), (g64, u64, dh64) = make_inputs((4, 300), dtype, seed=1)
    out64, dg64, du64 = ref64(g64, u64, dh64, activation)

    ge, ue = g.clone().requires_grad_(), u.clone().requires_grad_()
    out_e = eager(ge, ue, activation)
    out_e.backward(dh)
    gf, uf = g.clone().requires_grad_(), u.clone().requires_grad_()
    with fastnn.use_backend(backend):
        out_f = FF.glu_family(gf, uf, activation)
    out_f.backward(dh)

    eps = torch.finfo(dtype).eps  # eps * |ref| >= one ulp of ref
    for what, mine, theirs, r in (
        ("out", out_f, out_e, out64),
        ("grad_gate", gf.grad, ge.grad, dg64),
        ("grad_up", uf.grad, ue.grad, du64),
    ):
        assert_ratio_close(mine.detach(), r, theirs.detach(), atol=eps * r.abs() + 1e-6, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_gates_finite(backend, activation, dtype):
    """Gates of +-1000 (and +-60000 in fp16 range, +-1e38 in fp32 / bf16 range) give finite
    outputs and gradients that match the limits of the fp64 reference."""
    skip_unless_available(backend, "glu", "cpu")
    g64 = torch.tensor([-60000.0, -1000.0, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1000.0])
    if dtype != torch.float16:
        g64 = torch.cat([torch.tensor([-1e38, -1e30, -88.8, -86.6]), g64, torch.tensor([1e38])])
    g64 = g64.double()
    u64 = torch.linspace(-2, 2, g64.numel(), dtype=torch.float64)
    dh64 = torch.ones_like(g64)
    g, u, dh = (t.to(dtype) for t in (g64, u64, dh64))
    g64, u64 = g.double(), u.double()
    out = ops.get(backend, "glu_fwd")(g, u, activation)
    dg, du = ops.get(backend, "glu_bwd")(dh, g, u, activation)
    dgu = ops.get(backend, "glu_packed_bwd")(dh, torch.cat([g, u]), activation)
    for t in (out, dg, du, dgu):
        assert torch.isfinite(t).all(), t
    out64, dg64, du64 = ref64(g64, u64, dh64, activation)
    rtol = RTOL[dtype][FORWARD] * 4
    torch.testing.assert_close(out.double(), out64.to(dtype).double(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(dg.double(), dg64.to(dtype).double(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(du.double(), du64.to(dtype).double(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_16bit_conversions_are_exact(dtype):
    """The CPU kernels' own conversions (fastnn/cpu_lowp.h: bf16 by bit arithmetic, fp16 by
    F16C rows). Every one of the 65536 values goes through widen and narrow unchanged (ReGLU's
    grad_gate is dh * up * 1 = dh for gate 1, up 1; NaNs stay NaN), and products of random finite
    values (exact in fp32) round as torch rounds them, subnormal, overflowing and tied ones
    included."""
    skip_unless_available("native", "glu", "cpu")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    ones = torch.ones_like(every)
    dg, _ = ops.get("native", "glu_bwd")(every, ones, ones, "relu")
    finite = ~every.isnan()
    assert torch.equal(dg[finite].view(torch.int16), every[finite].view(torch.int16))
    assert dg[~finite].isnan().all()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**15, (2, 200_000), generator=gen, dtype=torch.int32)
    g, u = bits.to(torch.int16).view(dtype)  # non-negative, so relu(g) = g; inf / NaN dropped
    keep = g.isfinite() & u.isfinite()
    signs = torch.where(torch.rand(int(keep.sum()), generator=gen) < 0.5, -1.0, 1.0)
    g, u = g[keep], u[keep] * signs.to(dtype)
    out = ops.get("native", "glu_fwd")(g, u, "relu")
    assert torch.equal(out.view(torch.int16), (g.float() * u.float()).to(dtype).view(torch.int16))


def gelu_tail_errors(backend, device):
    """GeGLU (erf) in fp32 for gates from -13 (where Phi(g) falls to 1e-38) to 6: the largest
    error of the output relative to fp64, and of grad_gate relative to the size of its terms
    (Phi(g) + |g phi(g)|: they cancel at g = -0.75). Also run on CUDA by test_glu_gpu.py."""
    g = torch.linspace(-13, 6, 4001, device=device)  # 4 programs of the Triton kernels
    u, dh = torch.ones_like(g), torch.ones_like(g)
    out = ops.get(backend, "glu_fwd")(g, u, "gelu").double().cpu()
    dg, _ = ops.get(backend, "glu_bwd")(dh, g, u, "gelu")
    g64 = g.double().cpu()
    out64, dg64, _ = ref64(g64, torch.ones_like(g64), torch.ones_like(g64), "gelu")
    cdf = 0.5 * torch.special.erfc(-g64 / 2**0.5)
    terms = cdf + (g64 * torch.exp(-0.5 * g64 * g64) / (2 * torch.pi) ** 0.5).abs()
    errors = []
    for mine, want, scale in ((out, out64, out64.abs()), (dg.double().cpu(), dg64, terms)):
        keep = scale > 1e-30  # normal fp32 values, not within a few ulp of FLT_MIN
        errors.append(((mine - want).abs() / scale)[keep].max().item())
    return errors


# The torch backend computes erfc of the rounded g / sqrt2: up to g^2 / 2 ulp (1.2e-5 relative
# at g = -13); the native kernels split -g^2 / 2 exactly (activations.h): 5e-7 at worst here.
# Triton's formula is native's, but a GPU's tl.exp (ex2.approx of y log2e) rounds the product
# y log2e: up to 3e-6 relative at y = -85.
@pytest.mark.parametrize(("backend", "rtol"), [("torch", 2e-5), ("native", 1e-6), ("triton", 2e-5)])
def test_gelu_accurate_in_the_lower_tail(backend, rtol):
    """Eager torch's 0.5 (1 + erf(g / sqrt2)) cancels to 0 below g = -5.42 in fp32 (relative
    error 1; CPU, torch 2.14.1)."""
    skip_unless_available(backend, "glu", "cpu")
    out_error, grad_error = gelu_tail_errors(backend, "cpu")
    assert out_error <= rtol and grad_error <= rtol, (out_error, grad_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_gates_and_ups_as_torch(backend, activation):
    """NaN where torch's autograd of act(g) * u has NaN, and nowhere else: a NaN gate (also
    through the gelu_tanh clamp), a NaN up beside a relu gate of 0 (torch's relu backward is a
    select). Infinite gates aside: there the kernels give the derivative's limits."""
    skip_unless_available(backend, "glu", "cpu")
    nan = float("nan")
    g0 = torch.tensor([nan, 1.0, -30.0, 30.0, 0.0, -1.0, nan])
    u0 = torch.tensor([1.0, 2.0, 0.5, -1.0, nan, 2.0, nan])
    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    eager(g, u, activation).sum().backward()
    ref = (eager(g0, u0, activation), g.grad, u.grad)
    out = ops.get(backend, "glu_fwd")(g0, u0, activation)
    dg, du = ops.get(backend, "glu_bwd")(torch.ones(7), g0, u0, activation)
    for what, mine, theirs in zip(("out", "grad_gate", "grad_up"), (out, dg, du), ref, strict=True):
        assert torch.equal(mine.isnan(), theirs.isnan()), (what, mine, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed gate, strided-slice up, a packed input from a transposed buffer and a
    non-contiguous grad_out: equal to the contiguous result."""
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(2)
    gt = torch.randn(24, 10, generator=gen).t()  # [10, 24], strides (1, 10)
    us = torch.randn(10, 48, generator=gen)[:, ::2]  # [10, 24], stride 2
    dh = torch.randn(24, 10, generator=gen).t()
    gu = torch.randn(48, 10, generator=gen).t()  # packed [10, 48], non-contiguous
    assert not (gt.is_contiguous() or us.is_contiguous() or gu.is_contiguous())
    for activation in ("silu", "gelu_tanh"):
        fwd, bwd = ops.get(backend, "glu_fwd"), ops.get(backend, "glu_bwd")
        pf, pb = ops.get(backend, "glu_packed_fwd"), ops.get(backend, "glu_packed_bwd")
        c = lambda t: t.contiguous()  # noqa: E731
        torch.testing.assert_close(fwd(gt, us, activation), fwd(c(gt), c(us), activation))
        for a, b in zip(
            bwd(dh, gt, us, activation), bwd(c(dh), c(gt), c(us), activation), strict=True
        ):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(pf(gu, activation), pf(c(gu), activation))
        torch.testing.assert_close(pb(dh, gu, activation), pb(c(dh), c(gu), activation))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 8), (3, 0), (2, 0, 4)])
def test_zero_size(backend, shape):
    skip_unless_available(backend, "glu", "cpu")
    g = torch.randn(shape)
    out = ops.get(backend, "glu_fwd")(g, g.clone(), "silu")
    dg, du = ops.get(backend, "glu_bwd")(g.clone(), g, g.clone(), "silu")
    assert out.shape == dg.shape == du.shape == g.shape
    packed = torch.randn((*shape[:-1], 2 * shape[-1]))
    out_p = ops.get(backend, "glu_packed_fwd")(packed, "silu")
    assert out_p.shape == g.shape
    assert ops.get(backend, "glu_packed_bwd")(out_p, packed, "silu").shape == packed.shape


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_fp64(backend, activation):
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(3)
    g = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    u = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(3, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    with fastnn.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: FF.glu_family(a, b, activation), (g, u))
        assert torch.autograd.gradcheck(lambda a: FF.glu_family(a, None, activation), (gu,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_fp64(backend, activation):
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(3)
    g = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    u = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(3, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    with fastnn.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda a, b: FF.glu_family(a, b, activation), (g, u))
        assert torch.autograd.gradgradcheck(lambda a: FF.glu_family(a, None, activation), (gu,))


def test_inplace_backward_refuses_double_backward():
    g = torch.randn(2, 3, requires_grad=True)
    u = torch.randn(2, 3, requires_grad=True)
    out = FF.swiglu(g * 1, u * 1, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True has no double backward"):
        torch.autograd.grad(out.square().sum(), g, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["glu_fwd", "glu_bwd", "glu_packed_fwd", "glu_packed_bwd"])
def test_opcheck(backend, op):
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(4)
    g, u, dh = (torch.randn(3, 6, generator=gen) for _ in range(3))
    gu = torch.randn(3, 12, generator=gen)
    grad = op in ("glu_fwd", "glu_packed_fwd")
    args = {
        "glu_fwd": (g.requires_grad_(grad), u.requires_grad_(grad), "gelu_tanh"),
        "glu_bwd": (dh, g, u, "silu"),
        "glu_packed_fwd": (gu.requires_grad_(grad), "silu"),
        "glu_packed_bwd": (dh, gu, "sigmoid"),
    }[op]
    torch.library.opcheck(ops.get(backend, op), args)


def test_auto_backend_is_native_on_cpu_when_built():
    skip_unless_available("native", "glu", "cpu")
    fastnn.set_backend("auto")
    from fastnn import _backend

    assert _backend.resolve("glu", "cpu") == "native"


# ---- functional and module API -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_functional_and_module(backend):
    skip_unless_available(backend, "glu", "cpu")
    (g, u, _), _ = make_inputs((2, 3, 8), torch.float64)
    with fastnn.use_backend(backend):
        torch.testing.assert_close(FF.swiglu(g, u), F.silu(g) * u)
        torch.testing.assert_close(FF.swiglu(torch.cat([g, u], -1)), F.silu(g) * u)
        torch.testing.assert_close(fastnn.SwiGLU("relu")(g, u), F.relu(g) * u)
        torch.testing.assert_close(
            FF.glu_family(g, u, "gelu_tanh"), F.gelu(g, approximate="tanh") * u
        )


def llama_mlp_reference(mlp, x):
    """The textbook LLaMA MLP from the fastnn module's state_dict, in plain torch."""
    sd = mlp.state_dict()
    gate = F.linear(x, sd["gate_proj.weight"], sd.get("gate_proj.bias"))
    up = F.linear(x, sd["up_proj.weight"], sd.get("up_proj.bias"))
    return F.linear(F.silu(gate) * up, sd["down_proj.weight"], sd.get("down_proj.bias"))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_matches_llama(fused, bias):
    torch.manual_seed(5)
    mlp = fastnn.SwiGLUMLP(16, 24, bias=bias, dtype=torch.float64, fused_gate_up=fused)
    keys = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    if bias:
        keys |= {k.replace("weight", "bias") for k in keys}
    assert set(mlp.state_dict()) == keys
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    torch.testing.assert_close(out, llama_mlp_reference(mlp, x))
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in mlp.parameters())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_mlp_state_dict_interop(bias):
    """Separate-weight checkpoints load into the fused module and back, exactly."""
    torch.manual_seed(6)
    plain = fastnn.SwiGLUMLP(8, 12, bias=bias)
    fused = fastnn.SwiGLUMLP(8, 12, bias=bias, fused_gate_up=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert torch.equal(fused.gate_up_proj.weight[:12], plain.gate_proj.weight)
    assert torch.equal(fused.gate_up_proj.weight[12:], plain.up_proj.weight)

    assert list(fused.state_dict()) == list(plain.state_dict())  # keys in the same order
    # keep_vars=True: views of the fused tensors that copy as the unfused module's Parameters do.
    kept = copy.deepcopy(fused.state_dict(keep_vars=True))
    assert list(kept) == list(plain.state_dict(keep_vars=True))
    halves = fused.state_dict(keep_vars=True)
    assert halves["gate_proj.weight"].data_ptr() == fused.gate_up_proj.weight.data_ptr()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), fused, torch.nn.Linear(8, 8))
    unfused = torch.nn.Sequential(torch.nn.Linear(8, 8), plain, torch.nn.Linear(8, 8))
    assert list(model.state_dict()) == list(unfused.state_dict())
    back = fastnn.SwiGLUMLP(8, 12, bias=bias)
    back.load_state_dict(fused.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # A torch.nn LLaMA-style MLP built from the same keys loads too (no fastnn-only key).
    torch_mlp = torch.nn.ModuleDict(
        {
            n: torch.nn.Linear(*s, bias=bias)
            for n, s in [("gate_proj", (8, 12)), ("up_proj", (8, 12)), ("down_proj", (12, 8))]
        }
    )
    torch_mlp.load_state_dict(fused.state_dict())
    # A state_dict missing one half fails strict loading and names the keys.
    broken = plain.state_dict()
    del broken["up_proj.weight"]
    with pytest.raises(RuntimeError, match="gate_proj.weight|gate_up_proj.weight"):
        fastnn.SwiGLUMLP(8, 12, bias=bias, fused_gate_up=True).load_state_dict(broken)
    # Halves of the wrong shapes whose rows add up to the fused weight's are refused as the
    # unfused module refuses them, even when not strict.
    wrong = plain.state_dict()
    wrong["gate_proj.weight"], wrong["up_proj.weight"] = torch.randn(13, 8), torch.randn(11, 8)
    for module in (plain, fused):
        with pytest.raises(RuntimeError, match=r"size mismatch for gate_proj.weight.*\[13, 8\]"):
            module.load_state_dict(wrong, strict=False)


def test_fused_mlp_can_keep_its_own_state_dict_keys():
    """llama_state_dict=False: gate_up_proj.* as saved (Phi-3 / GLM-4 checkpoints), no split."""
    mlp = fastnn.SwiGLUMLP(8, 12, fused_gate_up=True, llama_state_dict=False)
    state = mlp.state_dict()
    assert list(state) == ["gate_up_proj.weight", "down_proj.weight"]
    assert state["gate_up_proj.weight"].shape == (24, 8)
    other = fastnn.SwiGLUMLP(8, 12, fused_gate_up=True, llama_state_dict=False)
    other.load_state_dict(state)
    assert torch.equal(other.gate_up_proj.weight, mlp.gate_up_proj.weight)
    assert "llama_state_dict=False" in repr(mlp)
    # Keys that name parameters: tools that map them to modules work (the LLaMA keys do not).
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.func.functional_call(mlp, state, (x,)), mlp(x))


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_mlp_compiles_fullgraph(fused):
    """No graph break through the custom op, forward and backward (aot_eager: dynamo and
    AOTAutograd with the fake kernels and autograd registration, without the C++ compile)."""
    torch.manual_seed(7)
    mlp = fastnn.SwiGLUMLP(16, 32, fused_gate_up=fused)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, mlp(x))
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_eager,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(gx, gx_eager)


# ---- bad inputs ----------------------------------------------------------------------------------


def test_functional_bad_inputs():
    g = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"\[3, 4\].*\[3, 5\]"):
        FF.swiglu(g, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="torch.int64"):
        FF.swiglu(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="torch.int32"):
        FF.swiglu(g, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="meta.*cpu|cpu.*meta"):
        FF.swiglu(g, torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError, match="unknown GLU activation 'swish'"):
        FF.glu_family(g, g, "swish")
    with pytest.raises(ValueError, match="unknown GLU activation"):
        fastnn.SwiGLU("tanh")
    with pytest.raises(ValueError, match="unknown GLU activation"):
        fastnn.SwiGLUMLP(4, 8, activation="tanh")
    with pytest.raises(RuntimeError, match="even last dim"):
        FF.swiglu(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="dtype"):
        FF.swiglu(g, g.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_bad_inputs(backend):
    """The ops check their own arguments too (they are public through torch.ops.fastnn)."""
    skip_unless_available(backend, "glu", "cpu")
    fwd, bwd = ops.get(backend, "glu_fwd"), ops.get(backend, "glu_bwd")
    pf, pb = ops.get(backend, "glu_packed_fwd"), ops.get(backend, "glu_packed_bwd")
    g = torch.randn(2, 4)
    with pytest.raises(ValueError, match="unknown GLU activation"):
        fwd(g, g, "swish")
    with pytest.raises(RuntimeError, match=r"\[2, 4\].*\[2, 3\]"):
        fwd(g, torch.randn(2, 3), "silu")
    with pytest.raises(RuntimeError, match="Int|int32"):
        fwd(g.int(), g.int(), "silu")
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(g, g.double(), "silu")
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(torch.randn(2, 5), g, g, "silu")
    with pytest.raises(RuntimeError, match="even last dim"):
        pf(torch.randn(2, 5), "silu")
    with pytest.raises(RuntimeError, match="grad_out"):
        pb(torch.randn(2, 3), torch.randn(2, 4), "silu")


# ---- opt-in in-place backward --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_inplace_backward_matches_and_overwrites(backend, packed):
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    dh = torch.randn(6, 8 if packed else 16, generator=gen, dtype=torch.float64)

    def run(inplace):
        x.grad = None
        gate = x @ w  # a computed tensor, as a Linear output
        up = None if packed else (x * 2) @ w
        with fastnn.use_backend(backend):
            out = FF.glu_family(gate, up, "gelu_tanh", inplace_backward=inplace)
        out.backward(dh)
        return out.detach(), x.grad.clone(), gate.detach()

    out_ref, gx_ref, gate_before = run(False)
    out, gx, gate_after = run(True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(gx, gx_ref)
    # The gate buffer now holds grad_gate (and, packed, grad_up): the memory was reused.
    assert not torch.equal(gate_after, gate_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_second_backward_and_leaves(backend):
    skip_unless_available(backend, "glu", "cpu")
    x = torch.randn(3, 4, requires_grad=True)
    with fastnn.use_backend(backend):
        out = FF.swiglu(x * 1.0, x * 2.0, inplace_backward=True)
        out.sum().backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="cannot run backward again"):
            out.sum().backward()
        with pytest.raises(RuntimeError, match="leaf tensor"):
            FF.swiglu(x, x * 2.0, inplace_backward=True)
        with pytest.raises(RuntimeError, match="a view of a leaf tensor"):
            FF.swiglu(x[0], x[1] * 2.0, inplace_backward=True)
        with pytest.raises(RuntimeError, match="a view of a leaf tensor"):
            FF.swiglu(x.view(3, 2, 2), inplace_backward=True)  # packed
        h = x * 1.0
        with pytest.raises(RuntimeError, match="overlap in memory"):
            FF.swiglu(h, h, inplace_backward=True)
        flat = h.view(-1)  # gate and up partly overlapping: elements 4-7 are in both
        with pytest.raises(RuntimeError, match="overlap in memory"):
            FF.swiglu(flat[0:8], flat[4:12], inplace_backward=True)
        # A detached parameter shares its memory: the gradient would be written over it.
        w = torch.nn.Parameter(torch.randn(3, 4))
        for gate, up, name in ((x * 1.0, w.detach(), "up"), (w.detach(), x * 1.0, "gate")):
            with pytest.raises(RuntimeError, match=f"over {name}, which does not require grad"):
                FF.swiglu(gate, up, inplace_backward=True)
        # Adjacent, not overlapping; non-contiguous overlapping inputs are copied first.
        flat = (x * 1.0).view(-1)
        FF.swiglu(flat[0:6], flat[6:12], inplace_backward=True).sum().backward()
        h = x * 1.0
        FF.swiglu(h[:, 0:3], h[:, 1:4], inplace_backward=True).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwriting_a_saved_tensor_is_caught(backend):
    # The in-place backward bumps the version counters of gate and up (the native ops too), so
    # autograd refuses a backward that needs gate's old values elsewhere instead of using the
    # gradient written over them.
    skip_unless_available(backend, "glu", "cpu")
    x = torch.randn(3, 4, requires_grad=True)
    gate, up = x * 1.0, x * 2.0
    saved = gate.sin()  # saves gate; its backward runs after the GLU's (created earlier)
    with fastnn.use_backend(backend):
        out = FF.swiglu(gate, up, inplace_backward=True) + saved
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_triton_packed_rows_in_slabs_past_the_grid_limit(monkeypatch):
    """A packed GLU launches one program per (row, column block); past CUDA's 2^31 - 1 (over
    2^31 rows of H <= 1024) the rows go in slabs of views. The limit lowered to 5 programs
    here: 7 rows of two column blocks run in four launches, fwd, bwd and in-place bwd."""
    skip_unless_available("triton", "glu", "cpu")
    from fastnn.triton_kernels import glu as triton_glu

    gate_up = torch.randn(7, 2 * 1030, dtype=torch.float64)
    dh = torch.randn(7, 1030, dtype=torch.float64)
    whole = (
        triton_glu.glu_packed_fwd(gate_up, "silu"),
        triton_glu.glu_packed_bwd(dh, gate_up, "silu"),
    )
    monkeypatch.setattr(triton_glu, "MAX_PROGRAMS", 5)
    in_slabs = (
        triton_glu.glu_packed_fwd(gate_up, "silu"),
        triton_glu.glu_packed_bwd(dh, gate_up, "silu"),
    )
    overwritten = gate_up.clone()
    triton_glu.glu_packed_bwd_(dh, overwritten, "silu")
    for got, want in zip((*in_slabs, overwritten), (*whole, whole[1]), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_inplace_ops_write_the_out_of_place_results(packed, dtype):
    """glu_bwd_ / glu_packed_bwd_ leave exactly what glu_bwd / glu_packed_bwd return, over
    contiguous inputs (the kernel writes over what it reads), non-contiguous ones (through a
    copy) and a length with a vector tail (H = 37); overlapping gate / up are refused."""
    skip_unless_available("native", "glu", "cpu")
    gen = torch.Generator().manual_seed(11)
    for contiguous in (True, False):
        shape = (5, 74 if packed else 37)
        gate = torch.randn(shape[::-1] if not contiguous else shape, generator=gen).to(dtype)
        gate = gate if contiguous else gate.t()
        up = None if packed else torch.randn(shape, generator=gen).to(dtype)
        dh = torch.randn(5, 37, generator=gen).to(dtype)
        if packed:
            want = ops.get("native", "glu_packed_bwd")(dh, gate, "silu")
            ops.get("native", "glu_packed_bwd_")(dh, gate, "silu")
            assert torch.equal(gate, want)
        else:
            want = ops.get("native", "glu_bwd")(dh, gate, up, "silu")
            ops.get("native", "glu_bwd_")(dh, gate, up, "silu")
            assert torch.equal(gate, want[0]) and torch.equal(up, want[1])
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="overlap|same memory|single memory location"):
        ops.get("native", "glu_bwd_")(torch.randn(4, 6), x, x, "silu")


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_mlp_inplace_backward_same_grads(fused):
    torch.manual_seed(9)
    mlp = fastnn.SwiGLUMLP(8, 12, dtype=torch.float64, fused_gate_up=fused)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mlp(x).square().sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp.inplace_backward = True
    mlp(x).square().sum().backward()
    for p, g in zip(mlp.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_inplace_backward_under_compile_is_a_clear_error():
    mlp = fastnn.SwiGLUMLP(8, 16, inplace_backward=True)
    with pytest.raises(Exception, match="inplace_backward=True is for eager mode"):
        torch.compile(mlp, fullgraph=True, backend="aot_eager")(torch.randn(2, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["glu_bwd_", "glu_packed_bwd_"])
def test_opcheck_inplace_ops(backend, op):
    skip_unless_available(backend, "glu", "cpu")
    gen = torch.Generator().manual_seed(10)
    dh = torch.randn(3, 6, generator=gen)
    args = (
        (dh, torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen), "silu")
        if op == "glu_bwd_"
        else (dh, torch.randn(3, 12, generator=gen), "gelu")
    )
    torch.library.opcheck(getattr(torch.ops.fastnn, ops.PREFIX[backend] + op).default, args)
