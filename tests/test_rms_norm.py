"""RMSNorm (optionally fused with the residual add) on every backend and device, against torch's
F.rms_norm in float64 (tests/norm_cases.py holds the oracle and the shared checks)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from norm_cases import (
    BACKEND_DEVICES,
    DTYPES,
    INTERPRETER_MAX_N,
    LARGE_SHAPES,
    SHAPES,
    assert_ratio,
    check_against_oracle,
    check_compile_block,
    check_deterministic,
    check_double_backward,
    check_eps,
    check_grad_subsets,
    check_module_dropin,
    check_noncontiguous,
    check_nonfinite_confined,
    check_triton_alignment_seen,
    check_triton_long_row_backward,
    check_triton_looping_forward,
    check_zero_rows,
    gradcheck_case,
    make_case,
    opcheck_ops,
    randn,
    skip,
    spy_launches,
    ulp_slack,
)

import fastnn
from fastnn import functional as FF

KIND = "rms"


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,nshape", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_matches_fp64_reference(backend, device, dtype, shape, nshape, residual):
    skip(KIND, backend, device)
    case = make_case(KIND, shape, nshape, dtype, device, residual=residual)
    # With N = 1 the input gradient is eps / (x^2 + eps)^1.5: at eps = 1e-6 it is the difference
    # of two terms 1e6 times larger, ill-conditioned in any fp32 kernel; eps = 1 keeps it a test.
    eps = 1.0 if nshape == (1,) else 1e-6
    check_against_oracle(KIND, backend, device, case, nshape, eps, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,nshape", LARGE_SHAPES, ids=[str(s[0]) for s in LARGE_SHAPES])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_large_hidden_size(backend, device, shape, nshape, dtype):
    if backend == "triton" and device == "cpu":
        if nshape[0] > INTERPRETER_MAX_N:
            pytest.skip("70K-wide rows take minutes under the Triton interpreter; runs on a GPU")
    skip(KIND, backend, device)
    case = make_case(KIND, shape, nshape, dtype, device)
    check_against_oracle(KIND, backend, device, case, nshape, 1e-6, dtype)


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_options(backend, device, residual, weight):
    skip(KIND, backend, device)
    case = make_case(KIND, (11, 48), (48,), torch.float32, device, residual, weight)
    check_against_oracle(KIND, backend, device, case, (48,), 1e-6, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bf16_input_fp32_weight(backend, device):
    """A mixed-precision module: the result has torch's dtype (the input's), dW the weight's."""
    skip(KIND, backend, device)
    case = make_case(KIND, (8, 72), (72,), torch.bfloat16, device, param_dtype=torch.float32)
    want = F.rms_norm(case["x"] + case["r"], (72,), case["w"], 1e-6)
    with fastnn.use_backend(backend):
        out, _ = FF.rms_norm(case["x"], (72,), case["w"], 1e-6, residual=case["r"])
    assert out.dtype == want.dtype == torch.bfloat16
    check_against_oracle(KIND, backend, device, case, (72,), 1e-6, torch.bfloat16)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_fp64_input_16bit_weight(backend, device, weight_dtype):
    """fp64 input with a 16-bit weight: the output is fp64, as torch's, and dW is rounded to the
    weight's dtype as torch casts fp64 to 16 bits (through fp32). The Triton partial sums' direct
    fp64 -> bf16 cast gave NaN, 0 and subnormals under the interpreter."""
    skip(KIND, backend, device)
    x = randn((8, 72), torch.float64, device, seed=1).requires_grad_()
    w = randn((72,), weight_dtype, device, seed=2).requires_grad_()
    dy = randn((8, 72), torch.float64, device, seed=3)
    want = torch.autograd.grad(F.rms_norm(x, (72,), w, 1e-6), (x, w), dy)
    with fastnn.use_backend(backend):
        out = FF.rms_norm(x, (72,), w, 1e-6)
        got = torch.autograd.grad(out, (x, w), dy)
    assert out.dtype == torch.float64 and got[1].dtype == weight_dtype
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])  # the 16-bit dtype's default tolerance


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_zero_rows(backend, device):
    skip(KIND, backend, device)
    check_zero_rows(KIND, backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_for_input_only_or_weight_only(backend, device):
    skip(KIND, backend, device)
    check_grad_subsets(KIND, backend, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_and_misaligned(backend, device, dtype):
    skip(KIND, backend, device)
    check_noncontiguous(KIND, backend, device, dtype)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e3])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_eps_extremes(backend, device, eps):
    skip(KIND, backend, device)
    check_eps(KIND, backend, device, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_eps_none_as_torch(backend, device, dtype):
    """eps=None is torch.finfo of the compute dtype (fp32 for bf16 input, not bf16's 2^-7): on
    inputs of scale 1e-4 the mean square (1e-8) is below either choice of eps, so a wrong
    default changes the result by orders of magnitude."""
    skip(KIND, backend, device)
    x = randn((6, 50), dtype, device, scale=1e-4, seed=40)
    w = randn((50,), dtype, device, offset=1.0, seed=41)
    with fastnn.use_backend(backend):
        out = FF.rms_norm(x, (50,), w)
    ref64 = F.rms_norm(x.double(), (50,), w.double(), torch.finfo(x.float().dtype).eps)
    if dtype == torch.float64:
        ref64 = F.rms_norm(x, (50,), w)
    eager = F.rms_norm(x, (50,), w)
    torch.testing.assert_close(eager.double(), ref64, rtol=3e-2, atol=0)  # torch agrees
    assert_ratio(out, ref64, eager, ulp_slack(ref64, dtype, backend, device), "out")


# N = 6001 and 40001: rows past the Triton backward's whole-row tiles (its column kernels).
@pytest.mark.parametrize("n", [40, 6001, 40001])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_nan_and_inf_stay_in_their_row(backend, device, n):
    skip(KIND, backend, device)
    check_nonfinite_confined(KIND, backend, device, n)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_weight_grad_bitwise_deterministic(backend, device):
    skip(KIND, backend, device)
    check_deterministic(KIND, backend, device)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_gradcheck_fp64(backend):
    skip(KIND, backend, "cpu")
    gradcheck_case(KIND, backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_double_backward(backend, device):
    skip(KIND, backend, device)
    check_double_backward(KIND, backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    skip(KIND, backend, device)
    opcheck_ops(KIND, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_compile_fullgraph_block(backend, device):
    skip(KIND, backend, device)
    check_compile_block(KIND, backend, device)


@pytest.mark.parametrize("device", DEVICES)
def test_module_is_a_drop_in(device):
    check_module_dropin(KIND, device)


# ---- Bad input: a clear error naming the problem ---------------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_inputs(backend, device):
    skip(KIND, backend, device)
    x = randn((4, 8), torch.float32, device)
    with fastnn.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"weight of shape \[5\].*normalized_shape \[8\]"):
            FF.rms_norm(x, (8,), torch.ones(5, device=device))
        with pytest.raises(RuntimeError, match=r"input of shape \[4, 8\].*normalized_shape \[7\]"):
            FF.rms_norm(x, (7,))
        for bad in (torch.int64, torch.complex64):
            with pytest.raises(RuntimeError, match=str(bad)):
                FF.rms_norm(x.to(bad), (8,))
        with pytest.raises(RuntimeError, match=r"weight is on meta.*input is on"):
            FF.rms_norm(x, (8,), torch.ones(8, device="meta"))
        with pytest.raises(RuntimeError, match=r"residual of shape \[4, 7\]"):
            FF.rms_norm(x, (8,), residual=x[:, :7])
        with pytest.raises(RuntimeError, match=r"residual must be float.*got torch.int32"):
            FF.rms_norm(x, (8,), residual=x.int())


def test_native_op_checks_arguments():
    """The C++ ops are public (torch.ops.fastnn.*): they check their own arguments too."""
    skip(KIND, "native", "cpu")
    fwd, bwd = torch.ops.fastnn.rms_norm_fwd, torch.ops.fastnn.rms_norm_bwd
    x = torch.randn(4, 8)
    rstd = torch.ones(4)
    cases = [
        (lambda: fwd(x[0], None, None, 1e-5), r"2-D input"),
        (lambda: fwd(x.long(), None, None, 1e-5), r"input must be float32.*got Long"),
        (lambda: fwd(x, None, torch.ones(5), 1e-5), r"weight must have shape \[8\], got \[5\]"),
        (lambda: fwd(x, None, torch.ones(8, dtype=torch.int32), 1e-5), r"weight must be"),
        (lambda: fwd(x, x[:, :7], None, 1e-5), r"residual of shape \[4, 7\]"),
        (lambda: fwd(x, x.double(), None, 1e-5), r"residual has dtype Double"),
        (lambda: bwd(x, None, x, None, rstd.double()), r"rstd must be Float"),
        (lambda: bwd(x, None, x, None, rstd[:3]), r"rstd must have shape \[4\]"),
        (lambda: bwd(x[:3], None, x, None, rstd), r"grad_out of shape \[3, 8\]"),
        (lambda: bwd(x, x.half(), x, None, rstd), r"grad_residual_out has dtype Half"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_triton_partial_sums_over_several_rounds():
    """The dW / dB column sum of the Triton backward over more partial rows than one of its tiles
    holds (a GPU's persistent grids write hundreds; the interpreter's write 4, one round)."""
    skip(KIND, "triton", "cpu")
    from fastnn.triton_kernels.norm_common import REDUCE_TILE, reduce_partials

    part = randn((300, 100), torch.float32, "cpu")  # 100 columns: blocks of 32, 256 rows each
    assert REDUCE_TILE // 32 < 300
    out = reduce_partials(part, torch.empty(100))
    torch.testing.assert_close(out.double(), part.double().sum(0), rtol=1e-6, atol=1e-5)
    assert torch.equal(reduce_partials(part, torch.empty(100)), out)
    as_bf16 = reduce_partials(part, torch.empty(100, dtype=torch.bfloat16))
    assert as_bf16.dtype == torch.bfloat16


# bf16 rows: 16400 is past the whole-row tiles, 8200 (not a multiple of 16) past their lower cap
# for rows loaded element by element.
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("n", [16400, 8200])
def test_triton_long_row_backward(n, weight, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_long_row_backward(KIND, n, weight, False, monkeypatch)


# bf16 rows past the register-resident tiles but whole, read twice: 8208 and 16384 in a tile of
# 16K (masked, and not), 6001 (not a multiple of 16) in one of 8K, 32768 in two halves.
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("n,halves", [(8208, 1), (16384, 1), (6001, 1), (32768, 2)])
def test_triton_reread_backward(n, halves, weight, residual, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_long_row_backward(KIND, n, weight, False, monkeypatch, halves, residual)


# A NaN and an Inf in rows read twice (16-bit, 16K and 32K) stay in their rows.
@pytest.mark.parametrize("n", [16384, 32768])
def test_triton_nan_and_inf_stay_in_rows_read_twice(n):
    skip(KIND, "triton", "cpu")
    check_nonfinite_confined(KIND, "triton", "cpu", n, torch.bfloat16)


# bf16 rows of exactly 64K: whole, read twice after their reduction (rms_fwd_rereads); with a
# residual the forward loops over column blocks.
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_reread_forward(residual, weight, monkeypatch):
    skip(KIND, "triton", "cpu")
    from fastnn.triton_kernels import rms_norm

    launches = spy_launches(monkeypatch, rms_norm, "_rms_fwd_kernel", ("SINGLE", "REREAD"))
    n = rms_norm.FWD_REREAD_BLOCK
    case = make_case(KIND, (3, n), (n,), torch.bfloat16, "cpu", residual=residual, weight=weight)
    check_against_oracle(KIND, "triton", "cpu", case, (n,), 1e-6, torch.bfloat16)
    assert launches == [(False, False) if residual else (True, True)], launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_looping_forward(dtype, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_looping_forward(KIND, dtype, monkeypatch)


def test_triton_alignment_seen(monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_alignment_seen(KIND, monkeypatch)
