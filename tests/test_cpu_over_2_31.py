"""The native CPU kernels on bf16 tensors of more than 2^31 elements (int64 offsets): RMSNorm and
LayerNorm forward and backward, the GLU forward, backward and packed forward, an RMSprop step.

Inputs are [ROWS, N] with the last row starting at element 2^31: PERIOD random rows repeated to
fill the tensor, then one more random row. Every row must then equal its twin among the first
PERIOD (the kernels compute each row alone), which checks the whole tensor in chunks; the first
PERIOD rows and the last one are checked against the fp64 reference, and dW / dB against
(ROWS - 1) / PERIOD times the first rows' reference plus the last row's. About 10 s and 12 GB a
test on the 2-core development VM; skipped where less memory is available. The CUDA cases are
in test_norms_gpu.py and test_glu_gpu.py. (Adam's state takes one tensor more than RMSprop's:
16 GB; the two share the CPU kernels' int64 split of the elements into ranges.)"""

import os

import pytest
import torch
from conftest import skip_unless_available
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, assert_rel_close

import fastnn
from fastnn import ops
from fastnn.reference import glu as ref_glu
from fastnn.reference import layer_norm as ref_ln
from fastnn.reference import rms_norm as ref_rms

N = 4096
ROWS = 2**31 // N + 1
PERIOD = 64
CHUNK_ROWS = 64 * PERIOD  # rows compared against their twins at a time (16 MB of bf16)
NEEDS_GB = 16


def available_gb():
    if not os.path.exists("/proc/meminfo"):
        return 0.0
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


# slow: CI runs them; `make gpu-check` (-m "not slow") leaves these CPU cases to CI.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        available_gb() < NEEDS_GB, reason=f"needs {NEEDS_GB} GB of available memory (Linux)"
    ),
]


def periodic(seed, n=N, dtype=torch.bfloat16):
    """[ROWS, n]: PERIOD random rows repeated, then a last random row at element (ROWS - 1) n."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(ROWS, n, dtype=dtype)
    block = torch.randn(PERIOD, n, generator=g).to(dtype)
    t[:-1].view(-1, PERIOD, n).copy_(block.expand((ROWS - 1) // PERIOD, PERIOD, n))
    t[-1].copy_(torch.randn(n, generator=g))
    return t


def assert_periodic(t, what):
    """Every row of t but the last equals its twin among the first PERIOD rows, bitwise."""
    first = t[:PERIOD].unsqueeze(0)
    for start in range(0, ROWS - 1, CHUNK_ROWS):
        chunk = t[start : min(start + CHUNK_ROWS, ROWS - 1)].view(-1, PERIOD, *t.shape[1:])
        same = chunk == first
        if t.is_floating_point():
            same |= chunk.isnan() & first.isnan()
        assert same.all(), f"{what}: rows from {start} differ from their twins in rows 0..{PERIOD}"


def ends(t):
    """The first PERIOD rows and the last, in fp64."""
    return torch.cat([t[:PERIOD], t[-1:]]).double()


def param_grad_want(per_row):
    """sum over all rows of a [PERIOD + 1, N] per-row fp64 term (the first rows then the last)."""
    return per_row[:PERIOD].sum(0) * ((ROWS - 1) // PERIOD) + per_row[-1]


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_over_2_31_elements(kind):
    name = {"rms": "rms_norm", "ln": "layer_norm"}[kind]
    skip_unless_available("native", name, "cpu")
    fwd, bwd = ops.get("native", f"{name}_fwd"), ops.get("native", f"{name}_bwd")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(N, generator=g) * 0.5 + 1).bfloat16()
    b = (torch.randn(N, generator=g) * 0.5).bfloat16() if kind == "ln" else None
    x = periodic(1)
    x64, w64 = ends(x), w.double()
    if kind == "rms":
        out, _, rstd = fwd(x, None, w, 1e-5)
        stats = (rstd,)
        out64, _, rstd64 = ref_rms.rms_norm_fwd(x64, None, w64, 1e-5)
        stats64 = (rstd64,)
    else:
        out, _, mean, rstd = fwd(x, None, w, b, 1e-5)
        stats = (mean, rstd)
        out64, _, mean64, rstd64 = ref_ln.layer_norm_fwd(x64, None, w64, b.double(), 1e-5)
        stats64 = (mean64, rstd64)
    assert_rel_close(ends(out), out64, torch.bfloat16, FORWARD, "out, rows at both ends")
    assert_periodic(out, "out")
    del out
    for got, want in zip(stats, stats64, strict=True):
        assert_rel_close(ends(got), want, torch.bfloat16, FORWARD, "statistics at both ends")
        assert_periodic(got, "statistics")

    dy = periodic(2)
    dy64 = ends(dy)
    if kind == "rms":
        dx, dw = bwd(dy, None, x, w, rstd)
        xhat = x64 * ends(rstd)[:, None]
        dx64, _ = ref_rms.rms_norm_bwd(dy64, None, x64, w64, ends(rstd))
        grads = ((dw, dy64 * xhat, "grad weight"),)
    else:
        dx, dw, db = bwd(dy, None, x, w, b, mean, rstd)
        xhat = (x64 - ends(mean)[:, None]) * ends(rstd)[:, None]
        dx64, _, _ = ref_ln.layer_norm_bwd(dy64, None, x64, w64, b.double(), ends(mean), ends(rstd))
        grads = ((dw, dy64 * xhat, "grad weight"), (db, dy64, "grad bias"))
    assert_rel_close(ends(dx), dx64, torch.bfloat16, INPUT_GRAD, "grad input, rows at both ends")
    assert_periodic(dx, "grad input")
    for got, per_row, what in grads:
        assert_rel_close(got, param_grad_want(per_row), torch.bfloat16, PARAM_GRAD, what)


def test_glu_over_2_31_elements():
    """gate = up = grad_out (one 4 GB tensor) for the plain pair, to stay within 12 GB."""
    skip_unless_available("native", "glu", "cpu")
    g = periodic(1)
    g64 = ends(g)
    out = ops.get("native", "glu_fwd")(g, g, "silu")
    assert_rel_close(ends(out), ref_glu.glu_fwd(g64, g64, "silu"), torch.bfloat16, FORWARD, "out")
    assert_periodic(out, "out")
    del out
    dg, du = ops.get("native", "glu_bwd")(g, g, g, "silu")
    dg64, du64 = ref_glu.glu_bwd(g64, g64, g64, "silu")
    assert_rel_close(ends(dg), dg64, torch.bfloat16, INPUT_GRAD, "grad gate")
    assert_rel_close(ends(du), du64, torch.bfloat16, INPUT_GRAD, "grad up")
    assert_periodic(dg, "grad gate")
    assert_periodic(du, "grad up")
    del dg, du
    out = ops.get("native", "glu_packed_fwd")(g, "silu")  # [ROWS, N / 2]
    want = ref_glu.glu_packed_fwd(g64, "silu")
    assert_rel_close(ends(out), want, torch.bfloat16, FORWARD, "packed out")
    assert_periodic(out, "packed out")


def test_rmsprop_over_2_31_elements():
    """One step of a bf16 param of ROWS x N elements (param, grad and square_avg: 12 GB); the
    rows at both ends against the torch backend's step of them."""
    skip_unless_available("native", "rmsprop", "cpu")
    p = periodic(1)
    ref = torch.cat([p[:PERIOD], p[-1:]])
    p.grad = periodic(2)
    ref.grad = ends(p.grad).bfloat16()
    opt = fastnn.optim.RMSprop([p], lr=0.01)
    ref_opt = fastnn.optim.RMSprop([ref], lr=0.01)
    with fastnn.use_backend("native"):
        opt.step()
    with fastnn.use_backend("torch"):
        ref_opt.step()
    torch.testing.assert_close(ends(p), ref.double(), rtol=0, atol=0)
    torch.testing.assert_close(
        ends(opt.state[p]["square_avg"]), ref_opt.state[ref]["square_avg"].double(), rtol=0, atol=0
    )
    assert_periodic(p, "param")
    assert_periodic(opt.state[p]["square_avg"], "square_avg")
