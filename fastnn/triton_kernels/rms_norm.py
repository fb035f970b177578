"""Triton RMSNorm forward and backward over the last dim of a 2-D input, optionally fused with a
residual add: the `triton` backend of `fastnn::rms_norm_fwd` / `fastnn::rms_norm_bwd`.

Semantics are fastnn/reference/rms_norm.py's. Statistics and accumulation are fp32 (fp64 for
fp64 input, so gradcheck can run on these kernels under the interpreter); out, residual_out and
grad_input have the input's dtype, grad_weight the weight's.

The work is laid out as norm_common.py describes; this module adds RMSNorm's own tiers (rows
read twice: rms_fwd_rereads, rms_bwd_max_block), its kernels and its launchers.
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
    READ_FIRST,
    READ_ONCE,
    READ_SECOND,
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
    load_row,
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

# RMSNorm forward rows of exactly 64K 16-bit elements (without a residual) are taken whole, read a
# second time after their reduction: over 32 warps 64 registers, none spilled under triton
# 3.6 (the GPU machines') and 24 B under 3.8 (ptxas, sm_90), where holding them spilled 104 B
# and the residual's second tensor 76 B (LayerNorm's weight and bias together, 156 B: its rows
# loop). Not timed yet (written without a GPU): the looping tier they replace ran at 76% of
# copy (H100, bf16, 32768 rows, bench/results/nvidia-h100-80gb-hbm3-2026-11-27/sweep-fwd-64k);
# the sweep's rms_norm fwd 65536 case times both.
FWD_REREAD_BLOCK = 65536


def rms_fwd_rereads(n, x, r, w, aligned):
    """Whether the RMSNorm forward takes rows of n elements whole past fwd_max_block, reading
    them again after their reduction (an L1 or L2 hit, not measured) instead of looping over
    column blocks twice: 16-bit rows of exactly FWD_REREAD_BLOCK without a residual (r None),
    16-bit weight or none, 16-byte vectors."""
    return n == FWD_REREAD_BLOCK and r is None and all_16bit(x, w) and aligned


def rms_bwd_max_block(n, *tensors):
    """Longest row the RMSNorm backward handles whole: BWD_MAX_BLOCK held in registers; when
    every tensor it loads per row (x, dy, the residual's gradient, the weight; None: absent) is
    16-bit, rows read twice: up to BWD_REREAD_MAX_BLOCK, and rows of exactly twice that in two
    column halves (no masks: masked halves spilled 216 B)."""
    if not all_16bit(*tensors):
        return BWD_MAX_BLOCK
    return n if n == 2 * BWD_REREAD_MAX_BLOCK else BWD_REREAD_MAX_BLOCK


# ---- RMSNorm kernels -----------------------------------------------------------------------------


@triton.jit
def _rms_fwd_kernel(
    X, R, W, Y, S, RSTD, rows, N, eps: tl.float64,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, REREAD: tl.constexpr,
):  # fmt: skip
    """Whole rows: program p normalises row tile p (REREAD: reading it again after the
    reduction: rms_fwd_rereads). Long rows: a persistent grid, program p normalises row tiles
    p, p + P, ..., each in two passes over its column blocks."""
    # eps arrives as fp64 (a Python float argument would be typed fp32 when compiled, though
    # the interpreter keeps it fp64) and is rounded to the statistics' dtype here, as torch does.
    tl.static_assert(not (REREAD and HAS_RES), "rows read twice are rows without a residual")
    eps = tl.full((), eps, ACC)
    if SINGLE:
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = row < rows
        base = row[:, None] * N
        cols, cmask, mask = column_block(0, rmask, N, BLOCK_N)
        offs = base + cols[None, :]
        if REREAD:  # rows without a residual that the tile covers exactly: no masks
            x = load_row(X, offs, mask, ACC, READ_FIRST, True)
            rstd = rsqrt_rn(tl.sum(x * x, axis=1) / N + eps, ACC)
            y = load_row(X, offs, mask, ACC, READ_SECOND, True) * rstd[:, None]
            if HAS_W:
                y = y * load_row(W, cols, cmask, ACC, READ_ONCE, True)[None, :]
            tl.store(Y + offs, y.to(Y.dtype.element_ty))
        else:
            x = load_sum_saved(X, R, S, offs, mask, HAS_RES, ACC)
            rstd = rsqrt_rn(tl.sum(x * x, axis=1) / N + eps, ACC)
            y = x * rstd[:, None]
            if HAS_W:
                y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd, mask=rmask)
    else:
        for rb in range(tl.program_id(0).to(tl.int64), tl.cdiv(rows, BLOCK_M), tl.num_programs(0)):
            row = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = row < rows
            rstd = _rms_fwd_long_rows(
                X, R, W, Y, S, row, rmask, N, eps, HAS_RES, HAS_W, ACC, BLOCK_M, BLOCK_N
            )
            tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _rms_fwd_long_rows(
    X, R, W, Y, S, row, rmask, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The rows `row` in two passes over column blocks: the sum of squares, then the output
    (its re-read of the rows mostly hitting L2). Returns rstd."""
    base = row[:, None] * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        x = load_sum_saved(X, R, S, base + cols[None, :], mask, HAS_RES, ACC)
        acc += x * x
    rstd = rsqrt_rn(tl.sum(acc, axis=1) / N + eps, ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        # Recomputing x + r (instead of reading S back) keeps this pass free of any ordering
        # question between this program's stores and loads.
        y = load_sum(X, R, base + cols[None, :], mask, HAS_RES, ACC).to(ACC) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    return rstd


@triton.jit
def _rms_bwd_dot(X, DY, W, w, base, rmask, cols, cmask, rstd, HAS_W: tl.constexpr,
                 ACC: tl.constexpr, REREAD: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """sum(g * xhat) over the columns `cols` of the rows at `base` (row offsets)."""
    mask = rmask[:, None] & cmask[None, :]
    _, xhat, g = bwd_terms(
        X, DY, W, w, base + cols[None, :], mask, cols, cmask, rstd, rstd, False, HAS_W, ACC,
        REREAD, EVEN, False,
    )  # fmt: skip
    return tl.sum(g * xhat, axis=1)


@triton.jit
def _rms_bwd_dx(DY, DRES, X, W, w, DX, base, rmask, cols, cmask, rstd, c, dw,
                HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                REREAD: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """dx of the columns `cols` of the rows at `base`, given c = mean(g * xhat) per row; returns
    dw + dy * xhat. Without REREAD its loads are those _rms_bwd_dot made, which the compiler
    merges: the values stay in registers."""
    offs = base + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    dy, xhat, g = bwd_terms(
        X, DY, W, w, offs, mask, cols, cmask, rstd, rstd, False, HAS_W, ACC, REREAD, EVEN, REREAD
    )
    dx = rstd[:, None] * (g - xhat * c[:, None])
    store_dx(DX, DRES, offs, mask, dx, HAS_DRES, ACC, EVEN)
    if HAS_W:
        dw += dy * xhat
    return dw


@triton.jit
def _rms_bwd_kernel(
    DY, DRES, X, W, RSTD, DX, DW_PART, rows, N, num_row_blocks,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr, REREAD: tl.constexpr,
    EVEN: tl.constexpr,
):  # fmt: skip
    """Persistent: program p handles row tiles p, p + P, ...; writes DW_PART[p, :]. A tile is
    BLOCK_M rows of HALVES column blocks of BLOCK_N, each block with its own dW accumulator.
    REREAD: the tile (and the weight) are read again after the rows' reduction instead of held
    in registers across it. EVEN: the tiles cover the rows exactly (no masks)."""
    tl.static_assert(HALVES == 1 or REREAD, "a held weight covers the first half only")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    cols2 = BLOCK_N + cols  # the second half (HALVES == 2)
    cmask2 = cols2 < N
    w = held_weight(W, cols, cmask, HAS_W, ACC, REREAD, BLOCK_N)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    dw2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    # An int64 loop variable: row offsets stay int64 (and the interpreter yields Python ints).
    for rb in tl.range(pid.to(tl.int64), num_row_blocks, nprog, num_stages=1):
        row = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = row < rows
        base = row[:, None] * N
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0).to(ACC)
        c = _rms_bwd_dot(X, DY, W, w, base, rmask, cols, cmask, rstd, HAS_W, ACC, REREAD, EVEN)
        if HALVES == 2:
            c += _rms_bwd_dot(
                X, DY, W, w, base, rmask, cols2, cmask2, rstd, HAS_W, ACC, REREAD, EVEN
            )
        c = c / N
        dw = _rms_bwd_dx(
            DY, DRES, X, W, w, DX, base, rmask, cols, cmask, rstd, c, dw,
            HAS_DRES, HAS_W, ACC, REREAD, EVEN,
        )  # fmt: skip
        if HALVES == 2:
            dw2 = _rms_bwd_dx(
                DY, DRES, X, W, w, DX, base, rmask, cols2, cmask2, rstd, c, dw2,
                HAS_DRES, HAS_W, ACC, REREAD, EVEN,
            )  # fmt: skip
    if HAS_W:
        part = DW_PART + pid.to(tl.int64) * N
        tl.store(part + cols, tl.sum(dw, axis=0), mask=cmask)
        if HALVES == 2:
            tl.store(part + cols2, tl.sum(dw2, axis=0), mask=cmask2)


@triton.jit
def _rms_rowdot_kernel(
    DY, X, W, RSTD, C, N, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Long rows: C[row] = mean(g * xhat) with g = dy * w, looping over column blocks."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(RSTD + row).to(ACC)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=1):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        x = tl.load(X + row * N + cols, mask=cmask, other=0.0).to(ACC)
        g = tl.load(DY + row * N + cols, mask=cmask, other=0.0).to(ACC)
        if HAS_W:
            g = g * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        acc += g * x * rstd
    tl.store(C + row, tl.sum(acc, axis=0) / N)


@triton.jit
def _rms_bwd_cols_kernel(
    DY, DRES, X, W, RSTD, C, DX, DW_PART, rows, N,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Long rows: program (j, g) handles column block j of rows g, g + G, ...; DW_PART[g, block j]."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    ngrp = tl.num_programs(1)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    for row in tl.range(grp.to(tl.int64), rows, ngrp, num_stages=1):
        offs = row * N + cols
        x = tl.load(X + offs, mask=cmask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row).to(ACC)
        c = tl.load(C + row)
        xhat = x * rstd
        g = dy * w if HAS_W else dy
        dx = rstd * (g - xhat * c)
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=cmask, other=0.0).to(ACC)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=cmask)
        if HAS_W:
            dw += dy * xhat
    if HAS_W:
        tl.store(DW_PART + grp.to(tl.int64) * N + cols, dw, mask=cmask)


# ---- launchers (the op signatures of csrc/library.cpp) ---------------------------------------------


def rms_norm_fwd(input, residual, weight, eps):
    """input, residual: [rows, N]; weight: [N] or None (any float dtype).

    Returns (out [rows, N] input's dtype, residual_out (the rounded input + residual, or empty),
    rstd [rows] fp32, fp64 for fp64 input).
    """
    rows, n = check_norm_inputs("rms_norm_fwd", input, residual, [("weight", weight)])
    out = Output(input)
    res_out = Output(input) if residual is not None else None
    rstd = torch.empty(rows, dtype=acc_dtype(input.dtype), device=input.device)
    if rows > 0 and n == 0:
        rstd.fill_(float("nan"))  # the mean of an empty row, as the reference computes it
    elif rows > 0:
        x, r, w = input.contiguous(), contiguous(residual), contiguous(weight)
        aligned = vector_aligned(n, x, r, w)
        reread = rms_fwd_rereads(n, x, r, w, aligned)
        max_block = n if reread else fwd_max_block(x, w)
        block_m, block_n, single, num_warps = row_config(
            rows, n, input.dtype, max_block, aligned, FWD
        )
        grid = (fwd_grid(input.device, rows, block_m, single),)
        with device_context(input):
            _rms_fwd_kernel[grid](
                x, r, w, out.buf, res_out.buf if res_out else None, rstd, rows, n, eps,
                HAS_RES=r is not None, HAS_W=w is not None, ACC=tl_acc_dtype(input.dtype),
                BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single,
                REREAD=reread and single and block_n == n, num_warps=num_warps,
            )  # fmt: skip
    residual_out = res_out.finish() if res_out else input.new_empty(0)
    return out.finish(), residual_out, rstd


def rms_norm_bwd(grad_out, grad_residual_out, x, weight, rstd):
    """grad_out, grad_residual_out (optional): [rows, N]; x: the normalised tensor [rows, N];
    weight: [N] or None; rstd: [rows] from the forward.

    Returns (grad_input [rows, N] in x's dtype, including grad_residual_out; grad_weight [N] in
    weight's dtype, or empty without weight).
    """
    rows, n = check_norm_inputs("rms_norm_bwd", x, None, [("weight", weight)])
    check_same_device(grad_out, "grad_out", x, "x")
    check_same_device(rstd, "rstd", x, "x")
    if grad_out.shape != x.shape:
        raise RuntimeError(
            f"fastnn: grad_out of shape {list(grad_out.shape)} does not match x {list(x.shape)}"
        )
    if grad_residual_out is not None:
        check_same_device(grad_residual_out, "grad_residual_out", x, "x")
        if grad_residual_out.shape != x.shape:
            raise RuntimeError(
                f"fastnn: grad_residual_out of shape {list(grad_residual_out.shape)} does not "
                f"match x {list(x.shape)}"
            )
    dx = Output(x)
    acc = acc_dtype(x.dtype)
    if rows == 0 or n == 0:
        if weight is None:
            return dx.finish(), x.new_empty(0)
        return dx.finish(), torch.zeros_like(weight)
    xc, dy, w = x.contiguous(), grad_out.contiguous(), contiguous(weight)
    dres, rs = contiguous(grad_residual_out), rstd.contiguous()
    has_w = w is not None
    flags = dict(HAS_DRES=dres is not None, HAS_W=has_w, ACC=tl_acc_dtype(x.dtype))
    aligned = vector_aligned(n, dy, dres, xc, w)
    block_m, block_n, single, num_warps = row_config(
        rows, n, x.dtype, rms_bwd_max_block(n, xc, dy, dres, w), aligned, BWD
    )
    with device_context(x):
        if single:
            tile = whole_row_tile(rows, n, block_m, block_n, aligned, num_warps)
            kernel, work, per_sm, col_blocks = _rms_bwd_kernel, tile.row_blocks, tile.per_sm, 1
            kwargs = dict(
                BLOCK_M=block_m, BLOCK_N=block_n // tile.halves, HALVES=tile.halves,
                REREAD=tile.reread, EVEN=tile.even, num_warps=num_warps, **flags,
            )  # fmt: skip

            def args(part):
                return [dy, dres, xc, w, rs, dx.buf, part, rows, n, work]

        else:
            c = torch.empty(rows, dtype=acc, device=x.device)
            _rms_rowdot_kernel[(rows,)](
                dy, xc, w, rs, c, n, HAS_W=has_w, ACC=flags["ACC"], BLOCK_N=block_n,
                num_warps=num_warps,
            )  # fmt: skip
            kernel, work, per_sm = _rms_bwd_cols_kernel, rows, bwd_programs_per_sm(num_warps)
            col_blocks = triton.cdiv(n, block_n)
            kwargs = dict(BLOCK_N=block_n, num_warps=num_warps, **flags)

            def args(part):
                return [dy, dres, xc, w, rs, c, dx.buf, part, rows, n]

        # The partial dW's rows are the grid's programs, which depend on the compiled kernel:
        # until they are known its dtype stands in for it (persistent_grid).
        stand_ins = args(acc if has_w else None)
        p = persistent_grid(
            kernel, x.device, work, per_sm, stand_ins, kwargs, aligned, share=col_blocks
        )
        part = torch.empty((p, n), dtype=acc, device=x.device) if has_w else None
        kernel[(p,) if single else (col_blocks, p)](*args(part), **kwargs)
        dw = reduce_partials(part, weight) if has_w else x.new_empty(0)
    return dx.finish(), dw
