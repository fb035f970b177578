"""What fastnn/triton_kernels/rms_norm.py and layer_norm.py share: launch shapes, input checks,
output allocation, program counts, the partial-sum reduction and the kernel pieces both norms'
kernels are built from (row loads, backward terms, dx stores).

Layout of the work (launch shapes: FWD and BWD, below):
- forward, rows up to FWD_MAX_BYTES (64 KB; half for unaligned rows, below): one
  [BLOCK_M, BLOCK_N] tile of rows per program, the rows kept in registers between the sum of
  squares and the scaling (one read of x);
- forward, longer rows: a persistent grid, each program looping over its rows' column blocks
  twice (the second read of a row hits L2 while few enough rows are in flight: a 64K bf16 row is
  128 KB); but RMSNorm's 16-bit rows of exactly FWD_REREAD_BLOCK without a residual are one tile
  per program, read a second time after the reduction (rms_norm.rms_fwd_rereads);
- backward, N <= BWD_MAX_BLOCK (half for unaligned rows): a persistent grid of P programs,
  each looping over row tiles and summing dW for its rows in fp32 registers, one [P, N]
  partial write;
- backward, 16-bit rows up to BWD_REREAD_MAX_BLOCK and of exactly twice that (RMSNorm;
  LayerNorm: of exactly BWD_REREAD_MAX_BLOCK): the same, but each tile is read again after its
  reduction (an L1 or L2 hit, not measured: the program read it just before) instead of held in
  registers across it, where only the dW (dB) accumulators stay; the longer rows in two column
  halves with an accumulator each (rms_norm.rms_bwd_max_block, layer_norm.ln_bwd_max_block,
  bwd_rereads, bwd_halves);
- backward, larger N: a row-dot kernel (sum(g * xhat) per row), then a [column block, row
  group] grid that writes dx and a [G, N] partial;
- no loop is software-pipelined (num_stages=1): on an H100 (bf16, 32768 rows, N = 1K-64K, both
  norms) two stages never beat one by more than 0.5% of copy and lost up to 6% (the LayerNorm
  forward at 64K: 63% against 69%);
- P programs per SM as asked (BWD_WARPS_PER_SM), or as many as fit where fewer do, by the
  compiled kernel's registers (resident_programs);
- dW = a fixed-order column sum of the partials (reduce_partials): bitwise reproducible across
  runs on one device, since P depends only on the device, the shape and the compiled kernel;
- rows that cannot be loaded as 16-byte vectors (vector_aligned: N not a multiple of 16, or a
  pointer off a 16-byte boundary) cost an address register per element: their caps, column
  blocks, row tiles and elements per thread are half the others' (row_config).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Largest row held whole in registers. Forward: 64 KB of row, x and its fp32 copy per element
# (32K 16-bit elements over 32 warps is 32 per thread: 63 registers, no spills, ptxas of triton
# 3.8 for sm_90; 16K fp32 the same). Backward keeps x, dy and the fp32 dW accumulator: 8K
# elements over 32 warps is 8 of each per thread.
FWD_MAX_BYTES = 65536
BWD_MAX_BLOCK = 8192
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


# ---- helpers -------------------------------------------------------------------------------------


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


def persistent_programs(device, work, per_sm, share=1, resident=None):
    """Programs of a persistent grid: `per_sm` per SM on a GPU, or `resident` (what fits at once:
    resident_programs) where fewer, split over `share` grid columns, at most `work`. Under the
    interpreter (CPU) 4, so the partial-sum reduction is exercised with several partials while
    the grid stays small (about 1 ms per interpreted program)."""
    if device.type == "cuda":
        budget = _sm_count(_index(device)) * min(per_sm, resident or per_sm) // share
    else:
        budget = 4
    return max(1, min(work, budget))


# What one SM holds at once, sm_80 to sm_90: 64K registers, given to warps in units of 256, and
# at most 32 blocks, each with 1 KB of shared memory reserved (CUDA C programming guide).
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
MAX_BLOCKS_PER_SM = 32
SHARED_RESERVED_PER_BLOCK = 1024


def programs_that_fit(regs, num_warps, shared, max_threads, shared_per_sm):
    """Programs of a kernel (regs per thread, num_warps, shared bytes) resident on one SM at
    once, by registers, threads and shared memory."""
    warp_regs = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (warp_regs * num_warps)
    by_threads = max_threads // (32 * num_warps)
    by_shared = shared_per_sm // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_regs, by_threads, by_shared, MAX_BLOCKS_PER_SM)


def _variant(arg):
    """What of a launch argument picks the compiled variant, read cheaply: a tensor's dtype (a
    torch.dtype stands for a fresh tensor of it), an int's divisibility by 16, being 1 and
    needing 64 bits, None itself. Pointer alignment is the launcher's (vector_aligned): with
    every tensor's address read, the key of a backward's 10 arguments took 4.4 us to build, with
    this 2.2 us (2-core dev VM; a cached resident_programs call about 5 us in all)."""
    if isinstance(arg, int):
        return arg % 16 == 0, arg == 1, -(2**31) <= arg < 2**31
    return getattr(arg, "dtype", arg)


_RESIDENT = {}
_UNSEEN = object()


def resident_programs(kernel, device, args, kwargs, aligned):
    """Programs of `kernel` launched with (args, kwargs) that one SM of `device` holds at once,
    from the compiled kernel's registers and shared memory; None off CUDA or under the
    interpreter (nothing compiled). A torch.dtype in args stands for a tensor the launch
    allocates after this (its size may depend on the answer). `aligned`: the launcher's
    vector_aligned. Compiled once per variant: the warmup compiles what the launch then runs.

    A persistent grid asking for more programs per SM than fit runs the rest as a second wave
    at low occupancy. Under triton 3.6 (the GPU machines'; ptxas, sm_90,
    bench/kernel_resources.py) the LayerNorm backward with a residual fits 6-7 of the 8
    programs per SM it asks for: bf16 row tiles of N = 256-512 take 72-78 registers over 4
    warps, and its column kernels past 4K 80; fp32 row tiles of N = 4096 take 86-117 registers
    over 16 warps, one program of two."""
    if device.type != "cuda":
        return None
    index = _index(device)
    key = (kernel, index, aligned, *kwargs.values(), *map(_variant, args))
    fit = _RESIDENT.get(key, _UNSEEN)
    if fit is _UNSEEN:
        # None from the interpreter (on CUDA tensors too) and from a triton cache hook that
        # took the launch: nothing compiled to read.
        compiled, fit = kernel.warmup(*args, grid=(1,), **kwargs), None
        if compiled is not None:
            compiled._init_handles()  # loads the binary: n_regs is known from here
            props = torch.cuda.get_device_properties(index)
            fit = max(1, programs_that_fit(
                compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                props.max_threads_per_multi_processor, props.shared_memory_per_multiprocessor,
            ))  # fmt: skip
        _RESIDENT[key] = fit
    return fit


def fwd_max_block(input, *params):
    """Largest row (elements) the forward holds whole in registers: FWD_MAX_BYTES of the
    widest of the input and its parameters (None: absent). 32K bf16 rows with fp32 weight and
    bias spilled 168 B per thread in the LayerNorm forward; they take the looping tier."""
    return FWD_MAX_BYTES // max(t.dtype.itemsize for t in (input, *params) if t is not None)


def all_16bit(*tensors):
    """Whether every tensor (None: absent) has 16-bit elements: the tiers that read rows twice
    take only such rows (wider ones spilled)."""
    return all(t.element_size() <= 2 for t in tensors if t is not None)


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
    EVEN) and the programs per SM of its persistent grid (persistent_grid)."""

    reread: bool  # read again after the rows' reduction (bwd_rereads)
    halves: int  # column halves with a dW (dB) accumulator each (bwd_halves)
    even: bool  # tiles read twice that cover the rows exactly: no masks
    row_blocks: int  # tiles of block_m rows
    per_sm: int  # persistent programs per SM asked for (each writes one partial dW / dB row)


def whole_row_tile(rows, n, block_m, block_n, aligned, num_warps):
    """The WholeRowTile of a backward launch of [block_m, block_n] tiles over [rows, n]."""
    tile = block_m * block_n
    reread = bwd_rereads(tile, aligned)
    even = reread and n == block_n and rows % block_m == 0
    row_blocks = triton.cdiv(rows, block_m)
    per_sm = bwd_programs_per_sm(num_warps, reread)
    return WholeRowTile(reread, bwd_halves(tile, aligned), even, row_blocks, per_sm)


def persistent_grid(kernel, device, work, per_sm, args, kwargs, aligned, share=1):
    """persistent_programs for a launch of `kernel` with (args, kwargs), per_sm capped at the
    programs that fit on an SM at once (resident_programs)."""
    resident = resident_programs(kernel, device, args, kwargs, aligned)
    return persistent_programs(device, work, per_sm, share, resident=resident)


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
    total = tl.sum(acc, axis=0)
    if OUT.dtype.element_ty != tl.float64:
        # fp64 partials (fp64 input) of a 16-bit weight's gradient round through fp32, as torch
        # casts fp64 to 16 bits; the interpreter's direct fp64 -> bf16 cast gave 0, subnormals
        # or NaN (a no-op for fp32 partials)
        total = total.to(tl.float32)
    tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cmask)


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


# ---- kernel pieces -------------------------------------------------------------------------------


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
