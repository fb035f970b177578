"""LayerNorm (optionally fused with the residual add) on every backend and device, against torch's
F.layer_norm in float64 (tests/norm_cases.py holds the oracle and the shared checks)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, ops
from norm_cases import (
    BACKEND_DEVICES,
    DTYPES,
    INTERPRETER_MAX_N,
    LARGE_SHAPES,
    SHAPES,
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
    run_fastnn,
    skip,
)
from tolerances import RTOL, rel_error

import fastnn
from fastnn import functional as FF

KIND = "ln"


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,nshape", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_matches_fp64_reference(backend, device, dtype, shape, nshape, residual):
    skip(KIND, backend, device)
    case = make_case(KIND, shape, nshape, dtype, device, residual=residual)
    if nshape == (1,):
        check_single_element_rows(backend, case)
        return
    check_against_oracle(KIND, backend, device, case, nshape, 1e-5, dtype)


def check_single_element_rows(backend, case):
    """N = 1: x - mean(x) is exactly 0, so out = bias, dW = 0, and the input gradient is only the
    residual's: dy * w - mean(dy * w) cancels to 0 up to one rounding of the product (a kernel
    may fuse it into an FMA). The fp64 oracle's own mean rounds to about 1e-15, so a relative
    error against it means nothing here."""
    out, res_out, dx, dr, dw, db = run_fastnn(KIND, backend, case, (1,), 1e-5)
    torch.testing.assert_close(out, case["b"].expand_as(out), rtol=0, atol=0)
    want_dx = case["dres"] if case["dres"] is not None else torch.zeros_like(dx)
    product = (case["dy"].double() * case["w"].double()).abs().max().item()
    rstd = 1e-5**-0.5  # the variance of one element is 0
    one_rounding = torch.finfo(dx.dtype).eps * max(product, 1.0) * rstd
    torch.testing.assert_close(dx, want_dx, rtol=torch.finfo(dx.dtype).eps, atol=one_rounding)
    torch.testing.assert_close(dw, torch.zeros_like(dw), rtol=0, atol=0)
    torch.testing.assert_close(db, case["dy"].sum(0).to(db.dtype), rtol=RTOL[db.dtype][2], atol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("n", [1000, INTERPRETER_MAX_N, 32768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_constant_rows_give_the_bias(backend, device, dtype, n, residual):
    """A row of one value has variance 0, so its output is the bias exactly, as torch's on the
    CPU: its mean must be that value exactly. Taken as a rounded sum / N, rows of 0.1 or -7.3
    came out an ulp off, which rstd = 1 / sqrt(1e-12) made outputs of 0.03 to 0.9. The sizes
    reach each kernel tier: N = 1000 whole rows (CUDA: the register tier), 16411 the Triton
    forward's looping tier (CUDA: the scalar staged kernel, N odd), 32768 the CUDA vector staged
    one. torch's own CUDA layer_norm misses at N = 1000 (H100, torch 2.11: half the elements
    off, by up to 6.9), so only the CPU compares with it."""
    skip(KIND, backend, device)
    values = torch.tensor([0.1, -7.3, 100.0, 3.0, 0.0, -1e-3], device=device)
    x = values[:, None].expand(-1, n).to(dtype)
    r = torch.zeros_like(x) if residual else None  # x + 0: the sum the kernel normalises
    w, b = randn((n,), dtype, device), randn((n,), dtype, device, seed=1)
    with fastnn.use_backend(backend):
        out = FF.layer_norm(x, (n,), w, b, 1e-12, residual=r)
    out = out[0] if residual else out
    torch.testing.assert_close(out, b.expand_as(out), rtol=0, atol=0)
    if device == "cpu":
        torch.testing.assert_close(out, F.layer_norm(x, (n,), w, b, 1e-12), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,nshape", LARGE_SHAPES, ids=[str(s[0]) for s in LARGE_SHAPES])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_large_hidden_size(backend, device, shape, nshape, dtype):
    if backend == "triton" and device == "cpu":
        if nshape[0] > INTERPRETER_MAX_N:
            pytest.skip("70K-wide rows take minutes under the Triton interpreter; runs on a GPU")
    skip(KIND, backend, device)
    case = make_case(KIND, shape, nshape, dtype, device)
    check_against_oracle(KIND, backend, device, case, nshape, 1e-5, dtype)


@pytest.mark.parametrize("n", [1024, 16411], ids=["row-tile", "looping"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mean_far_from_zero(backend, device, n):
    """fp32 rows at 300 +- 1. Any fp32 mean is off by up to half an ulp of 300, so x - mean
    carries a relative error of about eps * 300 (2e-5, torch's eager LayerNorm too); a variance
    taken as E[x^2] - E[x]^2 loses eps * 300^2 (5e-3) to cancellation. The bound between the two
    holds the row tile and the looping tier's block merge to the first."""
    skip(KIND, backend, device)
    x = randn((2, n), torch.float32, device, offset=300.0, seed=7)
    w = randn((n,), torch.float32, device, scale=0.5, offset=1.0, seed=3)
    with fastnn.use_backend(backend):
        out = FF.layer_norm(x, (n,), w, None, 1e-5)
    want = F.layer_norm(x.double(), (n,), w.double(), None, 1e-5)
    conditioned = 4 * torch.finfo(torch.float32).eps * 300
    assert rel_error(out, want) <= conditioned


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_looping_tier_statistics_at_the_extremes(backend, device):
    """The saved mean and rstd of 16411-wide fp32 rows (the Triton looping tier): an Inf in the
    first column block (mean +inf, as the reference, not the NaN a merged mean gives), values
    near 2e19 (a first block mean whose square overflows fp32), and a row at 1e4 +- 1."""
    skip(KIND, backend, device)
    n = 16411
    x = randn((3, n), torch.float64, "cpu", seed=8)
    x[0] = x[0].abs()
    x[0, 5] = float("inf")
    x[1] = 2e19 * (1 + 1e-5 * x[1])
    x[2] = 1e4 + x[2]
    x = x.float().to(device)
    _, _, mean, rstd = ops.get(backend, "layer_norm_fwd")(x, None, None, None, 1e-5)
    x64 = x.double().cpu()
    mean64 = x64.mean(-1)
    rstd64 = ((x64 - mean64[:, None]) ** 2).mean(-1).add(1e-5).rsqrt()
    assert mean[0].item() == float("inf") and torch.isnan(rstd[0])
    torch.testing.assert_close(mean[1:].double().cpu(), mean64[1:], rtol=1e-6, atol=0)
    # rstd to within what fp32 statistics allow: about eps * |mean| / std (1e5 and 1e4 here).
    conditioning = (mean64 * rstd64).abs()[1:]
    err = (rstd[1:].double().cpu() / rstd64[1:] - 1).abs()
    assert (err <= 4 * torch.finfo(torch.float32).eps * conditioning).all(), err


@pytest.mark.parametrize("n", [4100, 16411], ids=["chunks", "looping"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_variance_between_parts_of_a_row(backend, device, n):
    """fp32 rows whose first 2000 elements sit at -1000 +- 1 and the rest at +1000 +- 1 (and the
    reverse): nearly all the variance lies between the parts that the native kernel's 1024-element
    chunks and the Triton looping tier's column blocks each see alone, so it rests on their merge."""
    skip(KIND, backend, device)
    x = randn((2, n), torch.float64, "cpu", seed=9)
    x[0, :2000] -= 1000
    x[0, 2000:] += 1000
    x[1] = -x[0]
    x = x.float()
    _, _, mean, rstd = ops.get(backend, "layer_norm_fwd")(x.to(device), None, None, None, 1e-5)
    x64 = x.double()
    mean64 = x64.mean(-1)
    rstd64 = ((x64 - mean64[:, None]) ** 2).mean(-1).add(1e-5).rsqrt()
    # The mean to within an fp32 ulp of the row's spread (1000): 4e-5 measured.
    atol = torch.finfo(torch.float32).eps * 1000
    torch.testing.assert_close(mean.double().cpu(), mean64, rtol=0, atol=atol)
    torch.testing.assert_close(rstd.double().cpu(), rstd64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [4096, 16411], ids=["row-tile", "looping"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_outlier_in_the_first_column(backend, device, n):
    """fp32 N(0, 1) rows with x[:, 0] = 1e4 (a massive-activation channel): the deviations from
    the first element carry an ulp of 1e4 each, so a mean taken from it alone was 4e-4 (4096)
    to 2e-3 (16411) off, relatively, and the output 4e-4; centred a second time, the mean is as
    torch's fp32 mean (3.5e-7 here; the CPU kernel's chunk sums added in fp32, 2.8e-6)."""
    skip(KIND, backend, device)
    x = randn((8, n), torch.float64, "cpu", seed=11)
    x[:, 0] = 1e4
    x = x.float()
    out, _, mean, _ = ops.get(backend, "layer_norm_fwd")(x.to(device), None, None, None, 1e-5)
    x64 = x.double()
    mean64 = x64.mean(-1)
    assert ((mean.double().cpu() - mean64).abs() / mean64.abs()).max() <= 1e-6
    want = F.layer_norm(x64, (n,), eps=1e-5)
    assert rel_error(out[:, 1:], want[:, 1:]) <= 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("n", [4096, 16411], ids=["chunks", "looping"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_rstd_of_narrow_rows_far_from_zero(backend, device, n):
    """fp32 rows at 1e4 +- 100 ulp: the statistics of the parts of a row are merged as offsets
    from its first element, not as absolute means, each an ulp of 1e4 off (rstd then lost 3e-4;
    the two-pass value is 6e-6 off)."""
    skip(KIND, backend, device)
    mean = 1e4
    spread = 100 * torch.finfo(torch.float32).eps * mean
    x = (mean + spread * randn((8, n), torch.float64, "cpu", seed=10)).float()
    _, _, _, rstd = ops.get(backend, "layer_norm_fwd")(x.to(device), None, None, None, 1e-12)
    x64 = x.double()
    rstd64 = ((x64 - x64.mean(-1, keepdim=True)) ** 2).mean(-1).add(1e-12).rsqrt()
    assert (rstd.double().cpu() / rstd64 - 1).abs().max() <= 2e-5


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_options(backend, device, residual, weight, bias):
    skip(KIND, backend, device)
    case = make_case(KIND, (11, 48), (48,), torch.float32, device, residual, weight, bias)
    check_against_oracle(KIND, backend, device, case, (48,), 1e-5, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bf16_input_fp32_weight(backend, device):
    """A mixed-precision module: the result has torch's dtype (the input's), dW the weight's."""
    skip(KIND, backend, device)
    case = make_case(KIND, (8, 72), (72,), torch.bfloat16, device, param_dtype=torch.float32)
    # torch's dtype rule, read on the CPU: F.layer_norm on CUDA refuses mixed dtypes (torch 2.11).
    cpu = {k: v.cpu() for k, v in case.items() if v is not None}
    want = F.layer_norm(cpu["x"] + cpu["r"], (72,), cpu["w"], cpu["b"])
    with fastnn.use_backend(backend):
        out, _ = FF.layer_norm(case["x"], (72,), case["w"], case["b"], residual=case["r"])
    assert out.dtype == want.dtype == torch.bfloat16
    check_against_oracle(KIND, backend, device, case, (72,), 1e-5, torch.bfloat16)


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
    ones = torch.ones(8, device=device)
    with fastnn.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"weight of shape \[5\].*normalized_shape \[8\]"):
            FF.layer_norm(x, (8,), torch.ones(5, device=device), ones)
        with pytest.raises(RuntimeError, match=r"bias of shape \[2, 4\].*normalized_shape \[8\]"):
            FF.layer_norm(x, (8,), ones, torch.ones(2, 4, device=device))
        with pytest.raises(RuntimeError, match=r"input of shape \[4, 8\].*normalized_shape \[7\]"):
            FF.layer_norm(x, (7,))
        for bad in (torch.int64, torch.complex64):
            with pytest.raises(RuntimeError, match=str(bad)):
                FF.layer_norm(x.to(bad), (8,))
        with pytest.raises(RuntimeError, match=r"bias is on meta.*input is on"):
            FF.layer_norm(x, (8,), ones, torch.ones(8, device="meta"))
        with pytest.raises(RuntimeError, match=r"residual of shape \[4, 7\]"):
            FF.layer_norm(x, (8,), residual=x[:, :7])
        with pytest.raises(RuntimeError, match=r"residual must be float.*got torch.int32"):
            FF.layer_norm(x, (8,), residual=x.int())


def test_native_op_checks_arguments():
    """The C++ ops are public (torch.ops.fastnn.*): they check their own arguments too."""
    skip(KIND, "native", "cpu")
    fwd, bwd = torch.ops.fastnn.layer_norm_fwd, torch.ops.fastnn.layer_norm_bwd
    x = torch.randn(4, 8)
    ones, stat = torch.ones(8), torch.ones(4)
    cases = [
        (lambda: fwd(x[0], None, None, None, 1e-5), r"2-D input"),
        (lambda: fwd(x.long(), None, None, None, 1e-5), r"input must be float32.*got Long"),
        (lambda: fwd(x, None, ones, torch.ones(5), 1e-5), r"bias must have shape \[8\], got \[5\]"),
        (lambda: fwd(x, None, ones.int(), None, 1e-5), r"weight must be"),
        (lambda: fwd(x, x[:, :7], None, None, 1e-5), r"residual of shape \[4, 7\]"),
        (lambda: bwd(x, None, x, None, None, stat.double(), stat), r"mean must be Float"),
        (lambda: bwd(x, None, x, None, None, stat, stat[:3]), r"rstd must have shape \[4\]"),
        (lambda: bwd(x[:3], None, x, None, None, stat, stat), r"grad_out of shape \[3, 8\]"),
        (lambda: bwd(x, None, x, ones, torch.ones(9), stat, stat), r"bias must have shape \[8\]"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


PARAMS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("weight,bias", PARAMS, ids=["both", "weight", "bias", "neither"])
@pytest.mark.parametrize("n", [8208, 6001])
def test_triton_long_row_backward(n, weight, bias, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_long_row_backward(KIND, n, weight, bias, monkeypatch)


# bf16 rows of 16384: past the register-resident tiles, whole and read twice (no masks).
@pytest.mark.parametrize("weight,bias", PARAMS, ids=["both", "weight", "bias", "neither"])
def test_triton_reread_backward(weight, bias, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_long_row_backward(KIND, 16384, weight, bias, monkeypatch, halves=1)


def test_triton_nan_and_inf_stay_in_rows_read_twice():
    """A NaN and an Inf in 16-bit rows of 16K (read twice) stay in their rows."""
    skip(KIND, "triton", "cpu")
    check_nonfinite_confined(KIND, "triton", "cpu", 16384, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_looping_forward(dtype, monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_looping_forward(KIND, dtype, monkeypatch)


def test_triton_alignment_seen(monkeypatch):
    skip(KIND, "triton", "cpu")
    check_triton_alignment_seen(KIND, monkeypatch)
