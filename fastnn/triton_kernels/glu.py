"""Triton GLU family, out = act(gate) * up, elementwise: the `triton` backend of
`fastnn::glu_fwd`, `glu_bwd`, `glu_packed_fwd`, `glu_packed_bwd` and the in-place `glu_bwd_`,
`glu_packed_bwd_` (schemas in csrc/library.cpp, semantics in fastnn/reference/glu.py).

One forward and one backward kernel; the activation (ACT) and the layout (PACKED) are
tl.constexpr, so each combination compiles to its own straight-line code:
- separate gate / up: a flat 1-D grid over the elements (up to 2^31 programs);
- packed [rows, 2H] = [gate | up] rows: a 1-D grid of rows x cdiv(H, BLOCK) programs, a column
  block of a row each, that reads both halves in place (row stride 2H, up at +H) and, backward,
  writes one [rows, 2H] gradient.
Math is fp32 (fp64 for fp64 tensors, so gradcheck runs here too), every sigmoid goes through
exp(-|x|) in (0, 1]: gates of +-1000 give finite outputs and gradients; GELU's fp32 normal cdf
is csrc/include/fastnn/activations.h's, precise in its lower tail. The backward recomputes
act(gate) from gate; nothing else is saved.
"""

import torch
import triton
import triton.language as tl

from fastnn.reference.glu import ACTIVATIONS, _check_grad, _check_packed, _check_pair

# The argument checks are the reference's own, so both backends reject the same inputs alike.
from fastnn.triton_kernels import device_context

# Activation codes (tl.constexpr), in ACTIVATIONS order: silu, gelu, gelu_tanh, relu, sigmoid.
_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
# 1024 elements per program: 4 warps x 32 threads x 8 elements, i.e. one 16-byte access per
# thread per tensor in bf16 (two in fp32).
BLOCK = 1024
NUM_WARPS = 4

# The GELU constants are literals in the kernels below: compiled Triton reads a module global only
# as tl.constexpr, and the interpreter (triton 3.8) cannot multiply a tensor by one.


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) from z = exp(-|x|) in (0, 1]: no overflow, no cancellation."""
    z = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + z)
    zr = z * r
    nonneg = x >= 0
    return tl.where(nonneg, r, zr), tl.where(nonneg, zr, r)


@triton.jit
def _gelu_tanh_arg(x):
    # 2y = 2 k0 (x + k1 x^3) on x clamped to [-22, 22]: beyond it exp(-2|y|) < exp(-795)
    # underflows to 0 even in fp64, so sigmoid(2y) is exactly 0 or 1 either way, and the clamp
    # keeps x^3 from overflowing into inf * 0 (see activations.h).
    # (PropagateNan.ALL: the default min / max return the non-NaN operand, losing a NaN gate.)
    # (The enum is spelled out at each call: bound to a local name it fails to compile for a
    # GPU, "cannot convert PROPAGATE_NAN.ALL to tensor", while the interpreter accepts it.)
    xc = tl.maximum(x, -22.0, propagate_nan=tl.PropagateNan.ALL)
    xc = tl.minimum(xc, 22.0, propagate_nan=tl.PropagateNan.ALL)
    return xc, 2.0 * 0.7978845608028654 * xc * (1.0 + 0.044715 * xc * xc)  # sqrt(2/pi)


@triton.jit
def _normal_cdf_pdf(x):
    """(Phi(x), phi(x)), the standard normal cdf and pdf. fp32: activations.h's normal_cdf,
    erfc(a) = t exp(-a^2 + P(u)) for a = |x| / sqrt2 with -x^2 / 2 split into an exact hi and a
    small lo (tools/fit_erfc.py fits P), so the lower tail keeps its precision; eager torch's
    0.5 (1 + erf(x / sqrt2)) cancels to 0 below x = -5.42 (fp32, CPU, torch 2.14.1). fp64
    (gradcheck under the interpreter, on values near 0): 0.5 (1 + erf), which cancels too, 2e-6
    off at x = -7 and 0 below -8.5 (tl has no erfc; P is fitted to fp32 precision only). A NaN x
    gives NaN through the products with x that use these (the clamp below drops it)."""
    if x.dtype == tl.float64:
        cdf = 0.5 + 0.5 * tl.erf(x * 0.7071067811865476)  # 1/sqrt(2)
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)  # 1/sqrt(2 pi)
    else:
        xa = tl.minimum(tl.abs(x), 14.5)  # Phi(-14.5) = 6e-48: 0 in fp32
        t = 1.0 / (1.0 + 0.5 * (xa * 0.7071067811865476))
        u = (t - 0.575) * (1.0 / 0.425)
        p = 6.975276723e-05 * u + 7.119121880e-05
        p = p * u - 6.342521674e-04
        p = p * u - 1.652322374e-04
        p = p * u + 4.123349715e-03
        p = p * u - 1.555802914e-03
        p = p * u - 3.116925720e-02
        p = p * u + 1.822052923e-02
        p = p * u + 5.810347901e-01
        p = p * u - 5.699950141e-01
        # xa with its 12 low mantissa bits cleared: hi = -x_hi^2 / 2 is exact.
        x_hi = (xa.to(tl.uint32, bitcast=True) & 0xFFFFF000).to(tl.float32, bitcast=True)
        e = tl.exp(-0.5 * (x_hi * x_hi)) * tl.exp(0.5 * ((x_hi - xa) * (x_hi + xa)))
        erfc_a = t * e * tl.exp(p)
        cdf = tl.where(x > 0, 1.0 - 0.5 * erfc_a, 0.5 * erfc_a)
        pdf = 0.3989422804014327 * e
    return cdf, pdf


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:  # silu
        s, _ = _sigmoid_pair(x)
        a = x * s
    elif ACT == 1:  # gelu (erf)
        cdf, _ = _normal_cdf_pdf(x)
        a = x * cdf
    elif ACT == 2:  # gelu_tanh: x sigmoid(2y)
        _, y2 = _gelu_tanh_arg(x)
        s, _ = _sigmoid_pair(y2)
        a = x * s
    elif ACT == 3:  # relu (NaN stays NaN, as torch.relu)
        a = tl.where(x <= 0, 0.0, x)
    else:  # sigmoid (GLU)
        a, _ = _sigmoid_pair(x)
    return a


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        s, sm = _sigmoid_pair(x)
        a = x * s
        da = s * (1.0 + x * sm)
    elif ACT == 1:
        cdf, pdf = _normal_cdf_pdf(x)
        a = x * cdf
        da = cdf + x * pdf
    elif ACT == 2:
        xc, y2 = _gelu_tanh_arg(x)
        s, sm = _sigmoid_pair(y2)
        a = x * s
        dy = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xc * xc)
        da = s + 2.0 * xc * s * sm * dy
    elif ACT == 3:
        a = tl.where(x <= 0, 0.0, x)
        da = tl.where(x <= 0, 0.0, 1.0)
    else:
        a, sm = _sigmoid_pair(x)
        da = a * sm
    return a, da


@triton.jit
def _offsets(H, in_stride, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """(output offsets, input offsets, mask) of this program's elements."""
    if PACKED:
        # One flat grid axis over (row, column block): grid axis 1 would cap a row at
        # 65535 blocks (H of 67M), axis 0 takes 2^31 - 1 programs.
        pid = tl.program_id(0).to(tl.int64)
        col_blocks = tl.cdiv(H, BLOCK)
        row = pid // col_blocks
        cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        return row * H + cols, row * in_stride + cols, mask
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        return offs, offs, mask


@triton.jit
def _glu_fwd_kernel(
    g_ptr,
    u_ptr,
    h_ptr,
    H,
    in_stride,
    ACT: tl.constexpr,
    PACKED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_offs, in_offs, mask = _offsets(H, in_stride, PACKED, BLOCK)
    g = tl.load(g_ptr + in_offs, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(u_ptr + in_offs, mask=mask, other=0.0).to(COMPUTE)
    h = _act(g, ACT) * u
    tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dh_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    H,
    in_stride,
    ACT: tl.constexpr,
    PACKED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_offs, in_offs, mask = _offsets(H, in_stride, PACKED, BLOCK)
    dh = tl.load(dh_ptr + out_offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + in_offs, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(u_ptr + in_offs, mask=mask, other=0.0).to(COMPUTE)
    a, da = _act_grad(g, ACT)
    if ACT == 3:  # relu: a select, as torch's relu backward (0 at g <= 0 even for u = NaN)
        dg = tl.where(g <= 0, 0.0, dh * u)
    else:
        dg = dh * u * da
    tl.store(dg_ptr + in_offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + in_offs, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)


# ---- launchers: names and signatures of the op schemas -------------------------------------------


def _code(activation):
    if activation not in _CODE:
        raise ValueError(
            f"fastnn: unknown GLU activation {activation!r}; expected one of {ACTIVATIONS}"
        )
    return _CODE[activation]


def _prepare_grad(grad_out, like, shape):
    """grad_out in `like`'s dtype, contiguous, checked against the output shape."""
    _check_grad(grad_out, like, shape)
    return grad_out.to(like.dtype).contiguous()


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0


def _launches(rows, H, tensors):
    """(tensors, grid) per launch: one program per (row, column block) (separate gate and up
    are one row of all their elements); past 2^31 - 1 of them (a packed input of over 2^31
    rows of H <= 1024) the rows go in slabs, each launch given views of its rows."""
    col_blocks = triton.cdiv(H, BLOCK)
    slab = max(1, MAX_PROGRAMS // col_blocks)
    if rows <= slab:
        yield tensors, (rows * col_blocks,)
        return
    as_rows = [t.view(rows, t.shape[-1]) for t in tensors]  # the kernels write through them
    for r0 in range(0, rows, slab):
        n = min(slab, rows - r0)
        yield [t[r0 : r0 + n] for t in as_rows], (n * col_blocks,)


def _fwd(g, u, out, rows, H, in_stride, packed, act):
    with device_context(g):
        for (g_, u_, out_), grid in _launches(rows, H, (g, u, out)):
            _glu_fwd_kernel[grid](
                g_, u_, out_, H, in_stride, act, packed, _compute(g.dtype), BLOCK,
                num_warps=NUM_WARPS,
            )  # fmt: skip


def _bwd(dh, g, u, dg, du, rows, H, in_stride, packed, act):
    with device_context(g):
        for (dh_, g_, u_, dg_, du_), grid in _launches(rows, H, (dh, g, u, dg, du)):
            _glu_bwd_kernel[grid](
                dh_, g_, u_, dg_, du_, H, in_stride, act, packed, _compute(g.dtype), BLOCK,
                num_warps=NUM_WARPS,
            )  # fmt: skip


def glu_fwd(gate, up, activation):
    """gate, up: one shape and float dtype. Returns act(gate) * up, contiguous, gate's dtype."""
    act = _code(activation)
    _check_pair(gate, up)
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    if g.numel() > 0:
        _fwd(g, u, out, 1, g.numel(), g.numel(), False, act)
    return out


def glu_bwd(grad_out, gate, up, activation):
    """Returns (grad_gate, grad_up) = (dh * up * act'(gate), dh * act(gate))."""
    act = _code(activation)
    _check_pair(gate, up)
    g, u = gate.contiguous(), up.contiguous()
    dh = _prepare_grad(grad_out, g, g.shape)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel() > 0:
        _bwd(dh, g, u, dg, du, 1, g.numel(), g.numel(), False, act)
    return dg, du


def glu_packed_fwd(gate_up, activation):
    """gate_up: [..., 2H] = [gate | up]. Returns act(gate) * up, [..., H]."""
    act = _code(activation)
    _check_packed(gate_up)
    gu = gate_up.contiguous()
    H = gu.shape[-1] // 2
    out = gu.new_empty((*gu.shape[:-1], H))
    if out.numel() > 0:
        _fwd(gu, gu[..., H:], out, out.numel() // H, H, 2 * H, True, act)
    return out


def glu_packed_bwd(grad_out, gate_up, activation):
    """Returns the gradient of gate_up, [..., 2H] = [grad_gate | grad_up]."""
    act = _code(activation)
    _check_packed(gate_up)
    gu = gate_up.contiguous()
    H = gu.shape[-1] // 2
    dh = _prepare_grad(grad_out, gu, (*gu.shape[:-1], H))
    dgu = torch.empty_like(gu)
    if dh.numel() > 0:
        _bwd(dh, gu, gu[..., H:], dgu, dgu[..., H:], dh.numel() // H, H, 2 * H, True, act)
    return dgu


def _check_inplace_target(t, name):
    if not t.is_contiguous():
        raise RuntimeError(f"fastnn: the in-place GLU backward needs a contiguous {name}")


def glu_bwd_(grad_out, gate, up, activation):
    """In place: gate <- grad_gate, up <- grad_up (each element is read before it is written,
    by the same program, so overwriting the inputs is safe)."""
    act = _code(activation)
    _check_pair(gate, up)
    _check_inplace_target(gate, "gate")
    _check_inplace_target(up, "up")
    dh = _prepare_grad(grad_out, gate, gate.shape)
    if gate.numel() > 0:
        _bwd(dh, gate, up, gate, up, 1, gate.numel(), gate.numel(), False, act)


def glu_packed_bwd_(grad_out, gate_up, activation):
    """In place: gate_up <- its gradient [grad_gate | grad_up]."""
    act = _code(activation)
    _check_packed(gate_up)
    _check_inplace_target(gate_up, "gate_up")
    H = gate_up.shape[-1] // 2
    dh = _prepare_grad(grad_out, gate_up, (*gate_up.shape[:-1], H))
    if dh.numel() > 0:
        up = gate_up[..., H:]
        _bwd(dh, gate_up, up, gate_up, up, dh.numel() // H, H, 2 * H, True, act)
