"""RMSNorm and LayerNorm on a CUDA device: the native CUDA kernels and the compiled Triton
kernels against the fp64 reference in fp32 / fp16 / bf16 (fp64 on native), across every kernel
tier (register-resident rows, shared-memory staged rows, rows re-read from global memory, the
backward column tier, the scalar fallback for misaligned pointers and N not a multiple of the
vector width), N up to 262144, a tensor over 2^31 elements, bitwise reproducible dW / dB, mixed
parameter dtypes, zero rows and opcheck. Skipped without CUDA; the CPU and interpreter cases are
in test_rms_norm.py and test_layer_norm.py."""

import pytest
import torch
from conftest import skip_unless_available
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, RTOL, assert_rel_close
from torch.torch_version import TorchVersion

import fastnn
import fastnn.functional as FF
from fastnn import ops
from fastnn.reference import layer_norm as ref_ln
from fastnn.reference import rms_norm as ref_rms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ("native", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAMILY = {"rms": "rms_norm", "ln": "layer_norm"}

# N chosen to hit each tier: 7 and 1001 (scalar fallback: N % 8 != 0), 256 (one warp per row,
# several rows per block), 4096 and 8192 (register rows), 16384 (last register size of the
# 16-bit LayerNorm forward; backward column tier above 8K, but for the Triton backwards' 16-bit
# rows read twice), 24576 (forward staged in shared memory for LayerNorm, registers for
# RMSNorm), 32768 (the Triton RMSNorm backward's 16-bit rows in two halves), 65536 (bf16 RMSNorm
# forward staged; the Triton RMSNorm forward's 16-bit rows read twice, without a residual), 70000
# (scalar, rows in global memory), 262144 (bf16 rows of 512 KB: larger than shared memory,
# re-read from global memory / L2).
SHAPES = [
    (33, 7),
    (5, 1001),
    (300, 256),
    (64, 4096),
    (48, 8192),
    (12, 16384),
    (10, 24576),
    (8, 32768),
    (6, 65536),
    (3, 70000),
    (2, 262144),
]


def gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


PIECE = 1 << 26


def rand(shape, dtype, seed, scale=1.0, offset=0.0, misalign=0):
    """Random values in `dtype` on the GPU; with misalign > 0 the tensor starts `misalign`
    elements into its buffer (pointer not 16-byte aligned). Drawn in fp32 pieces of 2^26
    (one piece below that): a 2^31-element bf16 tensor needs 4 GB, not the 20 GB of whole
    fp32 temporaries, while 8 pytest-xdist workers share the GPU."""
    n = torch.Size(shape).numel() + misalign
    buf, g = torch.empty(n, device="cuda", dtype=dtype), gen(seed)
    for start in range(0, n, PIECE):
        piece = torch.randn(min(PIECE, n - start), generator=g, device="cuda")
        buf[start : start + piece.numel()] = piece * scale + offset
    return buf[misalign:].view(shape)


def make(kind, rows, n, dtype, residual=True, weight=True, bias=True, pdtype=None, misalign=0):
    pdtype = pdtype or dtype
    return {
        "x": rand((rows, n), dtype, 1, offset=0.5 if kind == "ln" else 0.0, misalign=misalign),
        "r": rand((rows, n), dtype, 2, misalign=misalign) if residual else None,
        "w": rand((n,), pdtype, 3, 0.5, 1.0, misalign=misalign) if weight else None,
        "b": rand((n,), pdtype, 4, 0.5, misalign=misalign) if bias and kind == "ln" else None,
        "dy": rand((rows, n), dtype, 5, misalign=misalign),
        "dres": rand((rows, n), dtype, 6, misalign=misalign) if residual else None,
    }


def run(kind, backend, c, eps):
    """Forward and backward ops of `backend`: (out, residual_out, stats, dx, dw, db)."""
    name = FAMILY[kind]
    fwd, bwd = ops.get(backend, f"{name}_fwd"), ops.get(backend, f"{name}_bwd")
    if kind == "rms":
        out, res_out, rstd = fwd(c["x"], c["r"], c["w"], eps)
        saved = res_out if c["r"] is not None else c["x"]
        dx, dw = bwd(c["dy"], c["dres"], saved, c["w"], rstd)
        return out, res_out, (rstd,), dx, dw, None
    out, res_out, mean, rstd = fwd(c["x"], c["r"], c["w"], c["b"], eps)
    saved = res_out if c["r"] is not None else c["x"]
    dx, dw, db = bwd(c["dy"], c["dres"], saved, c["w"], c["b"], mean, rstd)
    return out, res_out, (mean, rstd), dx, dw, db


def reference64(kind, c, eps):
    """The reference in fp64 from the rounded inputs; the residual sum rounded to the input
    dtype first, as the kernels and an unfused add round it."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    s = c["x"] if c["r"] is None else c["x"] + c["r"]
    if kind == "rms":
        out, _, rstd = ref_rms.rms_norm_fwd(d(s), None, d(c["w"]), eps)
        dx, dw = ref_rms.rms_norm_bwd(d(c["dy"]), d(c["dres"]), d(s), d(c["w"]), rstd)
        return s, out, (rstd,), dx, dw, None
    out, _, mean, rstd = ref_ln.layer_norm_fwd(d(s), None, d(c["w"]), d(c["b"]), eps)
    dx, dw, db = ref_ln.layer_norm_bwd(
        d(c["dy"]), d(c["dres"]), d(s), d(c["w"]), d(c["b"]), mean, rstd
    )
    return s, out, (mean, rstd), dx, dw, db


def check(kind, backend, c, eps=1e-5):
    dtype = c["x"].dtype
    out, res_out, stats, dx, dw, db = run(kind, backend, c, eps)
    s, out64, stats64, dx64, dw64, db64 = reference64(kind, c, eps)
    assert out.dtype == dtype and dx.dtype == dtype
    if c["r"] is not None:
        assert torch.equal(res_out, s), "residual_out is not the rounded sum input + residual"
    assert_rel_close(out, out64, dtype, FORWARD, "out")
    for got, want in zip(stats, stats64, strict=True):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_rel_close(got, want, dtype, FORWARD, "statistics")
    assert_rel_close(dx, dx64, dtype, INPUT_GRAD, "grad input")
    for got, want, p, what in ((dw, dw64, c["w"], "grad weight"), (db, db64, c["b"], "grad bias")):
        if p is None:
            continue
        assert got.dtype == p.dtype, f"{what}: dtype {got.dtype}, param {p.dtype}"
        tol_dtype = max(dtype, p.dtype, key=lambda t: RTOL[t][PARAM_GRAD])
        assert_rel_close(got, want, tol_dtype, PARAM_GRAD, what)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("rows,n", SHAPES, ids=[f"{r}x{n}" for r, n in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_against_fp64_reference(backend, kind, dtype, rows, n, residual):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    check(kind, backend, make(kind, rows, n, dtype, residual=residual))


@pytest.mark.parametrize("rows,n", [(300, 12288), (300, 16384), (300, 17000), (300, 32768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_long_rows_several_per_program(backend, kind, dtype, rows, n):
    """More rows than a persistent grid has row groups, so the Triton column kernel's programs
    sum several rows into one partial dW / dB row write; N = 17000 is not a multiple of 16
    (element-wise loads); bf16 16384 and 32768: the Triton RMSNorm backward's rows read twice
    (one tile, two halves), several per program."""
    skip_unless_available(backend, FAMILY[kind], "cuda")
    check(kind, backend, make(kind, rows, n, dtype))


@pytest.mark.parametrize("rows,n", [(7, 1024), (3, 24576), (2, 262144)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp64(backend, kind, rows, n):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    check(kind, backend, make(kind, rows, n, torch.float64))


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("rows,n", [(17, 520), (4, 32768)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_options(backend, kind, rows, n, weight, bias):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    check(kind, backend, make(kind, rows, n, torch.bfloat16, weight=weight, bias=bias))


@pytest.mark.parametrize("pdtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("rows,n", [(40, 1024), (4, 40000)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_param_dtype(backend, kind, rows, n, pdtype):
    """bf16 rows with fp32 / fp16 / fp64 weight and bias: out in bf16, dW / dB in the param's
    dtype (the kernels read same-dtype params directly, others converted to fp32)."""
    skip_unless_available(backend, FAMILY[kind], "cuda")
    check(kind, backend, make(kind, rows, n, torch.bfloat16, pdtype=pdtype))


def test_layer_norm_weight_and_bias_of_different_dtypes():
    skip_unless_available("native", "layer_norm", "cuda")
    c = make("ln", 19, 2048, torch.bfloat16)
    c["b"] = c["b"].float()
    check("ln", "native", c)


@pytest.mark.parametrize("rows,n", [(65, 4096), (6, 8192), (9, 24576), (5, 1001)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_pointers(backend, kind, dtype, rows, n):
    """Every tensor one element into its buffer: the scalar fallback, same results (bf16 8192:
    the Triton RMSNorm backward's unaligned rows read twice, unmasked)."""
    skip_unless_available(backend, FAMILY[kind], "cuda")
    c = make(kind, rows, n, dtype, misalign=1)
    assert c["x"].data_ptr() % 16 != 0
    check(kind, backend, c)
    aligned = {k: None if v is None else v.clone() for k, v in c.items()}
    got, want = run(kind, backend, c, 1e-5)[0], run(kind, backend, aligned, 1e-5)[0]
    # The same math in either path; only the order of the row reductions differs, which can move
    # a rounded output by one ulp of its dtype.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * want.abs().max().item())


@pytest.mark.parametrize("rows,n", [(4096, 1024), (600, 16384), (300, 24576), (100, 70000)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_weight_grads_bitwise_reproducible(backend, kind, rows, n):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    c = make(kind, rows, n, torch.bfloat16, pdtype=torch.float32)
    first = run(kind, backend, c, 1e-5)
    second = run(kind, backend, c, 1e-5)
    for a, b in zip(first[3:], second[3:], strict=True):
        if a is not None:
            assert torch.equal(a, b), "gradients differ between two runs"


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_zero_rows_and_zero_width(backend, kind):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    c = make(kind, 0, 64, torch.float16)
    out, res_out, stats, dx, dw, db = run(kind, backend, c, 1e-5)
    assert out.shape == res_out.shape == dx.shape == (0, 64)
    assert all(s.shape == (0,) for s in stats)
    assert torch.equal(dw, torch.zeros_like(c["w"]))
    c = make(kind, 3, 0, torch.float16)
    out, _, stats, dx, dw, _ = run(kind, backend, c, 1e-5)
    assert out.shape == dx.shape == (3, 0) and dw.shape == (0,)
    assert all(s.isnan().all() for s in stats)  # the mean of an empty row, as the reference


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_runs_the_norm_in_fp32_as_torch(backend, kind):
    # torch's CUDA autocast runs layer_norm (and rms_norm from torch 2.12) in fp32 (bf16 in, fp32
    # out; torch 2.11: rms_norm bf16 out); the fused residual add stays in the input's dtype, as
    # the unfused `x + r` does under autocast.
    skip_unless_available(backend, FAMILY[kind], "cuda")
    c = make(kind, 16, 512, torch.bfloat16, pdtype=torch.float32)
    x, r, w, b = c["x"], c["r"], c["w"], c["b"]
    ours = (lambda t, **kw: FF.rms_norm(t, (512,), w, 1e-5, **kw)) if kind == "rms" else (
        lambda t, **kw: FF.layer_norm(t, (512,), w, b, 1e-5, **kw)
    )  # fmt: skip
    theirs = (lambda t: torch.nn.functional.rms_norm(t, (512,), w, 1e-5)) if kind == "rms" else (
        lambda t: torch.nn.functional.layer_norm(t, (512,), w, b, 1e-5)
    )  # fmt: skip
    with fastnn.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        out, (out_r, s) = ours(x), ours(x, residual=r)
        ref, ref_s = theirs(x), x + r
        ref_r = theirs(ref_s)
    fp32 = kind == "ln" or TorchVersion(torch.__version__) >= (2, 12)
    assert out.dtype == ref.dtype == (torch.float32 if fp32 else torch.bfloat16)
    assert out_r.dtype == ref_r.dtype and s.dtype == ref_s.dtype == torch.bfloat16
    # bf16 results: torch's bf16 tolerance (one rounding of the output apart at most)
    tol = dict(rtol=1e-5, atol=1e-5) if fp32 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out_r, ref_r, **tol)
    assert torch.equal(s, ref_s)


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend, kind):
    skip_unless_available(backend, FAMILY[kind], "cuda")
    name = FAMILY[kind]
    for residual, weight in ((True, True), (False, False)):
        c = make(kind, 6, 40, torch.float32, residual=residual, weight=weight, bias=weight)
        x, r = c["x"].requires_grad_(), None if c["r"] is None else c["r"].requires_grad_()
        fwd_args = (x, r, c["w"], 1e-5) if kind == "rms" else (x, r, c["w"], c["b"], 1e-5)
        torch.library.opcheck(ops.get(backend, f"{name}_fwd"), fwd_args)
        with torch.no_grad():  # the backward op's inputs must not require grad themselves
            outs = ops.get(backend, f"{name}_fwd")(c["x"], c["r"], c["w"], *fwd_args[3:])
        saved = outs[1] if residual else c["x"].detach()
        if kind == "rms":
            bwd_args = (c["dy"], c["dres"], saved, c["w"], outs[2])
        else:
            bwd_args = (c["dy"], c["dres"], saved, c["w"], c["b"], outs[2], outs[3])
        torch.library.opcheck(ops.get(backend, f"{name}_bwd"), bwd_args)


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_over_2_31_elements(backend, kind):
    """[32769, 65536] bf16: the last row starts at element 2^31 (int64 offsets). Rows at both
    ends are checked against the reference; dW against a chunked fp32 torch computation."""
    skip_unless_available(backend, FAMILY[kind], "cuda")
    rows, n = 32769, 65536
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 30 GB of GPU memory")
    try:
        check_over_2_31_elements(kind, backend, rows, n)
    finally:
        torch.cuda.empty_cache()  # ~17 GB cached otherwise, under the other workers' tests


def check_over_2_31_elements(kind, backend, rows, n):
    c = make(kind, rows, n, torch.bfloat16, residual=False, bias=False)
    out, _, stats, dx, dw, _ = run(kind, backend, c, 1e-5)
    for sel in ([0, 1], [rows - 2, rows - 1]):
        part = {k: None if v is None or v.dim() == 1 else v[sel] for k, v in c.items()}
        part["w"], part["b"] = c["w"], c["b"]
        _, out64, _, dx64, _, _ = reference64(kind, part, 1e-5)
        assert_rel_close(out[sel], out64, torch.bfloat16, FORWARD, f"out rows {sel}")
        assert_rel_close(dx[sel], dx64, torch.bfloat16, INPUT_GRAD, f"grad input rows {sel}")
    want = torch.zeros(n, dtype=torch.float64, device="cuda")
    for start in range(0, rows, 4096):
        x, dy = c["x"][start : start + 4096].float(), c["dy"][start : start + 4096].float()
        if kind == "rms":
            xhat = x * stats[0][start : start + 4096, None]
        else:
            xhat = (x - stats[0][start : start + 4096, None]) * stats[1][start : start + 4096, None]
        want += (dy * xhat).sum(0).double()
    assert_rel_close(dw, want, torch.bfloat16, PARAM_GRAD, "grad weight")
