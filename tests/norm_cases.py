"""Shared machinery of tests/test_rms_norm.py and tests/test_layer_norm.py.

The oracle is torch's own F.rms_norm / F.layer_norm run in float64 on the inputs already rounded
to the test dtype (testing.md, method 1); the residual sum is rounded to the test dtype first, as
an unfused `x + r` would be. Low-precision results also pass the ratio check against eager torch
in the same dtype (method 2).
"""

import math

import torch
import torch.nn.functional as F
from conftest import DEVICES, skip_unless_available
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, RTOL, assert_rel_close

import fastnn
from bench.triton_sweep import nan_filled_allocations
from fastnn import functional as FF

KINDS = {"rms": "rms_norm", "ln": "layer_norm"}
BACKENDS = ("torch", "native", "triton")
BACKEND_DEVICES = [(b, d) for d in DEVICES for b in BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (input shape, normalized_shape): 1 row, N = 1, odd, prime, powers of two, 3-D / 4-D / 1-D
# inputs, two normalised dims.
SHAPES = [
    ((1, 1), (1,)),
    ((1, 4096), (4096,)),
    ((33, 7), (7,)),
    ((17, 257), (257,)),
    ((5, 1024), (1024,)),
    ((2, 3, 40), (40,)),
    ((2, 3, 4, 10), (10,)),
    ((24,), (24,)),
    ((6, 4, 5), (4, 5)),
]
# Prime N above the Triton backward's and forward's whole-row tiles (rows that are not a
# multiple of 16 are held whole up to 4096 elements and 32 KB): their looping paths; N = 70000
# above any tile, which only the GPU and the native / torch backends run at full speed (the
# Triton interpreter would take minutes).
LARGE_SHAPES = [((2, 16411), (16411,)), ((3, 70000), (70000,))]
INTERPRETER_MAX_N = 16411


def skip(kind, backend, device):
    skip_unless_available(backend, KINDS[kind], device)


def randn(shape, dtype, device, scale=1.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return t.to(dtype).to(device)


def make_case(
    kind, shape, nshape, dtype, device, residual=True, weight=True, bias=True, param_dtype=None
):
    """Random inputs rounded to `dtype` (params to `param_dtype`, default dtype). LayerNorm input
    gets an offset so the mean matters."""
    pdt = param_dtype or dtype
    case = {
        "x": randn(shape, dtype, device, offset=0.5 if kind == "ln" else 0.0, seed=1),
        "r": randn(shape, dtype, device, seed=2) if residual else None,
        "w": randn(nshape, pdt, device, scale=0.5, offset=1.0, seed=3) if weight else None,
        "b": randn(nshape, pdt, device, scale=0.5, seed=4) if (bias and kind == "ln") else None,
        "dy": randn(shape, dtype, device, seed=5),
        "dres": randn(shape, dtype, device, seed=6) if residual else None,
    }
    return case


def fastnn_norm(kind, x, nshape, w, b, eps, residual):
    if kind == "rms":
        return FF.rms_norm(x, nshape, w, eps, residual=residual)
    return FF.layer_norm(x, nshape, w, b, eps, residual=residual)


def torch_norm(kind, x, nshape, w, b, eps):
    if kind == "rms":
        return F.rms_norm(x, nshape, w, eps)
    return F.layer_norm(x, nshape, w, b, eps)


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_()


def _grads(outputs, inputs, grad_outputs):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs))
    return [None if t is None else next(got) for t in inputs]


def run_fastnn(kind, backend, case, nshape, eps):
    """fastnn forward + backward: (out, residual_out, dx, dr, dw, db)."""
    x, r, w, b = (_leaf(case[k]) for k in ("x", "r", "w", "b"))
    with fastnn.use_backend(backend):
        result = fastnn_norm(kind, x, nshape, w, b, eps, r)
        if r is None:
            out, res_out = result, None
            dx, dw, db = _grads([out], [x, w, b], [case["dy"]])
            dr = None
        else:
            out, res_out = result
            dx, dr, dw, db = _grads([out, res_out], [x, r, w, b], [case["dy"], case["dres"]])
    return out.detach(), None if res_out is None else res_out.detach(), dx, dr, dw, db


def run_torch(kind, case, nshape, eps, dtype):
    """Unfused torch in `dtype` (float64 for the oracle): (out, s, ds_total, dw, db).

    The residual sum is formed in the test dtype (rounded), then converted."""
    s = case["x"] if case["r"] is None else case["x"] + case["r"]
    s = _leaf(s, dtype)
    w, b = _leaf(case["w"], dtype), _leaf(case["b"], dtype)
    out = torch_norm(kind, s, nshape, w, b, eps)
    ds, dw, db = _grads([out], [s, w, b], [case["dy"].to(dtype)])
    if case["dres"] is not None:
        ds = ds + case["dres"].to(dtype)
    return out.detach(), s.detach(), ds, dw, db


def ulp_slack(ref, dtype, backend, device):
    """One ulp of `dtype` at |ref|, only for Triton under the interpreter (its fp32 -> bf16 / fp16
    casts truncate instead of rounding); zero elsewhere."""
    if backend != "triton" or device != "cpu" or dtype not in LOW_PRECISION:
        return 0.0
    return ref.abs() * 2.0 * torch.finfo(dtype).eps


def assert_ratio(out, ref64, eager, slack, what):
    """|out - ref64| <= 2 |eager - ref64| + atol (+ slack), elementwise (testing.md, method 2)."""
    atol = 1e-6 * max(ref64.abs().max().item(), 1.0)
    err = (out.double() - ref64).abs()
    bound = 2 * (eager.double() - ref64).abs() + atol + slack
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements exceed 2x eager error + atol; "
        f"worst excess {(err - bound).max().item():.3e}"
    )


def check_against_oracle(kind, backend, device, case, nshape, eps, dtype):
    """Forward and every gradient of fastnn against the fp64 oracle (and eager torch in
    low precision); residual_out equal to the rounded sum x + r.

    fastnn runs with torch.empty / empty_like filling floats with NaN (allocations made in
    Python: the Triton launchers' and the reference's; the native ops allocate in C++): fresh
    CPU memory is mostly zeros, so an output element or partial sum a launcher leaves
    unwritten, or a buffer it needs zeroed but allocates empty, would otherwise pass here and
    fail on a GPU, whose caching allocator hands back used blocks."""
    with nan_filled_allocations():
        out, res_out, dx, dr, dw, db = run_fastnn(kind, backend, case, nshape, eps)
    assert out.dtype == case["x"].dtype and out.shape == case["x"].shape
    if case["r"] is not None:
        exact = case["x"] + case["r"]
        assert res_out.dtype == exact.dtype
        interp = backend == "triton" and device == "cpu" and dtype in LOW_PRECISION
        # Exact, except under the Triton interpreter whose casts truncate: one ulp there.
        tol = 2 * torch.finfo(dtype).eps if interp else 0.0
        torch.testing.assert_close(res_out, exact, rtol=tol, atol=0.0, msg="residual_out")
        # The oracle normalises the sum the kernel normalised (the same bits, except for the
        # interpreter's truncated sums, whose bias of half an ulp would otherwise show up in
        # every element).
        case = dict(case, x=res_out, r=None)
    ref, _, ds, rdw, rdb = run_torch(kind, case, nshape, eps, torch.float64)
    assert_rel_close(out, ref, dtype, FORWARD, "out")
    assert_rel_close(dx, ds, dtype, INPUT_GRAD, "grad input")
    if dr is not None:
        assert_rel_close(dr, ds, dtype, INPUT_GRAD, "grad residual")
    for got, want, p, name in ((dw, rdw, case["w"], "grad weight"), (db, rdb, case["b"], "bias")):
        if p is not None:
            assert got.dtype == p.dtype, f"{name}: dtype {got.dtype}, param {p.dtype}"
            # dW / dB: the input dtype's error, or the param dtype's rounding if that is coarser.
            tol_dtype = max(dtype, p.dtype, key=lambda d: RTOL[d][PARAM_GRAD])
            assert_rel_close(got, want, tol_dtype, PARAM_GRAD, name)
    if dtype in LOW_PRECISION:
        eager = run_torch(kind, case, nshape, eps, dtype)
        pairs = [(out, ref, eager[0], "out"), (dx, ds, eager[2], "grad input")]
        pairs += [(dw, rdw, eager[3], "grad weight")] if dw is not None else []
        pairs += [(db, rdb, eager[4], "grad bias")] if db is not None else []
        for got, want, e, name in pairs:
            assert_ratio(got, want, e, ulp_slack(want, dtype, backend, device), name)


def numel_rows(shape, nshape):
    return math.prod(shape) // max(math.prod(nshape), 1)


# ---- Checks shared by both norms (each test file calls them with its kind) ---------------------


def check_zero_rows(kind, backend, device):
    case = make_case(kind, (0, 16), (16,), torch.float32, device)
    out, res_out, dx, dr, dw, db = run_fastnn(kind, backend, case, (16,), 1e-5)
    assert out.shape == (0, 16) and res_out.shape == (0, 16) and dx.shape == (0, 16)
    assert dr.shape == (0, 16)
    # The weight / bias gradient of zero rows is a sum over nothing: zeros, in the param's dtype.
    torch.testing.assert_close(dw, torch.zeros_like(case["w"]), rtol=0, atol=0)
    if db is not None:
        torch.testing.assert_close(db, torch.zeros_like(case["b"]), rtol=0, atol=0)
    # Zero-width normalized_shape, as torch allows: empty results, empty parameter gradients.
    for shape, nshape in (((2, 0), (0,)), ((2, 3, 0), (3, 0))):
        case = make_case(kind, shape, nshape, torch.float32, device)
        out, res_out, dx, dr, dw, db = run_fastnn(kind, backend, case, nshape, 1e-5)
        assert out.shape == res_out.shape == dx.shape == dr.shape == shape
        assert dw.shape == nshape and (db is None or db.shape == nshape)


def check_grad_subsets(kind, backend, device):
    """Only the input, or only the weight, wants a gradient."""
    case = make_case(kind, (9, 33), (33,), torch.float32, device, residual=False)
    _, _, rdx, rdw, rdb = run_torch(kind, case, (33,), 1e-5, torch.float64)
    w, b = case["w"], case["b"]
    with fastnn.use_backend(backend):
        x = _leaf(case["x"])
        out = fastnn_norm(kind, x, (33,), w, b, 1e-5, None)
        (dx,) = torch.autograd.grad(out, [x], case["dy"])
        assert_rel_close(dx, rdx, torch.float32, INPUT_GRAD, "grad input only")
        wl = _leaf(w)
        out = fastnn_norm(kind, case["x"], (33,), wl, b, 1e-5, None)
        (dw,) = torch.autograd.grad(out, [wl], case["dy"])
        assert_rel_close(dw, rdw, torch.float32, PARAM_GRAD, "grad weight only")


def check_noncontiguous(kind, backend, device, dtype=torch.float32):
    """Strided, transposed and storage-offset (misaligned) inputs equal the contiguous result."""
    n, rows = 67, 12
    base = randn((rows, 2 * n + 1), dtype, device, seed=7)
    flat = randn((rows * n + 1,), dtype, device, seed=8)
    variants = {
        "strided": base[:, 1 : 2 * n + 1 : 2],
        "transposed": randn((n, rows), dtype, device, seed=9).t(),
        "offset": flat[1:].view(rows, n),  # storage offset of one element: misaligned pointer
        "4-D permuted": randn((3, n, 2, 2), dtype, device, seed=10).permute(0, 2, 3, 1),
    }
    w = randn((n + 1,), dtype, device, seed=11)[1:]  # storage offset 1
    b = randn((2 * n,), dtype, device, seed=12)[::2] if kind == "ln" else None
    dy_base = randn((rows, 2 * n), dtype, device, seed=13)
    # The kernels copy to contiguous rows first: bitwise the same result. The torch reference
    # reduces strided memory in another order, so it is equal only to rounding.
    exact = {} if backend == "torch" else {"rtol": 0.0, "atol": 0.0}
    for name, x in variants.items():
        assert not x.is_contiguous() or x.storage_offset() > 0, name
        r = randn(x.shape, dtype, device, seed=14).transpose(0, -1).contiguous().transpose(0, -1)
        dy = dy_base.reshape(-1)[: x.numel()].view(x.shape)
        got = _norm_and_grads(kind, backend, x, r, w, b, dy)
        want = _norm_and_grads(
            kind,
            backend,
            x.contiguous(),
            r.contiguous(),
            w.contiguous(),
            None if b is None else b.contiguous(),
            dy.contiguous(),
        )
        for g, wt, what in zip(
            got, want, ("out", "residual_out", "dx", "dr", "dw", "db"), strict=True
        ):
            if wt is not None:
                torch.testing.assert_close(g, wt, msg=f"{name}: {what}", **exact)


def _norm_and_grads(kind, backend, x, r, w, b, dy):
    x, r, w = _leaf(x), _leaf(r), _leaf(w)
    b = _leaf(b)
    with fastnn.use_backend(backend):
        out, res_out = fastnn_norm(kind, x, (x.shape[-1],), w, b, 1e-5, r)
    grads = _grads([out], [x, r, w, b], [dy])
    return [out.detach(), res_out.detach(), *grads]


def check_triton_long_row_backward(kind, n, weight, bias, monkeypatch, halves=0, residual=True):
    """The Triton backward of rows past its register-resident tiles: 5 rows over the
    interpreter's 4 row groups, so a group sums two rows into its partial rows of dW / dB.
    halves 1 or 2: rows it still takes whole, read a second time after their reduction
    (16-bit rows: rms_bwd_max_block, ln_bwd_max_block), in that many column halves, without
    masks when N is a power of two; 0: rows past those, over its row-dot and column kernels."""
    from fastnn.triton_kernels import layer_norm, rms_norm

    configs = spy_row_config(monkeypatch)
    if kind == "rms":
        launches = spy_launches(
            monkeypatch, rms_norm, "_rms_bwd_kernel", ("REREAD", "EVEN", "HALVES")
        )
    else:
        launches = spy_launches(monkeypatch, layer_norm, "_ln_bwd_kernel", ("REREAD", "EVEN"))
    case = make_case(
        kind, (5, n), (n,), torch.bfloat16, "cpu", residual=residual, weight=weight, bias=bias
    )
    check_against_oracle(kind, "triton", "cpu", case, (n,), 1e-6, torch.bfloat16)
    backward = [answer for args, answer in configs if args[-1] == rms_norm.BWD]
    assert backward and all(single == bool(halves) for _, _, single, _ in backward), backward
    expected = (True, n & (n - 1) == 0, halves)[: 3 if kind == "rms" else 2]
    assert launches == ([expected] if halves else []), launches


def spy_launches(monkeypatch, module, kernel, keys):
    """module.kernel recording the `keys` arguments of each launch: a list of tuples."""
    real, calls = getattr(module, kernel), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(tuple(kwargs[k] for k in keys))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, kernel, Recorder())
    return calls


def spy_row_config(monkeypatch):
    """row_config of the Triton norms recording each call: a list of (args, answer)."""
    from fastnn.triton_kernels import layer_norm, rms_norm

    calls = []
    real = rms_norm.row_config
    for module in (rms_norm, layer_norm):
        monkeypatch.setattr(
            module, "row_config", lambda *args: calls.append((args, real(*args))) or calls[-1][1]
        )
    return calls


def check_triton_looping_forward(kind, dtype, monkeypatch):
    """The Triton forward's looping tier (rows over its whole-row caps, lowered here so the
    interpreter runs it on short rows): 9 rows over the interpreter's 4 persistent programs,
    each row of 1000 (not a multiple of 16: half the blocks) in 8 column blocks of 128, the
    last one partial."""
    from fastnn.triton_kernels import layer_norm, norm_common, rms_norm

    shape = rms_norm.FWD._replace(loop_block=256)
    for module in (rms_norm, layer_norm):
        monkeypatch.setattr(module, "FWD", shape)
    monkeypatch.setattr(norm_common, "FWD_MAX_BYTES", 1024)
    grids = []
    for module in (rms_norm, layer_norm):
        real = module.fwd_grid
        monkeypatch.setattr(
            module, "fwd_grid", lambda *args, real=real: grids.append(args[1:]) or real(*args)
        )
    configs = spy_row_config(monkeypatch)
    case = make_case(kind, (9, 1000), (1000,), dtype, "cpu")
    check_against_oracle(kind, "triton", "cpu", case, (1000,), 1e-6, dtype)
    assert grids == [(9, 1, False)], f"the forward did not loop: fwd_grid{grids}"
    assert configs[0][1] == (1, 128, False, shape.loop_warps), f"forward config {configs[0][1]}"


def check_triton_alignment_seen(kind, monkeypatch):
    """The Triton launchers tell row_config that rows cannot be 16-byte vectors when N is not a
    multiple of 16 or any one of the tensors their kernels read row by row starts off a 16-byte
    boundary: input, residual, weight (and bias) in the forward; grad_out, grad_residual_out,
    x and weight in the backward."""
    from fastnn.triton_kernels import layer_norm, rms_norm

    calls = spy_row_config(monkeypatch)

    def shifted(t):  # the same values, one fp32 element (4 bytes) into their buffer
        view = t.new_empty(t.numel() + 1)[1:].view(t.shape)
        return view.copy_(t)

    def aligned_as_seen(call, args):  # row_config's `aligned` argument, per call
        calls.clear()
        call(**args)
        return [row_config_args[4] for row_config_args, _ in calls]

    stat = torch.ones(2)
    if kind == "rms":
        fwd = lambda x, r, w: rms_norm.rms_norm_fwd(x, r, w, 1e-6)  # noqa: E731
        bwd = lambda dy, dres, x, w: rms_norm.rms_norm_bwd(dy, dres, x, w, stat)  # noqa: E731
    else:
        fwd = lambda x, r, w, b: layer_norm.layer_norm_fwd(x, r, w, b, 1e-5)  # noqa: E731
        bwd = lambda dy, dres, x, w: layer_norm.layer_norm_bwd(  # noqa: E731
            dy, dres, x, w, None, stat, stat
        )
    for n in (64, 63):
        rows = {name: randn((2, n), torch.float32, "cpu", seed=i) for i, name in
                enumerate(["x", "r", "dy", "dres"])}  # fmt: skip
        params = {"w": randn((n,), torch.float32, "cpu", seed=4)}
        if kind == "ln":
            params["b"] = randn((n,), torch.float32, "cpu", seed=5)
        fwd_args = {"x": rows["x"], "r": rows["r"], **params}
        bwd_args = {"dy": rows["dy"], "dres": rows["dres"], "x": rows["x"], "w": params["w"]}
        for call, args in ((fwd, fwd_args), (bwd, bwd_args)):
            assert aligned_as_seen(call, args) == [n % 16 == 0], f"N = {n}"
            for name in args:
                moved = dict(args, **{name: shifted(args[name])})
                assert aligned_as_seen(call, moved) == [False], f"{name} off 16 bytes, N = {n}"


def check_eps(kind, backend, device, eps):
    case = make_case(kind, (7, 96), (96,), torch.float32, device, residual=False)
    check_against_oracle(kind, backend, device, case, (96,), eps, torch.float32)
    if eps == 0.0:
        # Rows of scale 5e-20: a subnormal mean square / variance (~2.5e-39), which a
        # flush-to-zero rsqrt takes for 0 (rstd = inf).
        tiny = dict(case, x=case["x"] * 5e-20)
        check_against_oracle(kind, backend, device, tiny, (96,), eps, torch.float32)


def check_nonfinite_confined(kind, backend, device, n=40, dtype=torch.float32):
    """A NaN in one row and an Inf in another stay in their rows (and in dW / dB, which sum over
    rows); every other row and its input gradient match the finite-input result."""
    case = make_case(kind, (6, n), (n,), dtype, device, residual=False)
    bad = case["x"].clone()
    bad[1, 3] = float("nan")
    bad[4, n - 1] = float("inf")
    with fastnn.use_backend(backend):
        x = _leaf(bad)
        out = fastnn_norm(kind, x, (n,), case["w"], case["b"], 1e-5, None)
        (dx,) = torch.autograd.grad(out, [x], case["dy"])
        x_ok = _leaf(case["x"])
        out_ok = fastnn_norm(kind, x_ok, (n,), case["w"], case["b"], 1e-5, None)
        (dx_ok,) = torch.autograd.grad(out_ok, [x_ok], case["dy"])
    good = [0, 2, 3, 5]
    for got, want, what in ((out, out_ok, "out"), (dx, dx_ok, "grad input")):
        torch.testing.assert_close(got[good], want[good], rtol=0, atol=0, msg=what)
        assert not torch.isfinite(got[[1, 4]]).all(dim=1).any(), f"{what}: bad rows look finite"


def weight_grads(kind, backend, case, nshape):
    _, _, _, _, dw, db = run_fastnn(kind, backend, case, nshape, 1e-5)
    return dw, db


def check_deterministic(kind, backend, device):
    """dW / dB bitwise equal across two runs (and, native on the CPU, across thread counts)."""
    case = make_case(kind, (300, 257), (257,), torch.float32, device)
    if backend == "triton" and device == "cpu":  # about 1 ms per program under the interpreter
        case = make_case(kind, (40, 257), (257,), torch.float32, device)
    nshape = (257,)
    first = weight_grads(kind, backend, case, nshape)
    second = weight_grads(kind, backend, case, nshape)
    runs = [second]
    if backend == "native" and device == "cpu":
        threads = torch.get_num_threads()
        try:
            for t in (1, 3):
                torch.set_num_threads(t)
                runs.append(weight_grads(kind, backend, case, nshape))
        finally:
            torch.set_num_threads(threads)
    for run in runs:
        for a, b in zip(first, run, strict=True):
            if a is not None:
                assert torch.equal(a, b), "weight / bias gradient differs between runs"


def gradcheck_case(kind, backend):
    """gradcheck and gradgradcheck in float64 through the backend's fwd op, its registered
    backward and that backward's own derivative (residual, weight and bias all
    differentiated)."""
    case = make_case(kind, (3, 5), (5,), torch.float64, "cpu")
    x, r, w, b = (_leaf(case[k]) for k in ("x", "r", "w", "b"))

    def fn(x, r, w, *b):
        with fastnn.use_backend(backend):
            return fastnn_norm(kind, x, (5,), w, b[0] if b else None, 1e-5, r)

    inputs = (x, r, w) + ((b,) if b is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def check_double_backward(kind, backend, device):
    """A second and a third derivative (gradient penalty style: grads of a function of the
    first grads, create_graph at each step) against a composite norm in torch ops, float64.
    torch's own F.layer_norm is no oracle for the third: it drops the gradients reaching its
    saved mean and rstd (d/dx off by 7% in norm on this case, torch 2.14)."""
    case = make_case(kind, (3, 6, 40), (40,), torch.float64, device)
    results = []
    for impl in ("composite", backend):
        x, r, w, b = (_leaf(case[k]) for k in ("x", "r", "w", "b"))
        if impl == "composite":
            s = x + r
            centered = s if kind == "rms" else s - s.mean(-1, keepdim=True)
            y = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + 1e-5) * w
            y = y if kind == "rms" else y + b
        else:
            with fastnn.use_backend(backend):
                y, s = fastnn_norm(kind, x, (40,), w, b, 1e-5, r)
        params = (x, w) if kind == "rms" else (x, w, b)
        first = torch.autograd.grad((y.sin() * s).sum(), params, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        second = torch.autograd.grad(penalty, (x, r, w), create_graph=True)
        third = torch.autograd.grad(second[0].sin().sum() + second[2].sum(), (x, r, w))
        results.append([*second, *third])
    for got, want in zip(*reversed(results), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def opcheck_ops(kind, backend, device, dtype):
    """torch.library.opcheck on the backend's fwd and bwd ops, with and without the options, and
    on dense transposed [rows, N] tensors, all of them or only the gradients or only the inputs
    (the outputs keep x's strides, as the fakes say: a torch-backend gradient that followed a
    transposed dy's made Inductor assert)."""
    name = KINDS[kind]
    fwd, bwd = fastnn.ops.get(backend, f"{name}_fwd"), fastnn.ops.get(backend, f"{name}_bwd")
    everything, grads, inputs = ("x", "r", "dy", "dres"), ("dy", "dres"), ("x", "r")
    for residual, weight, transposed in (
        (True, True, ()), (False, False, ()), (True, True, everything), (True, True, grads),
        (False, True, grads), (True, True, inputs),
    ):  # fmt: skip
        case = make_case(
            kind, (5, 37), (37,), dtype, device, residual=residual, weight=weight, bias=weight
        )
        for k in transposed:
            if case[k] is not None:
                case[k] = case[k].t().contiguous().t()
        x, r, w, b = (_leaf(case[k]) for k in ("x", "r", "w", "b"))
        if kind == "rms":
            fwd_args = (x, r, w, 1e-5)
        else:
            fwd_args = (x, r, w, b, 1e-5)
        torch.library.opcheck(fwd, fwd_args)
        outs = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))
        saved = outs[1] if residual else case["x"]
        dres = case["dres"]
        if kind == "rms":
            bwd_args = (case["dy"], dres, saved, case["w"], outs[2])
        else:
            bwd_args = (case["dy"], dres, saved, case["w"], case["b"], outs[2], outs[3])
        torch.library.opcheck(bwd, bwd_args)


class _Block(torch.nn.Module):
    """A pre-norm residual block: h = h + lin(norm(h + x))."""

    def __init__(self, norm, n, dtype):
        super().__init__()
        self.norm = norm
        self.lin = torch.nn.Linear(n, n, dtype=dtype)

    def forward(self, x, h):
        y, s = self.norm(x, residual=h)
        return s + self.lin(y)


def check_compile_block(kind, backend, device):
    """torch.compile(fullgraph=True) of a block built on fastnn's module with the fused residual:
    same output and gradients as the same block run eagerly."""
    torch.manual_seed(0)
    n = 32
    norm = fastnn.RMSNorm(n, eps=1e-6) if kind == "rms" else fastnn.LayerNorm(n)
    block = _Block(norm, n, torch.float32).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = randn((4, 8, n), torch.float32, device, seed=20)
    h = randn((4, 8, n), torch.float32, device, seed=21)
    torch._dynamo.reset()
    with fastnn.use_backend(backend):
        compiled = torch.compile(block, fullgraph=True)
        results = []
        for fn in (block, compiled):
            xs, hs = _leaf(x), _leaf(h)
            out = fn(xs, hs)
            out.square().sum().backward()
            results.append([out.detach(), xs.grad, hs.grad, norm.weight.grad.clone()])
            block.zero_grad()
    for a, b, what in zip(*results, ("out", "dx", "dh", "dw"), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=what)


def check_module_dropin(kind, device):
    """fastnn's module is torch's: same repr, state_dict loads both ways, same output."""
    nshape = (6, 5)
    if kind == "rms":
        ours, theirs = fastnn.RMSNorm(nshape, eps=1e-6), torch.nn.RMSNorm(nshape, eps=1e-6)
    else:
        ours, theirs = fastnn.LayerNorm(nshape), torch.nn.LayerNorm(nshape)
    ours, theirs = ours.to(device).double(), theirs.to(device).double()
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(randn(p.shape, torch.float64, device, seed=p.numel()))
    ours.load_state_dict(theirs.state_dict())
    x = randn((3, 6, 5), torch.float64, device, seed=30)
    torch.testing.assert_close(ours(x), theirs(x))
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2.0)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    # forward's first parameter has torch's name, so keyword calls work too.
    first = "x" if kind == "rms" else "input"
    torch.testing.assert_close(ours(**{first: x}), theirs(**{first: x}))
