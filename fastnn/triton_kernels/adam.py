"""Triton multi-tensor Adam / AdamW update (`fastnn::triton_adam_step_`), and the multi-tensor
launch helpers the RMSprop kernel shares.

Multi-tensor apply, one launch per (device, dtype signature) group: the host splits every tensor
into chunks of CHUNK elements and writes one int64 row per chunk into a table, [n_chunks, 8]:
the byte addresses of param, grad and each state tensor advanced to the chunk's first element,
the chunk's element count and the tensor's index in the lists. Program i reads row i, turns the
addresses back into typed pointers and updates its chunk in tiles of BLOCK elements. So a step
over hundreds of tensors is one launch, and no per-tensor Python work reaches the GPU. The table
depends only on addresses and sizes, so it is cached (LRU): in steady training the parameters,
states and (usually) gradients keep their addresses and no table is copied to the device; that
also makes step() capturable in a CUDA graph once a warm-up step has built the table.

Math in fp32 (fp64 for fp64 params) with IEEE sqrt and division (tl.sqrt_rn, tl.div_rn: no
approximate instructions). grad_scale, found_inf and lr_tensor are read on the device; with
found_inf != 0 every load and store is masked off, so nothing is written. Bias corrections come
from the step tensors with torch ops on the steps' own device (the host for plain optimizers, no
sync; the GPU when capturable), as one small [n, 2] tensor the kernel indexes per chunk.
"""

import collections
import os

import torch
import triton
import triton.language as tl

# 64K elements per program: about 16K programs for 1e9 parameters, and a table of 1 MB. BLOCK
# elements per tile: 1024 fp32 over 4 warps is 8 per thread, two 16-byte accesses.
CHUNK = 65536
BLOCK = 1024
NUM_WARPS = 4
TABLE_COLS = 8  # six addresses, chunk numel, tensor index

_TRITON_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


# ---- Shared launch helpers (RMSprop uses them too) ------------------------------------------


def check_lists(name, params, grads, *lists):
    """Errors for lists the kernels cannot take; returns the compute dtype."""
    for what, lst in lists:
        if lst and len(lst) != len(params):
            raise ValueError(f"fastnn.{name}: {what} has {len(lst)} tensors, params {len(params)}")
    if len(grads) != len(params):
        raise ValueError(f"fastnn.{name}: grads has {len(grads)} tensors, params {len(params)}")
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
    return torch.float64 if params[0].dtype == torch.float64 else torch.float32


def _dense(t):
    """No gaps and no overlap: sorted by stride, each stride is the product of the sizes below."""
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_views(tensors, mutable):
    """Tensors the kernel can walk as flat memory, element i of each matching element i of the
    others. Already true when all are dense (no gaps, no overlap) with equal strides, e.g. a
    transposed or channels_last param with its preserve_format state and grad; otherwise the
    kernel works on contiguous copies. Returns (views, [(original, copy)] to write back)."""
    if all(t.is_contiguous() for t in tensors):
        return list(tensors), []
    first = tensors[0]
    if _dense(first) and all(t.stride() == first.stride() for t in tensors):
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


def chunk_table(addrs, elem_sizes, numels, indices, device, chunk):
    """The int64 [n_chunks, 8] launch table on `device` (see the module docstring), and whether
    all its addresses are 16-byte aligned.

    addrs: one list of 6 byte addresses per tensor (0 where the kernel reads none),
    elem_sizes: the 6 element sizes in bytes, numels: elements per tensor (all > 0),
    indices: each tensor's index in the op's lists."""
    key = (device, chunk, tuple(map(tuple, addrs)), tuple(numels), tuple(indices))
    hit = _TABLES.get(key)
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
        # Pinned and non-blocking: no host sync. The pinned buffer stays in the cache with the
        # table, so a CUDA graph that captured this copy never reads freed host memory.
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
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
def sqrt_ieee(x, CDT: tl.constexpr):
    if CDT == tl.float64:
        return tl.sqrt(x)  # fp64 sqrt is always IEEE
    else:
        return tl.sqrt_rn(x)


# ---- Adam ------------------------------------------------------------------------------------


@triton.jit
def _adam_tile(
    offs, mask, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
    step_size, bias_correction2_sqrt, decay, scale,
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    P_T: tl.constexpr, G_T: tl.constexpr, M_T: tl.constexpr, V_T: tl.constexpr,
    VMAX_T: tl.constexpr, W_T: tl.constexpr, CDT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK elements: weights from the master copy when there is one."""
    if HAS_MASTER:
        w = tl.load(w_ptr + offs, mask=mask).to(CDT)
    else:
        w = tl.load(p_ptr + offs, mask=mask).to(CDT)
    g = tl.load(g_ptr + offs, mask=mask).to(CDT)
    m = tl.load(m_ptr + offs, mask=mask).to(CDT)
    v = tl.load(v_ptr + offs, mask=mask).to(CDT)
    if HAS_SCALE:
        g = div_ieee(g, scale, CDT)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = g + weight_decay * w
    # torch.optim.Adam's order: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(CDT)
        vmax = tl.maximum(vmax, v)
        tl.store(vmax_ptr + offs, vmax.to(VMAX_T), mask=mask)
        denom = div_ieee(sqrt_ieee(vmax, CDT), bias_correction2_sqrt, CDT) + eps
    else:
        denom = div_ieee(sqrt_ieee(v, CDT), bias_correction2_sqrt, CDT) + eps
    w = w - step_size * div_ieee(m, denom, CDT)
    tl.store(m_ptr + offs, m.to(M_T), mask=mask)
    tl.store(v_ptr + offs, v.to(V_T), mask=mask)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w.to(W_T), mask=mask)
    tl.store(p_ptr + offs, w.to(P_T), mask=mask)


@triton.jit
def _adam_body(
    table,
    bias_corr,
    lr_ptr,
    scale_ptr,
    inf_ptr,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    P_T: tl.constexpr,
    G_T: tl.constexpr,
    M_T: tl.constexpr,
    V_T: tl.constexpr,
    VMAX_T: tl.constexpr,
    W_T: tl.constexpr,
    CDT: tl.constexpr,
    HAS_LR_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = table + tl.program_id(0).to(tl.int64) * 8
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_T))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_T))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(M_T))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(V_T))
    vmax_ptr = tl.load(row + 4).to(tl.pointer_type(VMAX_T))
    w_ptr = tl.load(row + 5).to(tl.pointer_type(W_T))
    n = tl.load(row + 6)
    t = tl.load(row + 7)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        if AMSGRAD:
            vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        if HAS_MASTER:
            w_ptr = tl.multiple_of(w_ptr, 16)

    bias_correction1 = tl.load(bias_corr + 2 * t).to(CDT)
    bias_correction2_sqrt = tl.load(bias_corr + 2 * t + 1).to(CDT)
    if HAS_LR_PTR:
        lr_v = tl.load(lr_ptr).to(CDT)
    else:
        lr_v = tl.full((), lr, CDT)
    step_size = div_ieee(lr_v, bias_correction1, CDT)
    decay = 1.0 - lr_v * weight_decay
    # Full tiles need no bounds mask, so their accesses vectorise; `live` is all false when
    # found_inf is set (nothing read, nothing written).
    live = tl.full([BLOCK], 1, tl.int1)
    if HAS_INF:
        # A splat compared with a scalar: the mask stays uniform over the tile, so accesses
        # still vectorise (and `int1 & scalar bool` trips the interpreter). NaN skips too.
        live = tl.zeros([BLOCK], tl.float32) == tl.load(inf_ptr).to(tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(CDT)
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _adam_tile(
            offs, live, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
            step_size, bias_correction2_sqrt, decay, scale,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            P_T, G_T, M_T, V_T, VMAX_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE,
        )  # fmt: skip
    if n_full < n:
        offs = n_full + tl.arange(0, BLOCK)
        _adam_tile(
            offs, live & (offs < n), p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
            step_size, bias_correction2_sqrt, decay, scale,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            P_T, G_T, M_T, V_T, VMAX_T, W_T, CDT,
            HAS_SCALE, HAS_MASTER, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE,
        )  # fmt: skip


# Two entry points so the scalar hyperparameters arrive in the compute dtype: fp32 for fp32 /
# fp16 / bf16 params, fp64 for fp64 params (an fp32 beta2 = 0.999 is off by 5e-8 relative).
@triton.jit
def _adam_f32(
    table, bias_corr, lr_ptr, scale_ptr, inf_ptr,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    P_T: tl.constexpr, G_T: tl.constexpr, M_T: tl.constexpr, V_T: tl.constexpr,
    VMAX_T: tl.constexpr, W_T: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _adam_body(
        table, bias_corr, lr_ptr, scale_ptr, inf_ptr,
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
        P_T, G_T, M_T, V_T, VMAX_T, W_T, tl.float32, HAS_LR_PTR, HAS_SCALE, HAS_INF, HAS_MASTER,
        HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, ALIGNED, BLOCK,
    )  # fmt: skip


@triton.jit
def _adam_f64(
    table, bias_corr, lr_ptr, scale_ptr, inf_ptr,
    lr: tl.float64, beta1: tl.float64, one_minus_beta1: tl.float64, beta2: tl.float64,
    one_minus_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    P_T: tl.constexpr, G_T: tl.constexpr, M_T: tl.constexpr, V_T: tl.constexpr,
    VMAX_T: tl.constexpr, W_T: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _adam_body(
        table, bias_corr, lr_ptr, scale_ptr, inf_ptr,
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
        P_T, G_T, M_T, V_T, VMAX_T, W_T, tl.float64, HAS_LR_PTR, HAS_SCALE, HAS_INF, HAS_MASTER,
        HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, ALIGNED, BLOCK,
    )  # fmt: skip


def bias_corrections(steps, beta1, beta2, device, dtype):
    """[n, 2] tensor (1 - beta1^t, sqrt(1 - beta2^t)) per step tensor t, on `device`. Computed
    where the steps live: fp64 on the host, as torch.optim's for-loop does with Python floats;
    in the steps' dtype on the GPU, as its capturable path does."""
    s = torch.stack(steps if all(x.dim() == 0 for x in steps) else [x.reshape(()) for x in steps])
    if s.device.type == "cpu":
        s = s.double()
    bc = torch.stack([1 - torch.pow(beta1, s), (1 - torch.pow(beta2, s)).sqrt()], 1)
    return bc.to(device=device, dtype=dtype, non_blocking=True).contiguous()


def adam_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    master_params,
    lr_tensor,
    grad_scale,
    found_inf,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
):
    """In-place Adam / AdamW update of lists of same-device tensors (schema `adam_step_`).

    params, grads, exp_avgs, exp_avg_sqs: same shapes; fp32 / fp16 / bf16 / fp64 (states may be
    fp32 for low-precision params). max_exp_avg_sqs: when amsgrad, else []. steps: 0-d step
    counts, already incremented. master_params: fp32 copies of the params (or [])."""
    if amsgrad and len(max_exp_avg_sqs) != len(params):
        raise ValueError("fastnn.adam_step_: amsgrad needs one max_exp_avg_sq per param")
    if len(steps) != len(params) or len(exp_avgs) != len(params):
        raise ValueError("fastnn.adam_step_: steps and exp_avgs need one tensor per param")
    cdt = check_lists(
        "adam_step_",
        params,
        grads,
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("max_exp_avg_sqs", max_exp_avg_sqs if amsgrad else []),
        ("master_params", master_params),
    )
    if cdt is None:
        return
    device = params[0].device
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    vmaxs = max_exp_avg_sqs if amsgrad else []
    bc = bias_corrections([steps[i] for i in live], beta1, beta2, device, cdt)
    lr_ptr = on_device(lr_tensor, device)
    scale = on_device(grad_scale, device)
    inf = on_device(found_inf, device)
    # Tensors in kernel order; None where absent. The kernel reads the master copy (when
    # given) as the weights and writes both it and the low-precision param.
    lists = [params, grads, exp_avgs, exp_avg_sqs, vmaxs, master_params]
    mutable = [True, False, True, True, True, True]
    write_back, flat = [], []
    for i in live:
        present = [(k, lst[i]) for k, lst in enumerate(lists) if lst]
        views, wb = flat_views([t for _, t in present], [mutable[k] for k, _ in present])
        write_back += wb
        row = [None] * 6
        for (k, _), v in zip(present, views, strict=True):
            row[k] = v
        flat.append(row)
    kernel = _adam_f64 if cdt == torch.float64 else _adam_f32
    groups = dtype_groups(len(live), [[r[k] for r in flat] if lists[k] else [] for k in range(6)])
    for sig, idx in groups.items():
        addrs = [[t.data_ptr() if t is not None else 0 for t in flat[j]] for j in idx]
        sizes = [d.itemsize if d else 4 for d in sig]
        numels = [flat[j][0].numel() for j in idx]
        table, is_aligned = chunk_table(addrs, sizes, numels, idx, device, CHUNK)
        kernel[(table.shape[0],)](
            table,
            bc,
            lr_ptr,
            scale,
            inf,
            float(lr),
            float(beta1),
            1.0 - float(beta1),
            float(beta2),
            1.0 - float(beta2),
            float(eps),
            float(weight_decay),
            P_T=triton_dtype(sig[0]),
            G_T=triton_dtype(sig[1]),
            M_T=triton_dtype(sig[2]),
            V_T=triton_dtype(sig[3]),
            VMAX_T=triton_dtype(sig[4]),
            W_T=triton_dtype(sig[5]),
            HAS_LR_PTR=lr_ptr is not None,
            HAS_SCALE=scale is not None,
            HAS_INF=inf is not None,
            HAS_MASTER=bool(master_params),
            HAS_WD=weight_decay != 0,
            DECOUPLED=bool(decoupled_weight_decay),
            AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
            ALIGNED=is_aligned,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    for original, copy in write_back:
        original.copy_(copy)
