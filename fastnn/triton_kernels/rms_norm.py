"""Triton RMSNorm forward and backward over the last dim of a 2-D input, optionally fused with a
residual add: the `triton` backend of `fastnn::rms_norm_fwd` / `fastnn::rms_norm_bwd`.

Semantics are fastnn/reference/rms_norm.py's. Statistics and accumulation are fp32 (fp64 for
fp64 input, so gradcheck can run on these kernels under the interpreter); out, residual_out and
grad_input have the input's dtype, grad_weight the weight's.

Layout of the work (launch shapes: FWD and BWD, below):
- forward, rows up to FWD_MAX_BYTES (64 KB; half for unaligned rows, below): one
  [BLOCK_M, BLOCK_N] tile of rows per program, the rows kept in registers between the sum of
  squares and the scaling (one read of x);
- forward, longer rows: a persistent grid, each program looping over its rows' column blocks
  twice (the second read of a row hits L2 while few enough rows are in flight: a 64K bf16 row is
  128 KB); but RMSNorm's 16-bit rows of exactly FWD_REREAD_BLOCK without a residual are one tile
  per program, read a second time after the reduction (rms_fwd_rereads);
- backward, N <= BWD_MAX_BLOCK (half for unaligned rows): a persistent grid of P programs,
  each looping over row tiles and summing dW for its rows in fp32 registers, one [P, N]
  partial write;
- backward, 16-bit rows up to BWD_REREAD_MAX_BLOCK and of exactly twice that (RMSNorm;
  LayerNorm: of exactly BWD_REREAD_MAX_BLOCK): the same, but each tile is read again after its
  reduction (an L1 or L2 hit, not measured: the program read it just before) instead of held in
  registers across it, where only the dW (dB) accumulators stay; the longer rows in two column
  halves with an accumulator each (rms_bwd_max_block, ln_bwd_max_block, bwd_rereads,
  bwd_halves);
- backward, larger N: a row-dot kernel (sum(g * xhat) per row), then a [column block, row
  group] grid that writes dx and a [G, N] partial;
- no loop is software-pipelined (num_stages=1): on an H100 (bf16, 32768 rows, N = 1K-64K, both
  norms) two stages never beat one by more than 0.5% of copy and lost up to 6% (the LayerNorm
  forward at 64K: 63% against 69%);
- dW = a fixed-order column sum of the partials (reduce_partials): bitwise reproducible across
  runs on one device, since P depends only on the device and the shape;
- rows that cannot be loaded as 16-byte vectors (vector_aligned: N not a multiple of 16, or a
  pointer off a 16-byte boundary) cost an address register per element: their caps, column
  blocks, row tiles and elements per thread are half the others' (row_config).

The helpers at the top (checks, allocation, program counts, the partial reduction) are shared
with layer_norm.py.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastnn.triton_kernels import device_context

# Largest row held whole in registers. Forward: 64 KB of row, x and its fp32 copy per element
# (32K 16-bit elements over 32 warps is 32 per thread: 63 registers, no spills, ptxas of triton
# 3.8 for sm_90; 16K fp32 the same). Backward keeps x, dy and the fp32 dW accumulator: 8K
# elements over 32 warps is 8 of each per thread.
FWD_MAX_BYTES = 65536
BWD_MAX_BLOCK = 8192
# RMSNorm forward rows of exactly 64K 16-bit elements (without a residual) are taken whole, read a
# second time after their reduction: over 32 warps 64 registers, 8 B spilled (ptxas of triton
# 3.8 and 3.6, sm_90), where holding them spilled 104 B and the residual's second tensor 76 B
# (LayerNorm's weight and bias together, 156 B: its rows loop). Not timed
# yet (written without a GPU): the looping tier they replace ran at 76% of copy (H100, bf16,
# 32768 rows, bench/results/nvidia-h100-80gb-hbm3-2026-11-27/sweep-fwd-64k); the sweep's
# rms_norm fwd 65536 case times both.
FWD_REREAD_BLOCK = 65536
# RMSNorm backward rows of 16-bit elements up to 16K are taken whole and read twice: over 16
# warps a bf16 row of 16K then takes 102-128 registers and spills nothing, where holding it
# across the reduction spilled 52-164 B over 16 or 32 warps (ptxas of triton 3.8, sm_90; over 32
# warps read twice, masked rows of 12000 spilled 8-24 B). Rows of exactly 32K too, in two column
# halves over 16 warps: 128 registers, no spills (8-16 B under triton 3.6; masked halves, rows
# of 16K-32K that are not a power of two, spilled 216 B: they stay on the column kernels).
# Unaligned rows (half the caps, row_config) keep 32 warps: a tile of 8K over 16 warps spilled
# 156-288 B. Past those the row-dot and column kernels read rows twice from memory: 5 units of
# traffic against 3, 60% of copy at most (H100, bf16, N = 16K and 32K,
# bench/results/nvidia-h100-80gb-hbm3-2026-11-27/sweep). fp32 rows of 16K spilled 156 B even
# read twice; LayerNorm (a dB accumulator too) reads twice only 16-bit rows of exactly 16K
# (layer_norm.ln_bwd_max_block). Not timed yet (written without a GPU): torch.compile's
# backward, one kernel holding whole rows, reached 88% of copy at bf16 N = 16K on that H100;
# the sweep's bwd 16384 and 32768 cases time this tier against the column kernels.
BWD_REREAD_MAX_BLOCK = 16384


class LaunchShape(NamedTuple):
    """How row_config lays out one direction's kernels."""

    max_tile: int  # elements of a whole-row tile (rows x next_pow2(N)) at most
    per_thread: tuple  # elements per thread of a whole-row tile: (16-bit, wider dtypes)
    loop_block: int  # column block of rows past the whole-row cap
    loop_warps: int  # warps of the column-block kernels
    reread_warps: int = 0  # warps of aligned backward tiles read twice (bwd_rereads)


# Measured on an H100 (bench/results/nvidia-h100-80gb-hbm3-2026-11-27/: sweep/, sweep-ln-bwd/
# and sweep-fwd-64k/; bf16, 32768 rows, % of copy; RMSNorm / LayerNorm). Forward: tiles of up to
# 4K elements at 32 per thread (RMSNorm N = 1K-32K: 93-101%; LayerNorm 1K-4K: 90-97%); past the
# cap, 16K-column blocks over 32 warps (N = 64K: 76% / 69%, against 54% / 44% with 4K over 16
# warps). Backward: 8 elements per thread in tiles of one row from 1K up (N = 1K / 4K / 8K:
# 84 / 92 / 88% and 75 / 88 / 84%; the previous shape, 16 per thread in 4K tiles, pipelined, gave
# 76 / 88 / 84% and 66 / 83 / 81%, and the LayerNorm backward at 4K over 8 warps, 16 per thread,
# 67%); past the cap, 1K-column blocks over 4 warps (N = 16K and 32K: 60% both, against 43-57% /
# 30-57% with 4K over 16 warps and a fused one-kernel variant that re-read rows from L2).
FWD = LaunchShape(max_tile=4096, per_thread=(32, 16), loop_block=16384, loop_warps=32)
BWD = LaunchShape(max_tile=1024, per_thread=(8, 8), loop_block=1024, loop_warps=4, reread_warps=16)
# Warps per SM of the backward's persistent grids (programs per SM = this / num_warps): the
# sweeps' best at every N above (32 warps: 4 x 8, 16 x 2, 32 x 1 programs).
BWD_WARPS_PER_SM = 32
# Programs per SM of the forward's looping tier (a persistent grid). Each program reads its row
# twice, the second time from L2 if the row is still there. The kernels take 46-64 registers per
# thread (ptxas, sm_90, triton 3.6), so one 32-warp program fits an SM at a time and a grid of 2
# per SM runs as two waves: 132 rows in flight, 17 MB of 64K bf16 rows, within an H100's 50 MB
# of L2. Measured on the H100 above at 64K: 2 per SM 76% / 69% of copy, 1 per SM 75% / 68%.
FWD_LOOP_PROGRAMS_PER_SM = 2


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


def all_16bit(*tensors):
    """Whether every tensor (None: absent) has 16-bit elements: the tiers that read rows twice
    take only such rows (wider ones spilled)."""
    return all(t.element_size() <= 2 for t in tensors if t is not None)


def rms_fwd_rereads(n, x, r, w, aligned):
    """Whether the RMSNorm forward takes rows of n elements whole past fwd_max_block, reading
    them again after their reduction (an L1 or L2 hit, not measured) instead of looping over
    column blocks twice: 16-bit rows of exactly FWD_REREAD_BLOCK without a residual (r None),
    16-bit weight or none, 16-byte vectors."""
    return n == FWD_REREAD_BLOCK and r is None and all_16bit(x, w) and aligned


def vector_aligned(n, *tensors):
    """Whether Triton can load rows of n elements of these tensors (None: absent) as 16-byte
    vectors: n a multiple of 16 (the only divisibility Triton specializes an integer argument
    on) and every tensor starting on a 16-byte boundary."""
    return n % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def fwd_grid(device, rows, block_m, single):
    """Programs of a forward launch: one per row tile for whole rows, else a persistent grid
    of FWD_LOOP_PROGRAMS_PER_SM per SM looping over rows."""
    if single:
        return triton.cdiv(rows, block_m)
    return persistent_programs(device, triton.cdiv(rows, block_m), FWD_LOOP_PROGRAMS_PER_SM)


def row_config(rows, n, dtype, max_block, aligned, shape):
    """(BLOCK_M, BLOCK_N, single, num_warps) for a row-wise kernel laid out by `shape` (FWD or
    BWD): whole rows (several per program for short rows, shape.max_tile elements at most) up
    to `max_block`, else one row in shape.loop_block column blocks over shape.loop_warps warps.
    num_warps (4..32) gives each thread about shape.per_thread elements, or is
    shape.reread_warps for aligned backward tiles read twice (bwd_rereads).
    bench/kernel_resources.py: at 16 warps the fp32 LayerNorm backward of 8K rows with a
    residual spilled 60 B per thread (triton 3.6), at 32 warps it does not.

    Rows that cannot be 16-byte vectors (`aligned` False: vector_aligned) take an address
    register per element, so their cap, column block, row tile and elements per thread are
    half the others'. At the full sizes 16-bit forward rows of 16K-32K spilled 32-258 B per
    thread, bf16 backward rows of 4097 56-212 B and the fp32 column kernel with a residual
    56-96 B (N = 16411); the bf16 backward at N = 1000 took 173-218 registers at 8 warps (one
    program per SM), 95-128 with half the row tile (two). Twice the warps instead spilled 80 B
    there under triton 3.6 (16 warps cap a thread at 128 registers)."""
    per_thread = shape.per_thread[0] if dtype.itemsize <= 2 else shape.per_thread[1]
    max_tile, loop_block = shape.max_tile, shape.loop_block
    if not aligned:
        max_block, per_thread, max_tile, loop_block = (
            max(1, v // 2) for v in (max_block, per_thread, max_tile, loop_block)
        )
    block_n = triton.next_power_of_2(n)
    if block_n > max_block:
        return 1, loop_block, False, shape.loop_warps
    block_m = max(1, min(max_tile // block_n, triton.next_power_of_2(rows)))
    tile = block_m * block_n
    num_warps = min(32, max(4, tile // (32 * per_thread)))
    if shape.reread_warps and aligned and bwd_rereads(tile, aligned):
        num_warps = shape.reread_warps
    return block_m, block_n, True, num_warps


def rms_bwd_max_block(n, *tensors):
    """Longest row the RMSNorm backward handles whole: BWD_MAX_BLOCK held in registers; when
    every tensor it loads per row (x, dy, the residual's gradient, the weight; None: absent) is
    16-bit, rows read twice: up to BWD_REREAD_MAX_BLOCK, and rows of exactly twice that in two
    column halves (no masks: masked halves spilled 216 B)."""
    if not all_16bit(*tensors):
        return BWD_MAX_BLOCK
    return n if n == 2 * BWD_REREAD_MAX_BLOCK else BWD_REREAD_MAX_BLOCK


def bwd_register_block(aligned):
    """Largest backward tile held in registers across its reduction: BWD_MAX_BLOCK, halved for
    rows that are not 16-byte vectors."""
    return BWD_MAX_BLOCK if aligned else BWD_MAX_BLOCK // 2


def bwd_rereads(tile, aligned):
    """Whether the backward's whole-row tile of `tile` elements is read again after its
    reduction: past bwd_register_block."""
    return tile > bwd_register_block(aligned)


def bwd_halves(tile, aligned):
    """Column halves of a backward tile (each with its own dW accumulator): 2 past twice
    bwd_register_block, else 1."""
    return 2 if tile > 2 * bwd_register_block(aligned) else 1


def bwd_programs_per_sm(num_warps, reread=False):
    """Programs per SM of a persistent backward grid of num_warps-warp programs; one for tiles
    read twice (bwd_rereads: 100-128 registers per thread over 16 warps, one program fits)."""
    return 1 if reread else max(1, BWD_WARPS_PER_SM // num_warps)


class WholeRowTile(NamedTuple):
    """A launch of the backward's whole-row kernel: how it reads its tiles (its REREAD, HALVES,
    EVEN) and its persistent grid."""

    reread: bool  # read again after the rows' reduction (bwd_rereads)
    halves: int  # column halves with a dW (dB) accumulator each (bwd_halves)
    even: bool  # tiles read twice that cover the rows exactly: no masks
    row_blocks: int  # tiles of block_m rows
    programs: int  # persistent programs (each writes one partial dW / dB row)


def whole_row_tile(device, rows, n, block_m, block_n, aligned, num_warps):
    """The WholeRowTile of a backward launch of [block_m, block_n] tiles over [rows, n]."""
    tile = block_m * block_n
    reread = bwd_rereads(tile, aligned)
    even = reread and n == block_n and rows % block_m == 0
    row_blocks = triton.cdiv(rows, block_m)
    programs = persistent_programs(device, row_blocks, bwd_programs_per_sm(num_warps, reread))
    return WholeRowTile(reread, bwd_halves(tile, aligned), even, row_blocks, programs)


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
def rsqrt_rn(v, ACC: tl.constexpr):
    """1 / sqrt(v), square root and division each rounded to nearest. tl.rsqrt compiles to
    rsqrt.approx.ftz.f32, which flushes a subnormal v to 0: with eps=0, a row of 1e-20s (mean
    square 1e-40) would get rstd = inf where torch gives 1e20. Once per row: no cost."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)  # fp64 sqrt and division are IEEE
    else:
        return tl.div_rn(tl.full(v.shape, 1.0, ACC), tl.sqrt_rn(v))


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


# How load_row reads a tile: the program's only read of it, or the first or second of two reads
# of a tile read again after its rows' reduction. The L1 eviction hints of the two keep the tile
# cached for its second read and let it go after; that the two loads differ also keeps the
# compiler from merging them (and holding the first one's registers across the reduction).
READ_ONCE = tl.constexpr(0)
READ_FIRST = tl.constexpr(1)
READ_SECOND = tl.constexpr(2)


@triton.jit
def load_row(PTR, offs, mask, ACC: tl.constexpr, READ: tl.constexpr, EVEN: tl.constexpr):
    """A tile of rows in ACC, read as READ says; EVEN: every element exists (no mask)."""
    policy: tl.constexpr = (
        "evict_last" if READ == READ_FIRST else "evict_first" if READ == READ_SECOND else ""
    )
    if EVEN:
        v = tl.load(PTR + offs, eviction_policy=policy)
    else:
        v = tl.load(PTR + offs, mask=mask, other=0.0, eviction_policy=policy)
    return v.to(ACC)


@triton.jit
def held_weight(W, cols, cmask, HAS_W: tl.constexpr, ACC: tl.constexpr, REREAD: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """The weight a backward program holds for all its rows; zeros (unused) without a weight or
    when REREAD (bwd_terms reads it with each row)."""
    w = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_W and not REREAD:
        w = load_row(W, cols, cmask, ACC, READ_ONCE, False)
    return w


@triton.jit
def bwd_terms(X, DY, W, w, offs, mask, cols, cmask, mean, rstd, CENTERED: tl.constexpr,
              HAS_W: tl.constexpr, ACC: tl.constexpr, REREAD: tl.constexpr,
              EVEN: tl.constexpr, AGAIN: tl.constexpr):  # fmt: skip
    """(dy, xhat, g = dy * w) of a row tile, xhat = (x - mean) * rstd when CENTERED (LayerNorm:
    0 past the rows), else x * rstd (mean unused); w is the weight held by the program, or read
    here with the rows when REREAD (AGAIN: for the second time)."""
    read: tl.constexpr = (READ_SECOND if AGAIN else READ_FIRST) if REREAD else READ_ONCE
    dy = load_row(DY, offs, mask, ACC, read, EVEN)
    x = load_row(X, offs, mask, ACC, read, EVEN)
    if CENTERED:
        xhat = (x - mean[:, None]) * rstd[:, None]
        if not EVEN:
            xhat = tl.where(mask, xhat, 0.0)
    else:
        xhat = x * rstd[:, None]
    g = dy
    if HAS_W:
        if REREAD:
            w = load_row(W, cols, cmask, ACC, read, EVEN)
        g = dy * w[None, :]
    return dy, xhat, g


@triton.jit
def store_dx(DX, DRES, offs, mask, dx, HAS_DRES: tl.constexpr, ACC: tl.constexpr,
             EVEN: tl.constexpr):  # fmt: skip
    """Stores dx of a row tile, plus the gradient into residual_out when HAS_DRES."""
    if HAS_DRES:
        dx += load_row(DRES, offs, mask, ACC, READ_ONCE, EVEN)
    if EVEN:
        tl.store(DX + offs, dx.to(DX.dtype.element_ty))
    else:
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


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
            tile = whole_row_tile(x.device, rows, n, block_m, block_n, aligned, num_warps)
            p = tile.programs
            part = torch.empty((p, n), dtype=acc, device=x.device) if has_w else None
            _rms_bwd_kernel[(p,)](
                dy, dres, xc, w, rs, dx.buf, part, rows, n, tile.row_blocks,
                BLOCK_M=block_m, BLOCK_N=block_n // tile.halves, HALVES=tile.halves,
                REREAD=tile.reread, EVEN=tile.even, num_warps=num_warps, **flags,
            )  # fmt: skip
        else:
            c = torch.empty(rows, dtype=acc, device=x.device)
            _rms_rowdot_kernel[(rows,)](
                dy, xc, w, rs, c, n, HAS_W=has_w, ACC=flags["ACC"], BLOCK_N=block_n,
                num_warps=num_warps,
            )  # fmt: skip
            col_blocks = triton.cdiv(n, block_n)
            g = persistent_programs(
                x.device, rows, bwd_programs_per_sm(num_warps), share=col_blocks
            )
            part = torch.empty((g, n), dtype=acc, device=x.device) if has_w else None
            _rms_bwd_cols_kernel[(col_blocks, g)](
                dy, dres, xc, w, rs, c, dx.buf, part, rows, n,
                BLOCK_N=block_n, num_warps=num_warps, **flags,
            )  # fmt: skip
        dw = reduce_partials(part, weight) if has_w else x.new_empty(0)
    return dx.finish(), dw
