"""GLU family on a CUDA device: the native CUDA and compiled Triton kernels against the fp64
reference, the vector / scalar paths (ragged sizes, misaligned pointers, packed H not a multiple
of the vector width), a tensor over 2^31 elements, extreme gates, opcheck and an inductor
compile of SwiGLUMLP. Skipped without CUDA; the CPU cases are in test_glu.py."""

import pytest
import torch
from conftest import skip_unless_available
from test_glu import gelu_tail_errors
from tolerances import FORWARD, INPUT_GRAD, assert_rel_close

import fastnn
from fastnn import ops
from fastnn.reference import glu as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ("native", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make(shape, dtype, offset=0, seed=0):
    """gate, up, grad_out on the GPU in `dtype`; with offset > 0 each starts `offset` elements
    into a larger buffer, so its pointer is not 16-byte aligned."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = torch.Size(shape).numel()
    out = []
    for scale in (2.0, 1.0, 1.0):
        buf = torch.randn(n + offset, generator=gen, device="cuda", dtype=torch.float32) * scale
        out.append(buf.to(dtype)[offset:].view(shape))
    return out


def check_against_reference(backend, activation, g, u, dh):
    dtype = g.dtype
    g64, u64, dh64 = g.double(), u.double(), dh.double()
    out = ops.get(backend, "glu_fwd")(g, u, activation)
    dg, du = ops.get(backend, "glu_bwd")(dh, g, u, activation)
    assert_rel_close(out, ref.glu_fwd(g64, u64, activation), dtype, FORWARD, "out")
    dg64, du64 = ref.glu_bwd(dh64, g64, u64, activation)
    assert_rel_close(dg, dg64, dtype, INPUT_GRAD, "grad_gate")
    assert_rel_close(du, du64, dtype, INPUT_GRAD, "grad_up")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
# aligned and a multiple of every vector width; ragged (tail); prime; large
@pytest.mark.parametrize("shape", [(64, 256), (3, 1001), (1, 7), (4096, 2050)])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_against_reference(backend, activation, dtype, shape, offset):
    skip_unless_available(backend, "glu", "cuda")
    g, u, dh = make(shape, dtype, offset)
    check_against_reference(backend, activation, g, u, dh)


# native: activations.h's split exponent with CUDA's expf (2 ulp): the bound is a third of what
# erfcf of a rounded g / sqrt2 gives (1.2e-5 at g = -13). Triton: tl.exp rounds y log2e first,
# up to 3e-6 relative at y = -85.
@pytest.mark.parametrize(("backend", "rtol"), [("native", 4e-6), ("triton", 2e-5)])
def test_cuda_gelu_accurate_in_the_lower_tail(backend, rtol):
    skip_unless_available(backend, "glu", "cuda")
    out_error, grad_error = gelu_tail_errors(backend, "cuda")
    assert out_error <= rtol and grad_error <= rtol, (out_error, grad_error)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 3, 8, 1000, 11008])  # H % 8 != 0 takes the scalar path
def test_cuda_packed(backend, activation, dtype, H):
    skip_unless_available(backend, "glu", "cuda")
    g, u, dh = make((33, H), dtype)
    gu = torch.cat([g, u], dim=-1)
    g64, u64, dh64 = g.double(), u.double(), dh.double()
    out = ops.get(backend, "glu_packed_fwd")(gu, activation)
    dgu = ops.get(backend, "glu_packed_bwd")(dh, gu, activation)
    assert_rel_close(out, ref.glu_fwd(g64, u64, activation), dtype, FORWARD, "packed out")
    dgu64 = torch.cat(ref.glu_bwd(dh64, g64, u64, activation), dim=-1)
    assert_rel_close(dgu, dgu64, dtype, INPUT_GRAD, "packed grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_cuda_extreme_gates(backend, activation):
    skip_unless_available(backend, "glu", "cuda")
    g = torch.tensor([-1e30, -1000.0, -100.0, 0.0, 100.0, 1000.0, 1e30], device="cuda")
    u = torch.ones_like(g)
    out = ops.get(backend, "glu_fwd")(g, u, activation)
    dg, du = ops.get(backend, "glu_bwd")(u, g, u, activation)
    for t in (out, dg, du):
        assert torch.isfinite(t).all(), t


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_over_2_31_elements(backend):
    """int64 offsets: a bf16 gate / up of 2^31 + 8 elements; the last elements are checked."""
    skip_unless_available(backend, "glu", "cuda")
    n = 2**31 + 8
    if torch.cuda.get_device_properties(0).total_memory < 6 * n * 2 + (4 << 30):
        pytest.skip("needs about 30 GB of GPU memory")
    try:
        check_over_2_31_elements(backend, n)
    finally:
        torch.cuda.empty_cache()  # ~16 GB cached otherwise, under the other workers' tests


def check_over_2_31_elements(backend, n):
    g = torch.empty(n, device="cuda", dtype=torch.bfloat16).uniform_(-4, 4)
    u = torch.empty(n, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
    out = ops.get(backend, "glu_fwd")(g, u, "silu")
    tail = slice(n - 4096, n)
    expect = ref.glu_fwd(g[tail].double(), u[tail].double(), "silu")
    assert_rel_close(out[tail], expect, torch.bfloat16, FORWARD, "tail of out")
    del out
    dg, du = ops.get(backend, "glu_bwd")(u, g, u, "silu")
    dg64, du64 = ref.glu_bwd(u[tail].double(), g[tail].double(), u[tail].double(), "silu")
    assert_rel_close(dg[tail], dg64, torch.bfloat16, INPUT_GRAD, "tail of grad_gate")
    assert_rel_close(du[tail], du64, torch.bfloat16, INPUT_GRAD, "tail of grad_up")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_packed_row_of_over_65535_blocks(backend):
    """A packed row whose H needs more than 65535 blocks of 1024 (the limit of a grid's second
    axis): 2 rows of H = 65535 * 1024 + 1 in bf16 (0.5 GB); each row's tail is checked."""
    skip_unless_available(backend, "glu", "cuda")
    H = 65535 * 1024 + 1
    gu = torch.empty(2, 2 * H, device="cuda", dtype=torch.bfloat16).uniform_(-4, 4)
    dh = torch.empty(2, H, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
    out = ops.get(backend, "glu_packed_fwd")(gu, "silu")
    dgu = ops.get(backend, "glu_packed_bwd")(dh, gu, "silu")
    tail = slice(H - 2048, H)
    g64, u64 = gu[:, :H][:, tail].double(), gu[:, H:][:, tail].double()
    expect = ref.glu_fwd(g64, u64, "silu")
    assert_rel_close(out[:, tail], expect, torch.bfloat16, FORWARD, "tail of out")
    dg64, du64 = ref.glu_bwd(dh[:, tail].double(), g64, u64, "silu")
    assert_rel_close(dgu[:, :H][:, tail], dg64, torch.bfloat16, INPUT_GRAD, "tail of grad_gate")
    assert_rel_close(dgu[:, H:][:, tail], du64, torch.bfloat16, INPUT_GRAD, "tail of grad_up")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["glu_fwd", "glu_bwd", "glu_packed_fwd", "glu_packed_bwd"])
def test_cuda_opcheck(backend, op):
    skip_unless_available(backend, "glu", "cuda")
    g, u, dh = make((5, 24), torch.bfloat16)
    gu = torch.cat([g, u], dim=-1)
    grad = op in ("glu_fwd", "glu_packed_fwd")
    args = {
        "glu_fwd": (g.requires_grad_(grad), u.requires_grad_(grad), "silu"),
        "glu_bwd": (dh, g, u, "gelu"),
        "glu_packed_fwd": (gu.requires_grad_(grad), "gelu_tanh"),
        "glu_packed_bwd": (dh, gu, "silu"),
    }[op]
    torch.library.opcheck(ops.get(backend, op), args)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_mlp_inductor_fullgraph(backend, fused):
    skip_unless_available(backend, "glu", "cuda")
    torch.manual_seed(0)
    mlp = fastnn.SwiGLUMLP(256, 512, device="cuda", dtype=torch.bfloat16, fused_gate_up=fused)
    x = torch.randn(8, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastnn.use_backend(backend):
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager)
        compiled.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1])  # vector and scalar paths of the in-place kernel
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_inplace_backward_writes_the_out_of_place_results(backend, dtype, offset, packed):
    skip_unless_available(backend, "glu", "cuda")
    if packed:
        (gate_up,) = make((64, 2 * 1000), dtype, offset)[:1]
        dh = make((64, 1000), dtype, seed=1)[2]
        want = ops.get(backend, "glu_packed_bwd")(dh, gate_up, "silu")
        ops.get(backend, "glu_packed_bwd_")(dh, gate_up, "silu")
        assert torch.equal(gate_up, want)
    else:
        g, u, dh = make((64, 1001), dtype, offset)
        want = ops.get(backend, "glu_bwd")(dh, g, u, "silu")
        ops.get(backend, "glu_bwd_")(dh, g, u, "silu")
        assert torch.equal(g, want[0]) and torch.equal(u, want[1])
