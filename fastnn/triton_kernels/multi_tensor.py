"""Multi-tensor launch machinery shared by the Triton optimizer kernels (adam.py, rmsprop.py).

One launch per (device, dtype signature) group: the host splits every tensor into chunks of
`chunk` elements and writes one int64 row per chunk into a table, [n_chunks, 8]: the byte
addresses of param, grad and each state tensor advanced to the chunk's first element, the
chunk's element count and the tensor's index in the lists. Program i reads row i, turns the
addresses back into typed pointers and updates its chunk in tiles of BLOCK elements. So a step
over hundreds of tensors is one launch, and no per-tensor Python work reaches the GPU. The table
depends only on addresses and sizes, so it is cached (LRU): in steady training the parameters,
states and (usually) gradients keep their addresses and no table is copied to the device; that
also makes step() capturable in a CUDA graph once a warm-up step has built the table.

Here: the host side (argument checks, flat views, the cached table, dtype groups, the launch)
and the @triton.jit pieces every op's kernel uses (its table row, the step scalars, the weight and
gradient loads, IEEE-rounded div / sqrt: no approximate instructions). Each op's file keeps its
kernel, its tile loop and its update math.
"""

import collections
import os

import torch
import triton
import triton.language as tl

from fastnn.optim._common import grad_dtype_ok, is_dense
from fastnn.triton_kernels import device_context

TABLE_COLS = 8  # six addresses, chunk numel, tensor index

_TRITON_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def check_lists(name, params, grads, *lists):
    """Errors for lists the kernels cannot take. Returns None when there is nothing to update
    (no params, or only zero-size ones), else (compute dtype, device, indices of the non-empty
    params).

    lists: (name for errors, list) pairs of per-param tensors, [] for a list the op leaves out;
    their lengths are checked before (fastnn.reference.adam.check_list_lengths)."""
    if not params:
        return None
    device = params[0].device
    if device.type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter copies tensor arguments to the host, but the launch table holds raw
        # device addresses, which the host cannot read.
        raise RuntimeError(
            f"fastnn.{name}: the Triton multi-tensor kernels run on {device.type} tensors only "
            "compiled; unset TRITON_INTERPRET (the interpreter runs them on CPU tensors)"
        )
    for i, p in enumerate(params):
        tensors = [("param", p), ("grad", grads[i])] + [(w, lst[i]) for w, lst in lists if lst]
        for what, t in tensors:
            if t.dtype not in _TRITON_DTYPE:
                raise TypeError(f"fastnn.{name}: {what} {i} has unsupported dtype {t.dtype}")
            if t.device != device:
                raise ValueError(f"fastnn.{name}: {what} {i} is on {t.device}, params on {device}")
            if t.shape != p.shape:
                raise ValueError(
                    f"fastnn.{name}: {what} {i} has shape {tuple(t.shape)}, param {tuple(p.shape)}"
                )
        if not grad_dtype_ok(grads[i].dtype, p.dtype):
            raise TypeError(
                f"fastnn.{name}: grad {i} is {grads[i].dtype} but param {i} is {p.dtype}; a grad "
                "must have its param's dtype, or float32 for a float16 / bfloat16 param"
            )
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return None
    cdt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return cdt, device, live


def flat_views(tensors, mutable):
    """Tensors the kernel can walk as flat memory, element i of each matching element i of the
    others. Already true when all are dense (no gaps, no overlap) with equal strides, e.g. a
    transposed or channels_last param with its preserve_format state and grad; otherwise the
    kernel works on contiguous copies. Returns (views, [(original, copy)] to write back)."""
    if all(t.is_contiguous() for t in tensors):
        return list(tensors), []
    first = tensors[0]
    if is_dense(first) and all(t.stride() == first.stride() for t in tensors):
        return list(tensors), []
    views, write_back = [], []
    for t, is_mutable in zip(tensors, mutable, strict=True):
        c = t.contiguous()
        views.append(c)
        if is_mutable and c is not t:
            write_back.append((t, c))
    return views, write_back


_TABLES = collections.OrderedDict()
_TABLES_MAX = 64  # distinct (address set) tables kept; an optimizer normally needs one per group
# A CUDA graph being captured gets tables of its own, outside the cache: a cached table lives in
# the general pool, where eviction would free it under the graph, and a table built in a capture
# is only filled when the graph replays. Built in the capture, the device table comes from the
# graph's private pool, held for the graph's life (reuse within the capture is stream-ordered),
# so it needs no keeping; the pinned host buffer its copy reads at each replay is kept for the
# process (torch 2.14's pinned allocator never recycles a block a capture used; older ones might).
_CAPTURED_HOST_BUFFERS = []


def chunk_table(addrs, elem_sizes, numels, indices, device, chunk):
    """The int64 [n_chunks, 8] launch table on `device` (see the module docstring), and whether
    all its addresses are 16-byte aligned.

    addrs: one list of 6 byte addresses per tensor (0 where the kernel reads none),
    elem_sizes: the 6 element sizes in bytes, numels: elements per tensor (all > 0),
    indices: each tensor's index in the op's lists."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # The element sizes place every chunk after the first (the same memory viewed as another
    # dtype needs its own table), and a table serves the stream it was uploaded on only: a
    # launch on another stream could run before the upload, or after its eviction freed it.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, chunk, tuple(map(tuple, addrs)), tuple(elem_sizes), tuple(numels),
           tuple(indices))  # fmt: skip
    hit = None if capturing else _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[0], hit[2]
    a = torch.tensor(addrs, dtype=torch.int64)
    # 16-byte vector accesses when every address (and so every chunk start) is 16-byte aligned.
    is_aligned = bool((a % 16 == 0).all()) and all(chunk * s % 16 == 0 for s in elem_sizes)
    n = torch.tensor(numels, dtype=torch.int64)
    chunks = (n + chunk - 1) // chunk
    owner = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    first = torch.cumsum(chunks, 0) - chunks
    start = (torch.arange(owner.numel()) - first[owner]) * chunk
    base = a[owner]
    rows = base + start[:, None] * torch.tensor(elem_sizes, dtype=torch.int64)[None, :]
    rows = torch.where(base != 0, rows, 0)
    count = torch.clamp(n[owner] - start, max=chunk)
    index = torch.tensor(indices, dtype=torch.int64)[owner]
    host = torch.cat([rows, count[:, None], index[:, None]], 1).contiguous()
    if device.type == "cpu":
        table = host
    else:
        # Pinned and non-blocking: no host sync. The pinned buffer is kept with the table, so
        # a CUDA graph that captured this copy never reads freed host memory.
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    if capturing:
        _CAPTURED_HOST_BUFFERS.append(host)
        return table, is_aligned
    _TABLES[key] = (table, host, is_aligned)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, is_aligned


def on_device(t, device):
    """t (a scalar tensor or None) on `device`, copied without a host sync if needed."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def dtype_groups(n, lists):
    """Indices 0..n-1 grouped by the dtypes of lists[k][i] (a launch specialises on them)."""
    kinds = [{t.dtype for t in lst} if lst else {None} for lst in lists]
    if all(len(k) == 1 for k in kinds):  # the usual case: one launch
        return {tuple(next(iter(k)) for k in kinds): list(range(n))}
    out = collections.defaultdict(list)
    for i in range(n):
        out[tuple(lst[i].dtype if lst else None for lst in lists)].append(i)
    return out


def triton_dtype(dtype):
    return _TRITON_DTYPE[dtype] if dtype is not None else tl.float32


@triton.jit
def div_ieee(a, b, CDT: tl.constexpr):
    """a / b rounded to nearest (fp32 `/` in Triton is the approximate div.full.f32)."""
    if CDT == tl.float64:
        return a / b  # fp64 division is always IEEE
    else:
        return tl.div_rn(a, b)


@triton.jit
def lerp(start, end, weight):
    """torch's lerp(start, end, weight) for a scalar weight, in its two forms (one multiply-add
    each, as csrc/include/fastnn/adam_math.h's lerp_): start + weight (end - start) for
    |weight| < 0.5, else end - (1 - weight) (end - start), which is end exactly at weight 1
    (beta1 = 0 gives exp_avg = grad, as torch's does; the first form alone was an ulp off)."""
    small = (weight < 0.5) & (weight > -0.5)  # a scalar: one select per element, no branch
    return tl.fma(tl.where(small, weight, weight - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def sqrt_ieee(x, CDT: tl.constexpr):
    if CDT == tl.float64:
        return tl.sqrt(x)  # fp64 sqrt is always IEEE
    else:
        return tl.sqrt_rn(x)


@triton.jit
def load_weight_grad(
    offs, mask, p_ptr, g_ptr, w_ptr, scale, G_T: tl.constexpr, CDT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """A tile's weights (from the master copy when there is one) and its gradient, unscaled
    and negated for maximize, in CDT. With a grad_scale the unscaled gradient is also written
    back (as torch's fused Adam leaves .grad; `mask` is off when found_inf is set)."""
    if HAS_MASTER:
        w = tl.load(w_ptr + offs, mask=mask).to(CDT)
    else:
        w = tl.load(p_ptr + offs, mask=mask).to(CDT)
    g = tl.load(g_ptr + offs, mask=mask).to(CDT)
    if HAS_SCALE:
        g = div_ieee(g, scale, CDT)
        tl.store(g_ptr + offs, g.to(G_T), mask=mask)
    if MAXIMIZE:
        g = -g
    return w, g


@triton.jit
def store_weight(
    offs, mask, p_ptr, w_ptr, w, P_T: tl.constexpr, W_T: tl.constexpr, HAS_MASTER: tl.constexpr
):
    """The updated weights to the master copy (when there is one) and the param."""
    if HAS_MASTER:
        tl.store(w_ptr + offs, w.to(W_T), mask=mask)
    tl.store(p_ptr + offs, w.to(P_T), mask=mask)


@triton.jit
def chunk_pointers(
    table, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
    T4: tl.constexpr, T5: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """This program's table row: the six column pointers typed T0..T5, the chunk's element
    count and its tensor's index. With ALIGNED every address is a multiple of 16 (an absent
    column's 0 too; the hint on a pointer the kernel never reads generates nothing)."""
    row = table + tl.program_id(0).to(tl.int64) * 8
    ptr0 = tl.load(row + 0).to(tl.pointer_type(T0))
    ptr1 = tl.load(row + 1).to(tl.pointer_type(T1))
    ptr2 = tl.load(row + 2).to(tl.pointer_type(T2))
    ptr3 = tl.load(row + 3).to(tl.pointer_type(T3))
    ptr4 = tl.load(row + 4).to(tl.pointer_type(T4))
    ptr5 = tl.load(row + 5).to(tl.pointer_type(T5))
    if ALIGNED:
        ptr0 = tl.multiple_of(ptr0, 16)
        ptr1 = tl.multiple_of(ptr1, 16)
        ptr2 = tl.multiple_of(ptr2, 16)
        ptr3 = tl.multiple_of(ptr3, 16)
        ptr4 = tl.multiple_of(ptr4, 16)
        ptr5 = tl.multiple_of(ptr5, 16)
    return ptr0, ptr1, ptr2, ptr3, ptr4, ptr5, tl.load(row + 6), tl.load(row + 7)


@triton.jit
def step_scalars(
    lr_ptr, scale_ptr, inf_ptr, lr, CDT: tl.constexpr, HAS_LR_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """(lr, grad scale, tile mask) of this step: lr from lr_ptr when given, the scale 1 when
    there is none (the kernels then never read it)."""
    if HAS_LR_PTR:
        lr_v = tl.load(lr_ptr).to(CDT)
    else:
        lr_v = tl.full((), lr, CDT)
    # Full tiles need no bounds mask, so their accesses vectorise; `live` is all false when
    # found_inf is set (nothing read, nothing written).
    live = tl.full([BLOCK], 1, tl.int1)
    if HAS_INF:
        # A splat compared with a scalar: the mask stays uniform over the tile, so accesses
        # still vectorise (and `int1 & scalar bool` trips the interpreter). NaN skips too.
        live = tl.zeros([BLOCK], tl.float32) == tl.load(inf_ptr).to(tl.float32)
    scale = tl.full((), 1.0, CDT)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(CDT)
    return lr_v, scale, live


def launch(
    kernel, plan, lists, mutable, lr_tensor, grad_scale, found_inf, args, type_names, constexprs,
    chunk, block, num_warps,
):  # fmt: skip
    """Launch `kernel` once per dtype signature over the non-empty params of `plan` (what
    check_lists returned).

    lists: the 6 per-param tensor lists in table column order ([] where the op reads none; the
    params first, the master params last), mutable: whether the kernel writes each.
    lr_tensor, grad_scale, found_inf: 0-d tensors or None, passed after the table (copied to
    the params' device without a host sync if needed). args: the kernel's other arguments.
    type_names: the kernel's 6 dtype constexprs, in column order. constexprs: the op's own
    constexprs (CDT, HAS_LR_PTR, HAS_SCALE, HAS_INF, HAS_MASTER, ALIGNED and BLOCK are added
    here). Tensors the kernel cannot walk as flat memory go through contiguous copies, written
    back after the launches."""
    cdt, device, live = plan
    lr_ptr = on_device(lr_tensor, device)
    scale = on_device(grad_scale, device)
    inf = on_device(found_inf, device)
    write_back, flat = [], []
    for i in live:
        present = [(k, lst[i]) for k, lst in enumerate(lists) if lst]
        views, wb = flat_views([t for _, t in present], [mutable[k] for k, _ in present])
        write_back += wb
        row = [None] * 6
        for (k, _), v in zip(present, views, strict=True):
            row[k] = v
        flat.append(row)
    groups = dtype_groups(len(live), [[r[k] for r in flat] if lists[k] else [] for k in range(6)])
    with device_context(lists[0][live[0]]):
        for sig, idx in groups.items():
            addrs = [[t.data_ptr() if t is not None else 0 for t in flat[j]] for j in idx]
            sizes = [d.itemsize if d else 4 for d in sig]
            numels = [flat[j][0].numel() for j in idx]
            table, is_aligned = chunk_table(addrs, sizes, numels, idx, device, chunk)
            types = {name: triton_dtype(d) for name, d in zip(type_names, sig, strict=True)}
            kernel[(table.shape[0],)](
                table,
                lr_ptr,
                scale,
                inf,
                *args,
                **types,
                CDT=triton_dtype(cdt),
                HAS_LR_PTR=lr_ptr is not None,
                HAS_SCALE=scale is not None,
                HAS_INF=inf is not None,
                HAS_MASTER=bool(lists[5]),
                **constexprs,
                ALIGNED=is_aligned,
                BLOCK=block,
                num_warps=num_warps,
                # Every multiply-add torch rounds once is a tl.fma; the rest round as torch's
                # separate ops do (RMSprop's buf.mul_(momentum) before its addcdiv_).
                enable_fp_fusion=False,
            )
    for original, copy in write_back:
        original.copy_(copy)
