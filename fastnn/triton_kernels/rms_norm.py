"""Triton RMSNorm forward and backward over the last dim of a 2-D input, optionally fused with a
residual add: the `triton` backend of `fastnn::rms_norm_fwd` / `fastnn::rms_norm_bwd`.

Semantics are fastnn/reference/rms_norm.py's. Statistics and accumulation are fp32 (fp64 for
fp64 input, so gradcheck can run on these kernels under the interpreter); out, residual_out and
grad_input have the input's dtype, grad_weight the weight's.

Layout of the work:
- forward, rows up to FWD_MAX_BYTES (64 KB; half for unaligned rows, below): one
  [BLOCK_M, BLOCK_N] tile of rows per program, the rows kept in registers between the sum of
  squares and the scaling (one read of x);
- forward, longer rows: a persistent grid, each program looping over its rows' column blocks
  twice (the second read of a row hits L2 while few enough rows are in flight: a 64K bf16 row is
  128 KB);
- backward, N <= BWD_MAX_BLOCK (half for unaligned rows): a persistent grid of P programs,
  each looping over row tiles and summing dW for its rows in fp32 registers, one [P, N]
  partial write;
- backward, larger N: one fused persistent kernel reading each row twice, the second time from
  L2 (long_row_backward), or for the longest rows a row-dot kernel (sum(g * xhat) per row), then
  a [column block, row group] grid that writes dx and a [G, N] partial;
- loops over column blocks and row tiles are software-pipelined (pipeline_stages): the next
  block's loads are in flight while one is reduced;
- dW = a fixed-order column sum of the partials (reduce_partials): bitwise reproducible across
  runs on one device, since P depends only on the device and the shape;
- rows that cannot be loaded as 16-byte vectors (vector_aligned: N not a multiple of 16, or a
  pointer off a 16-byte boundary) cost an address register per element: their caps, column
  blocks, row tiles and elements per thread are half the others' (row_config).

The helpers at the top (checks, allocation, program counts, the partial reduction) are shared
with layer_norm.py.
"""

import functools

import torch
import triton
import triton.language as tl

from fastnn.triton_kernels import device_context

# Largest row held whole in registers. Forward: 64 KB of row, x and its fp32 copy per element
# (32K 16-bit elements over 32 warps is 32 per thread: 63 registers, no spills, ptxas of triton
# 3.8 for sm_90; 16K fp32 the same). Backward keeps x, dy and the fp32 dW accumulator: 8K
# elements over 16 warps is 16 of each per thread.
FWD_MAX_BYTES = 65536
BWD_MAX_BLOCK = 8192
# Column block of the looping paths (N above the caps).
LOOP_BLOCK = 4096
# Programs per SM of the forward's looping tier (a persistent grid). Each program reads its row
# twice, the second time from L2 if the row is still there: 2 programs per SM keep 264 rows in
# flight on 132 SMs, 33 MB of 64K bf16 rows, within an H100's 50 MB of L2. The grid of one
# program per row this replaces ran 4 per SM (64 warps), 67 MB of rows in flight, and measured
# 67-70% of copy at 32K / 64K bf16 (H200): what 3 passes over DRAM give where 2 are needed.
FWD_LOOP_PROGRAMS_PER_SM = 2
# The fused long-row backward: one program per SM, its working set (a row of x and dy, its fp32
# partial rows of dW / dB) within half an H100's L2 together (132 x 192 KB = 25 MB of 50 MB):
# rows of up to 24K bf16 elements in RMSNorm, 16K in LayerNorm and fp32 RMSNorm, 12K in fp32
# LayerNorm (all with weight; the launch policy is long_row_backward).
FUSED_PROGRAMS_PER_SM = 1
FUSED_MAX_PROGRAM_BYTES = 192 * 1024
# Elements per program tile for short rows (several rows per program).
TILE = 4096


# ---- shared helpers (also used by layer_norm.py) -------------------------------------------------


def acc_dtype(dtype):
    """Torch accumulation / statistics dtype for tensors of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_norm_inputs(op, input, residual, params):
    """Checks the schema's contract; `params` is [(name, tensor or None)]. Returns (rows, N)."""
    if input.dim() != 2:
        raise RuntimeError(f"fastnn: {op} expects a 2-D input [rows, N], got {list(input.shape)}")
    if input.dtype not in _FLOATS:
        raise RuntimeError(
            f"fastnn: input must be float32, float16, bfloat16 or float64, got {input.dtype}"
        )
    rows, n = input.shape
    if residual is not None:
        if residual.shape != input.shape or residual.dtype != input.dtype:
            raise RuntimeError(
                f"fastnn: residual ({list(residual.shape)}, {residual.dtype}) must match input "
                f"({list(input.shape)}, {input.dtype})"
            )
        params = [*params, ("residual", residual)]
    for name, p in params:
        if p is None:
            continue
        if p.device != input.device:
            raise RuntimeError(f"fastnn: {name} is on {p.device} but input is on {input.device}")
        if p.dtype not in _FLOATS:
            raise RuntimeError(
                f"fastnn: {name} must be float32, float16, bfloat16 or float64, got {p.dtype}"
            )
        if name != "residual" and tuple(p.shape) != (n,):
            raise RuntimeError(f"fastnn: {name} must have shape [{n}], got {list(p.shape)}")
    return rows, n


def check_same_device(t, name, ref, ref_name):
    if t.device != ref.device:
        raise RuntimeError(f"fastnn: {name} is on {t.device} but {ref_name} is on {ref.device}")


def contiguous(t):
    return None if t is None else t.contiguous()


class Output:
    """An output allocated as the fake allocates it (empty_like(ref): strides follow ref), with a
    contiguous buffer for the kernel; finish() copies back when the two differ."""

    def __init__(self, ref, dtype=None):
        self.out = torch.empty_like(ref, dtype=dtype)
        self.buf = (
            self.out
            if self.out.is_contiguous()
            else torch.empty(ref.shape, dtype=self.out.dtype, device=ref.device)
        )

    def finish(self):
        if self.buf is not self.out:
            self.out.copy_(self.buf)
        return self.out


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def persistent_programs(device, work, per_sm, share=1):
    """Programs of a persistent grid: `per_sm` per SM on a GPU split over `share` grid columns,
    at most `work`. Under the interpreter (CPU) 4, so the partial-sum reduction is exercised
    with several partials while the grid stays small (about 1 ms per interpreted program)."""
    if device.type == "cuda":
        budget = _sm_count(_index(device)) * per_sm // share
    else:
        budget = 4
    return max(1, min(work, budget))


def fwd_max_block(input, *params):
    """Largest row (elements) the forward holds whole in registers: FWD_MAX_BYTES of the
    widest of the input and its parameters (None: absent). 32K bf16 rows with fp32 weight and
    bias spilled 168 B per thread in the LayerNorm forward; they take the looping tier."""
    return FWD_MAX_BYTES // max(t.dtype.itemsize for t in (input, *params) if t is not None)


def vector_aligned(n, *tensors):
    """Whether Triton can load rows of n elements of these tensors (None: absent) as 16-byte
    vectors: n a multiple of 16 (the only divisibility Triton specializes an integer argument
    on) and every tensor starting on a 16-byte boundary."""
    return n % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def pipeline_stages(dtype):
    """Software pipeline depth of the kernels' loops over column blocks and row tiles (STAGES):
    with 2 the next block's loads are in flight (cp.async into shared memory) while this one
    is reduced and stored. Without it a looping forward thread had 2 global loads in flight
    (SASS, triton 3.8); with it the loops issue 6-20 LDGSTS. 16-bit rows only: pipelined, the
    fp32 row-tile backward spilled 12-40 B per thread (triton 3.6, N = 1000 and 8192 with a
    residual)."""
    return 2 if dtype.itemsize == 2 else 1


def long_row_backward(n, dtype, partials):
    """How the backward takes rows past its row tiles (row_config): "fused" (one kernel
    reading each row tile twice, the second time from L2, and adding into a partial row per
    program: 3 passes over memory, the least a backward needs) where a program's working set,
    its row of x and dy and its `partials` fp32 (fp64) rows of dW / dB, is at most
    FUSED_MAX_PROGRAM_BYTES; else "two-pass" (a row-dot kernel, then the column kernel: x and
    dy read twice from DRAM, 5 passes)."""
    program_bytes = n * (2 * dtype.itemsize + acc_dtype(dtype).itemsize * partials)
    return "fused" if program_bytes <= FUSED_MAX_PROGRAM_BYTES else "two-pass"


def fwd_grid(device, rows, block_m, single):
    """Programs of a forward launch: one per row tile for whole rows, else a persistent grid
    of FWD_LOOP_PROGRAMS_PER_SM per SM looping over rows."""
    if single:
        return triton.cdiv(rows, block_m)
    return persistent_programs(device, triton.cdiv(rows, block_m), FWD_LOOP_PROGRAMS_PER_SM)


def row_config(rows, n, dtype, max_block, per_thread, aligned):
    """(BLOCK_M, BLOCK_N, single, num_warps) for a row-wise kernel: whole rows (several per
    program for short rows) up to `max_block`, else one row in LOOP_BLOCK column blocks.
    num_warps (4..32) gives each thread about `per_thread` 16-bit elements, half as many wider
    ones: 32 for the forward (x and its fp32 copy), 16 for the backward (x, dy, dW accumulator
    and temporaries). bench/kernel_resources.py: at 16 warps the fp32 LayerNorm backward of 8K
    rows with a residual spilled 60 B per thread (triton 3.6), at 32 warps it does not.

    Rows that cannot be 16-byte vectors (`aligned` False: vector_aligned) take an address
    register per element, so their cap, column block, row tile and elements per thread are
    half the others'. At the full sizes 16-bit forward rows of 16K-32K spilled 32-258 B per
    thread, bf16 backward rows of 4097 56-212 B and the fp32 column kernel with a residual
    56-96 B (N = 16411); the bf16 backward at N = 1000 took 173-218 registers at 8 warps (one
    program per SM), 95-128 with half the row tile (two). Twice the warps instead spilled 80 B
    there under triton 3.6 (16 warps cap a thread at 128 registers)."""
    max_tile, loop_block = TILE, LOOP_BLOCK
    if not aligned:
        max_block, per_thread, max_tile, loop_block = (
            v // 2 for v in (max_block, per_thread, max_tile, loop_block)
        )
    block_n = triton.next_power_of_2(n)
    if block_n > max_block:
        return 1, loop_block, False, 16
    block_m = max(1, min(max_tile // block_n, triton.next_power_of_2(rows)))
    tile = block_m * block_n
    per_thread = per_thread if dtype.itemsize <= 2 else per_thread // 2
    num_warps = min(32, max(4, tile // (32 * per_thread)))
    return block_m, block_n, True, num_warps


@triton.jit
def _reduce_partials_kernel(PART, OUT, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[c] = sum over p of PART[p, c], in a fixed order: the same bits on every run."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=PART.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        prow = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (prow[:, None] < P) & cmask[None, :]
        acc += tl.load(PART + prow[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cmask)


# Elements of the reduction's [BLOCK_P, BLOCK_N] tile: 32 fp32 per thread over 8 warps.
REDUCE_TILE = 8192


def reduce_partials(part, like):
    """part: [P, N] fp32 (fp64) partial sums -> [N] tensor shaped and typed like `like`.

    Column blocks of 32 to 256 columns, narrow enough for about two programs per SM: a program
    waits out one round of loads per BLOCK_P partial rows, so the sum takes about P / BLOCK_P
    load latencies whatever the bandwidth. 256-column blocks gave a [528, 1024] backward
    partial (8 warps' row tiles at 4 programs per SM on 132 SMs) to 4 programs of 17 rounds
    each; 32-column blocks give it 32 programs of 3 rounds. The layout depends only on the
    device and the shape, so the sum's order (and its bits) too.
    """
    out = Output(like)
    p, n = part.shape
    programs = 2 * _sm_count(_index(part.device)) if part.device.type == "cuda" else 4
    block_n = min(256, max(32, _pow2_at_most(triton.cdiv(n, programs))))
    grid = (triton.cdiv(n, block_n),)
    _reduce_partials_kernel[grid](
        part, out.buf, p, n, BLOCK_P=REDUCE_TILE // block_n, BLOCK_N=block_n, num_warps=8
    )
    return out.finish()


def _pow2_at_most(v):
    return 1 << (max(1, v).bit_length() - 1)


# ---- RMSNorm kernels ------------------------------------------------------------------------------


@triton.jit
def column_block(start, rmask, N, BLOCK_N: tl.constexpr):
    """Columns start .. start + BLOCK_N of a tile of rows (rmask: the rows that exist):
    (cols, their mask, the tile's [rows, BLOCK_N] mask)."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < N
    return cols, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def load_sum(X, R, offs, mask, HAS_RES: tl.constexpr, ACC: tl.constexpr):
    """x (+ r rounded to x's dtype, as an unfused add would be), in x's dtype."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(X.dtype.element_ty)
    return x


@triton.jit
def load_sum_saved(X, R, S, offs, mask, HAS_RES: tl.constexpr, ACC: tl.constexpr):
    """load_sum in ACC, the sum stored to S (residual_out) when there is a residual."""
    s = load_sum(X, R, offs, mask, HAS_RES, ACC)
    if HAS_RES:
        tl.store(S + offs, s, mask=mask)
    return s.to(ACC)


@triton.jit
def load_x_dy_g(X, DY, W, offs, cols, mask, cmask, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """x, dy and g = dy * w (dy without a weight) of a block of rows, in ACC."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    g = dy * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :] if HAS_W else dy
    return x, dy, g


@triton.jit
def _rms_fwd_kernel(
    X, R, W, Y, S, RSTD, rows, N, eps: tl.float64,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, STAGES: tl.constexpr,
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
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd, mask=rmask)
    else:
        for rb in range(tl.program_id(0).to(tl.int64), tl.cdiv(rows, BLOCK_M), tl.num_programs(0)):
            row = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = row < rows
            rstd = _rms_fwd_long_rows(
                X, R, W, Y, S, row, rmask, N, eps, HAS_RES, HAS_W, ACC, BLOCK_M, BLOCK_N, STAGES
            )
            tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _rms_fwd_long_rows(
    X, R, W, Y, S, row, rmask, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """The rows `row` in two passes over column blocks: the sum of squares, then the output
    (its re-read of the rows mostly hitting L2). Returns rstd."""
    base = row[:, None] * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        x = load_sum_saved(X, R, S, base + cols[None, :], mask, HAS_RES, ACC)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
    for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
        # Recomputing x + r (instead of reading S back) keeps this pass free of any ordering
        # question between this program's stores and loads.
        y = load_sum(X, R, base + cols[None, :], mask, HAS_RES, ACC).to(ACC) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    return rstd


@triton.jit
def _rms_bwd_kernel(
    DY, DRES, X, W, RSTD, DX, DW_PART, rows, N, num_row_blocks,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Persistent: program p handles row tiles p, p + P, ...; writes DW_PART[p, :]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    # An int64 loop variable: row offsets stay int64 (and the interpreter yields Python ints).
    for rb in tl.range(pid.to(tl.int64), num_row_blocks, nprog, num_stages=STAGES):
        row = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = row < rows
        mask = rmask[:, None] & cmask[None, :]
        offs = row[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0).to(ACC)
        xhat = x * rstd[:, None]
        g = dy * w[None, :] if HAS_W else dy
        c = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
    if HAS_W:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=cmask)


@triton.jit
def _rms_rowdot_kernel(
    DY, X, W, RSTD, C, N, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """Long rows: C[row] = mean(g * xhat) with g = dy * w, looping over column blocks."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(RSTD + row).to(ACC)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
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
    STAGES: tl.constexpr,
):  # fmt: skip
    """Long rows: program (j, g) handles column block j of rows g, g + G, ...; DW_PART[g, block j]."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    ngrp = tl.num_programs(1)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    for row in tl.range(grp.to(tl.int64), rows, ngrp, num_stages=STAGES):
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


@triton.jit
def _rms_bwd_fused_kernel(
    DY, DRES, X, W, RSTD, DX, DW_PART, rows, N,
    HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Long rows in one persistent kernel: program p handles row tiles p, p + P, ..., each in
    two passes over its column blocks, the row dots, then dx (re-reading x and dy, from L2
    while the tile is still there) with dy * xhat added into its partial row DW_PART[p, :]
    (zeroed by the launcher, kept in L2 too)."""
    pid = tl.program_id(0)
    part = pid.to(tl.int64) * N
    for rb in range(pid.to(tl.int64), tl.cdiv(rows, BLOCK_M), tl.num_programs(0)):
        row = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = row < rows
        base = row[:, None] * N
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
            cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
            x, _, g = load_x_dy_g(X, DY, W, base + cols[None, :], cols, mask, cmask, HAS_W, ACC)
            acc += g * x * rstd[:, None]
        c = tl.sum(acc, axis=1) / N
        # The partial row's elements are read back by other threads than wrote them (the
        # pipelined loads go through shared memory in their own layout): the last tile's
        # stores must be visible to the whole program first.
        tl.debug_barrier()
        for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
            cols, cmask, mask = column_block(start, rmask, N, BLOCK_N)
            offs = base + cols[None, :]
            x, dy, g = load_x_dy_g(X, DY, W, offs, cols, mask, cmask, HAS_W, ACC)
            xhat = x * rstd[:, None]
            dx = rstd[:, None] * (g - xhat * c[:, None])
            if HAS_DRES:
                dx += tl.load(DRES + offs, mask=mask, other=0.0).to(ACC)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw = tl.load(DW_PART + part + cols, mask=cmask, other=0.0)
                tl.store(DW_PART + part + cols, dw + tl.sum(dy * xhat, axis=0), mask=cmask)


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
        block_m, block_n, single, num_warps = row_config(
            rows, n, input.dtype, fwd_max_block(x, w), 32, vector_aligned(n, x, r, w)
        )
        grid = (fwd_grid(input.device, rows, block_m, single),)
        stages = 1 if single else pipeline_stages(input.dtype)
        with device_context(input):
            _rms_fwd_kernel[grid](
                x, r, w, out.buf, res_out.buf if res_out else None, rstd, rows, n, eps,
                HAS_RES=r is not None, HAS_W=w is not None, ACC=tl_acc_dtype(input.dtype),
                BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, STAGES=stages,
                num_warps=num_warps,
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
    flags = dict(
        HAS_DRES=dres is not None, HAS_W=has_w, ACC=tl_acc_dtype(x.dtype),
        STAGES=pipeline_stages(x.dtype),
    )  # fmt: skip
    aligned = vector_aligned(n, dy, dres, xc, w)
    block_m, block_n, single, num_warps = row_config(rows, n, x.dtype, BWD_MAX_BLOCK, 16, aligned)
    with device_context(x):
        if single:
            row_blocks = triton.cdiv(rows, block_m)
            p = persistent_programs(x.device, row_blocks, max(1, 32 // num_warps))
            part = torch.empty((p, n), dtype=acc, device=x.device) if has_w else None
            _rms_bwd_kernel[(p,)](
                dy, dres, xc, w, rs, dx.buf, part, rows, n, row_blocks,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags,
            )  # fmt: skip
        elif long_row_backward(n, x.dtype, int(has_w)) == "fused":
            row_blocks = triton.cdiv(rows, block_m)
            p = persistent_programs(x.device, row_blocks, FUSED_PROGRAMS_PER_SM)
            part = torch.zeros((p, n), dtype=acc, device=x.device) if has_w else None
            _rms_bwd_fused_kernel[(p,)](
                dy, dres, xc, w, rs, dx.buf, part, rows, n,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags,
            )  # fmt: skip
        else:
            c = torch.empty(rows, dtype=acc, device=x.device)
            _rms_rowdot_kernel[(rows,)](
                dy, xc, w, rs, c, n, HAS_W=has_w, ACC=flags["ACC"], BLOCK_N=block_n,
                STAGES=flags["STAGES"], num_warps=num_warps,
            )  # fmt: skip
            col_blocks = triton.cdiv(n, block_n)
            g = persistent_programs(x.device, rows, 4, share=col_blocks)
            part = torch.empty((g, n), dtype=acc, device=x.device) if has_w else None
            _rms_bwd_cols_kernel[(col_blocks, g)](
                dy, dres, xc, w, rs, c, dx.buf, part, rows, n,
                BLOCK_N=block_n, num_warps=num_warps, **flags,
            )  # fmt: skip
        dw = reduce_partials(part, weight) if has_w else x.new_empty(0)
    return dx.finish(), dw
