"""Triton LayerNorm forward and backward over the last dim of a 2-D input, optionally fused with
a residual add: the `triton` backend of `fastnn::layer_norm_fwd` / `fastnn::layer_norm_bwd`.

Semantics are fastnn/reference/layer_norm.py's: mean (an estimate from the row's first element,
then that plus the mean deviation from it: row_mean), then the variance as the mean of squared
deviations (within a register-resident tile, two passes over registers; over the column blocks of
a long row, each block's exact pair merged into the row's, so no cancellation either), statistics
in fp32 (fp64 for fp64 input).
The work is laid out as norm_common.py describes, from its helpers and kernel pieces:
register-resident row tiles up to FWD_MAX_BYTES / BWD_MAX_BLOCK (and 16-bit backward rows of
exactly BWD_REREAD_MAX_BLOCK, read twice: ln_bwd_max_block), column-block loops beyond,
persistent backward grids writing fp32 [P, N] partials of dW and dB, then fixed-order column
sums.
"""

import torch
import triton
import triton.language as tl

from fastnn.triton_kernels import device_context
from fastnn.triton_kernels.norm_common import (
    BWD,
    BWD_MAX_BLOCK,
    BWD_REREAD_MAX_BLOCK,
    FWD,
    Output,
    acc_dtype,
    all_16bit,
    bwd_programs_per_sm,
    bwd_terms,
    check_norm_inputs,
    check_same_device,
    column_block,
    contiguous,
    fwd_grid,
    fwd_max_block,
    held_weight,
    load_sum,
    load_sum_saved,
    persistent_grid,
    reduce_partials,
    row_config,
    rsqrt_rn,
    store_dx,
    tl_acc_dtype,
    vector_aligned,
    whole_row_tile,
)


@triton.jit
def _ln_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD, rows, N, eps: tl.float64,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """Whole rows: program p normalises row tile p. Long rows: a persistent grid, program p
    normalises row tiles p, p + P, ..., each in two passes over its column blocks."""
    # eps arrives as fp64 (a Python float argument would be typed fp32 when compiled, though
    # the interpreter keeps it fp64) and is rounded to the statistics' dtype here, as torch does.
    eps = tl.full((), eps, ACC)
    if SINGLE:
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = row < rows
        base = row[:, None] * N
        cols, cmask, mask = column_block(0, rmask, N, BLOCK_N)
        x = load_sum_saved(X, R, S, base + cols[None, :], mask, HAS_RES, ACC)
        shift = load_sum(X, R, row * N, rmask, HAS_RES, ACC).to(ACC)
        mean = _centred_mean(x, mask, shift, N)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = rsqrt_rn(tl.sum(xc * xc, axis=1) / N + eps, ACC)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean, mask=rmask)
        tl.store(RSTD + row, rstd, mask=rmask)
    else:
        for rb in range(tl.program_id(0).to(tl.int64), tl.cdiv(rows, BLOCK_M), tl.num_programs(0)):
            row = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = row < rows
            mean, rstd = _ln_fwd_long_rows(
                X, R, W, B, Y, S, row, rmask, N, eps,
                HAS_RES, HAS_W, HAS_B, ACC, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            tl.store(MEAN + row, mean, mask=rmask)
            tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _centred_mean(x, mask, shift, count):
    """row_mean of fastnn/reference/layer_norm.py over the tile x [BLOCK_M, BLOCK_N] (`count`
    elements a row, the rest masked): c = shift + mean(x - shift), then c + mean(x - c), c where
    that is not finite."""
    first = shift + tl.sum(tl.where(mask, x - shift[:, None], 0.0), axis=1) / count
    second = first + tl.sum(tl.where(mask, x - first[:, None], 0.0), axis=1) / count
    return tl.where(_is_finite(second), second, first)


@triton.jit
def _is_finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _ln_fwd_long_rows(
    X, R, W, B, Y, S, row, rmask, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The rows `row` in two passes over column blocks. The first adds up the block sums for
    the mean and merges each block's exact (mean, sum of squared deviations), computed in
    registers, into the row's running pair for the variance (Chan et al.'s parallel update: no
    E[x^2] - E[x]^2 cancellation, one read less), all of deviations from the first block's
    mean (row_mean in fastnn/reference/layer_norm.py; the row's first element where that is not
    finite); the second writes the output, its re-read of the rows mostly hitting L2. Returns
    (mean, rstd)."""
    base = row[:, None] * N
    first = load_sum(X, R, row * N, rmask, HAS_RES, ACC).to(ACC)
    cols, cmask, mask = column_block(0, rmask, N, BLOCK_N)
    x = load_sum(X, R, base + cols[None, :], mask, HAS_RES, ACC).to(ACC)
    shift = _centred_mean(x, mask, first, tl.sum(cmask.to(ACC), axis=0))
    shift = tl.where(_is_finite(shift), shift, first)
    # The block sums add up, and the mean is taken, in fp64, as the CPU kernel does: the first
    # block's mean can lie far from the row's, and an fp32 running sum rounds to an ulp of itself
    # at every block (N(0, 1) rows with x[0] = 1e4, N = 262144: mean 9.8e-7 off relatively,
    # 3.1e-7 in fp64).
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float64)
    merged_mean = tl.zeros([BLOCK_M], dtype=ACC)
    m2 = tl.zeros([BLOCK_M], dtype=ACC)
    seen = tl.zeros([BLOCK_M], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        x = load_sum_saved(X, R, S, base + cols[None, :], mask, HAS_RES, ACC)
        x = tl.where(mask, x - shift[:, None], 0.0)
        block_sum = tl.sum(x, axis=1)
        row_sum += block_sum.to(tl.float64)
        count = tl.sum(cmask.to(ACC), axis=0)
        block_mean = block_sum / count
        xc = tl.where(mask, x - block_mean[:, None], 0.0)
        total = seen + count
        delta = block_mean - merged_mean
        merged_mean += delta * (count / total)
        # delta * (delta * w), not delta * delta * w: with nothing seen yet w is 0 and the
        # square of a first block's mean could overflow (fp32 beyond 1.8e19) into inf * 0.
        m2 += tl.sum(xc * xc, axis=1) + delta * (delta * (seen * count / total))
        seen = total
    mean = (shift.to(tl.float64) + row_sum / N).to(ACC)
    rstd = rsqrt_rn(m2 / N + eps, ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        x = load_sum(X, R, base + cols[None, :], mask, HAS_RES, ACC).to(ACC)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    return mean, rstd


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _ln_bwd_kernel(
    DY, DRES, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, rows, N, num_row_blocks,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REREAD: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """Persistent: program p handles row tiles p, p + P, ...; writes DW_PART / DB_PART[p, :].
    REREAD: the tile (and the weight) are read again after the rows' reduction instead of held
    in registers across it. EVEN: the tiles cover the rows exactly (no masks)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = held_weight(W, cols, cmask, HAS_W, ACC, REREAD, BLOCK_N)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for rb in tl.range(pid.to(tl.int64), num_row_blocks, nprog, num_stages=1):
        row = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = row < rows
        mask = rmask[:, None] & cmask[None, :]
        offs = row[:, None] * N + cols[None, :]
        mean = tl.load(MEAN + row, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0).to(ACC)
        _, xhat, g = bwd_terms(
            X, DY, W, w, offs, mask, cols, cmask, mean, rstd, True, HAS_W, ACC, REREAD, EVEN,
            False,
        )  # fmt: skip
        c_gx, c_g = tl.reduce((g * xhat, g), 1, _add_pairs)
        c_gx, c_g = c_gx / N, c_g / N
        dy, xhat, g = bwd_terms(
            X, DY, W, w, offs, mask, cols, cmask, mean, rstd, True, HAS_W, ACC, REREAD, EVEN,
            REREAD,
        )  # fmt: skip
        dx = rstd[:, None] * (g - c_g[:, None] - xhat * c_gx[:, None])
        store_dx(DX, DRES, offs, mask, dx, HAS_DRES, ACC, EVEN)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    part = pid.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_PART + part, tl.sum(dw, axis=0), mask=cmask)
    if HAS_B:
        tl.store(DB_PART + part, tl.sum(db, axis=0), mask=cmask)


@triton.jit
def _ln_rowdot_kernel(
    DY, X, W, MEAN, RSTD, C_GX, C_G, N, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Long rows: C_GX[row] = mean(g * xhat), C_G[row] = mean(g), g = dy * w."""
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(MEAN + row).to(ACC)
    rstd = tl.load(RSTD + row).to(ACC)
    acc_gx = tl.zeros([BLOCK_N], dtype=ACC)
    acc_g = tl.zeros([BLOCK_N], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        x = tl.load(X + row * N + cols, mask=cmask, other=0.0).to(ACC)
        g = tl.load(DY + row * N + cols, mask=cmask, other=0.0).to(ACC)
        if HAS_W:
            g = g * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        acc_gx += tl.where(cmask, g * (x - mean) * rstd, 0.0)
        acc_g += g
    tl.store(C_GX + row, tl.sum(acc_gx, axis=0) / N)
    tl.store(C_G + row, tl.sum(acc_g, axis=0) / N)


@triton.jit
def _ln_bwd_cols_kernel(
    DY, DRES, X, W, MEAN, RSTD, C_GX, C_G, DX, DW_PART, DB_PART, rows, N,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Long rows: program (j, g) handles column block j of rows g, g + G, ...; partial row g."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    ngrp = tl.num_programs(1)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for row in tl.range(grp.to(tl.int64), rows, ngrp, num_stages=1):
        offs = row * N + cols
        x = tl.load(X + offs, mask=cmask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row).to(ACC)
        xhat = tl.where(cmask, (x - tl.load(MEAN + row).to(ACC)) * rstd, 0.0)
        g = dy * w if HAS_W else dy
        dx = rstd * (g - tl.load(C_G + row) - xhat * tl.load(C_GX + row))
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=cmask, other=0.0).to(ACC)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=cmask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    part = grp.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_PART + part, dw, mask=cmask)
    if HAS_B:
        tl.store(DB_PART + part, db, mask=cmask)


def layer_norm_fwd(input, residual, weight, bias, eps):
    """input, residual: [rows, N]; weight, bias: [N] or None (any float dtype).

    Returns (out [rows, N] input's dtype, residual_out (rounded input + residual, or empty),
    mean [rows], rstd [rows]), the statistics fp32 (fp64 for fp64 input).
    """
    rows, n = check_norm_inputs(
        "layer_norm_fwd", input, residual, [("weight", weight), ("bias", bias)]
    )
    out = Output(input)
    res_out = Output(input) if residual is not None else None
    stat = acc_dtype(input.dtype)
    mean = torch.empty(rows, dtype=stat, device=input.device)
    rstd = torch.empty(rows, dtype=stat, device=input.device)
    if rows > 0 and n == 0:
        mean.fill_(float("nan"))  # statistics of an empty row, as the reference computes them
        rstd.fill_(float("nan"))
    elif rows > 0:
        x, r = input.contiguous(), contiguous(residual)
        w, b = contiguous(weight), contiguous(bias)
        block_m, block_n, single, num_warps = row_config(
            rows, n, input.dtype, fwd_max_block(x, w, b), vector_aligned(n, x, r, w, b), FWD
        )
        grid = (fwd_grid(input.device, rows, block_m, single),)
        with device_context(input):
            _ln_fwd_kernel[grid](
                x, r, w, b, out.buf, res_out.buf if res_out else None, mean, rstd, rows, n, eps,
                HAS_RES=r is not None, HAS_W=w is not None, HAS_B=b is not None,
                ACC=tl_acc_dtype(input.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                SINGLE=single, num_warps=num_warps,
            )  # fmt: skip
    residual_out = res_out.finish() if res_out else input.new_empty(0)
    return out.finish(), residual_out, mean, rstd


def ln_bwd_max_block(n, *tensors):
    """Longest row the LayerNorm backward handles whole: BWD_MAX_BLOCK held in registers, and
    when every tensor it loads per row (x, dy, the residual's gradient, the weight; None:
    absent) is 16-bit, rows of exactly BWD_REREAD_MAX_BLOCK read twice. Over 16 warps those take
    128 registers and spill nothing, 8-12 B with a residual (8-16 B under triton 3.6); rows of
    12000, masked, spilled 76-180 B (ptxas of triton 3.8, sm_90): the dB accumulator is
    RMSNorm's dW again."""
    if n == BWD_REREAD_MAX_BLOCK and all_16bit(*tensors):
        return n
    return BWD_MAX_BLOCK


def layer_norm_bwd(grad_out, grad_residual_out, x, weight, bias, mean, rstd):
    """grad_out, grad_residual_out (optional), x: [rows, N]; weight, bias: [N] or None;
    mean, rstd: [rows] from the forward.

    Returns (grad_input in x's dtype including grad_residual_out, grad_weight, grad_bias in the
    parameters' dtypes, each empty when its parameter is None).
    """
    rows, n = check_norm_inputs("layer_norm_bwd", x, None, [("weight", weight), ("bias", bias)])
    for name, t in (("grad_out", grad_out), ("grad_residual_out", grad_residual_out)):
        if t is None:
            continue
        check_same_device(t, name, x, "x")
        if t.shape != x.shape:
            raise RuntimeError(
                f"fastnn: {name} of shape {list(t.shape)} does not match x {list(x.shape)}"
            )
    check_same_device(mean, "mean", x, "x")
    check_same_device(rstd, "rstd", x, "x")
    dx = Output(x)
    acc = acc_dtype(x.dtype)
    has_w, has_b = weight is not None, bias is not None
    if rows == 0 or n == 0:
        dw = torch.zeros_like(weight) if has_w else x.new_empty(0)
        db = torch.zeros_like(bias) if has_b else x.new_empty(0)
        return dx.finish(), dw, db
    xc, dy, w = x.contiguous(), grad_out.contiguous(), contiguous(weight)
    dres, mu, rs = contiguous(grad_residual_out), mean.contiguous(), rstd.contiguous()
    flags = dict(HAS_DRES=dres is not None, HAS_W=has_w, HAS_B=has_b, ACC=tl_acc_dtype(x.dtype))
    aligned = vector_aligned(n, dy, dres, xc, w)
    block_m, block_n, single, num_warps = row_config(
        rows, n, x.dtype, ln_bwd_max_block(n, xc, dy, dres, w), aligned, BWD
    )
    with device_context(x):
        if single:
            tile = whole_row_tile(rows, n, block_m, block_n, aligned, num_warps)
            kernel, work, per_sm, col_blocks = _ln_bwd_kernel, tile.row_blocks, tile.per_sm, 1
            kwargs = dict(
                BLOCK_M=block_m, BLOCK_N=block_n, REREAD=tile.reread, EVEN=tile.even,
                num_warps=num_warps, **flags,
            )  # fmt: skip

            def args(dw_part, db_part):
                return [dy, dres, xc, w, mu, rs, dx.buf, dw_part, db_part, rows, n, work]

        else:
            c_gx = torch.empty(rows, dtype=acc, device=x.device)
            c_g = torch.empty(rows, dtype=acc, device=x.device)
            _ln_rowdot_kernel[(rows,)](
                dy, xc, w, mu, rs, c_gx, c_g, n, HAS_W=has_w, ACC=flags["ACC"],
                BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
            kernel, work, per_sm = _ln_bwd_cols_kernel, rows, bwd_programs_per_sm(num_warps)
            col_blocks = triton.cdiv(n, block_n)
            kwargs = dict(BLOCK_N=block_n, num_warps=num_warps, **flags)

            def args(dw_part, db_part):
                return [dy, dres, xc, w, mu, rs, c_gx, c_g, dx.buf, dw_part, db_part, rows, n]

        # The partials' rows are the grid's programs, which depend on the compiled kernel: until
        # they are known their dtype stands in for them (persistent_grid).
        stand_ins = args(acc if has_w else None, acc if has_b else None)
        p = persistent_grid(
            kernel, x.device, work, per_sm, stand_ins, kwargs, aligned, share=col_blocks
        )
        dw_part = torch.empty((p, n), dtype=acc, device=x.device) if has_w else None
        db_part = torch.empty((p, n), dtype=acc, device=x.device) if has_b else None
        kernel[(p,) if single else (col_blocks, p)](*args(dw_part, db_part), **kwargs)
        dw = reduce_partials(dw_part, weight) if has_w else x.new_empty(0)
        db = reduce_partials(db_part, bias) if has_b else x.new_empty(0)
    return dx.finish(), dw, db
