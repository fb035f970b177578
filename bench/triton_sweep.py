"""Launch-config sweep of the Triton norm kernels: what each hidden size runs fastest with.

One call of a lent GPU machine times dozens of configs per case without a rebuild (Triton
compiles at first use), so the launchers' policies in fastnn/triton_kernels/norm_common.py
(row_config and persistent_programs: the FWD / BWD launch shapes and BWD_WARPS_PER_SM) can be set
from measurements afterwards, on any machine.

    python -m bench.triton_sweep [--budget-s 240] [--ops rms_norm,layer_norm] [--dirs bwd,fwd]
                                 [--n 1024,4096] [--rows 32768] [--out DIR]
    python -m bench.triton_sweep --check   # CPU, under TRITON_INTERPRET=1: every config computes
                                           # the norm (tests/test_triton_sweep.py runs it)
    python -m bench.triton_sweep --static  # no GPU: every config compiled for sm_90, its
                                           # registers, spills and programs per SM

Each config runs through the public launcher (rms_norm_fwd / _bwd, layer_norm_fwd / _bwd) with its
policy functions patched to return the config, so kernels, arguments and the dW / dB column sum are
exactly the launcher's. Before a config is timed its outputs, allocated as NaN, are compared with
those of the launcher's own choice (the `current` row); one that disagrees is reported, not timed.
Configs are compiled first in parallel worker processes (about 0.6 s a kernel, one at a time
otherwise).
Timing: CUDA events around `CALLS` back-to-back calls behind a GPU sleep (as bench/harness.py),
the median of `ROUNDS` rounds; GB/s by bench/test_norms.py's byte formula, % of the copy bandwidth
measured at the start of the run. Results, rewritten after every case: sweep.jsonl (every config)
and sweep.md (per case the current config before and after, the best and the runners-up) in --out.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import statistics
import sys
import time

# (op, direction, N) in the order they run: first the long rows, where the tiers that read rows
# twice (2026-11-27, not yet timed) replaced kernels at 57-76% of copy, then the other gaps to the
# targets.
CASES = [
    ("rms_norm", "bwd", 16384),
    ("rms_norm", "bwd", 32768),
    ("rms_norm", "fwd", 65536),
    ("layer_norm", "bwd", 16384),
    ("layer_norm", "bwd", 32768),
    *[(op, "bwd", n) for op in ("rms_norm", "layer_norm") for n in (1024, 4096, 8192)],
    *[(op, "fwd", n) for op in ("rms_norm", "layer_norm") for n in (32768, 1024)],
    ("layer_norm", "fwd", 65536),
    *[(op, "bwd", n) for op in ("rms_norm", "layer_norm") for n in (2048, 65536)],
]
ROUNDS, CALLS = 5, 5
EPS = {"rms_norm": 1e-6, "layer_norm": 1e-5}


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    single: bool  # whole rows in one tile; else column blocks of block_n
    num_warps: int
    per_sm: int | None = None  # programs per SM of a persistent grid (None: the launcher's)

    def label(self):
        tier = f"rows {self.block_m}x{self.block_n}" if self.single else f"cols {self.block_n}"
        per_sm = "" if self.per_sm is None else f", per_sm {self.per_sm}"
        return f"{tier}, {self.num_warps} warps{per_sm}"


def _pow2(n):
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Space:
    """The options candidates() combines."""

    tiles: tuple = (4096, 8192, 16384)  # elements of a whole-row tile (rows x next_pow2(N))
    loop_blocks: tuple = (4096, 8192, 16384)  # forward column blocks (rows above the tiles)
    col_blocks: tuple = (1024, 2048, 4096)  # backward column blocks (the row-dot path)
    # Elements per thread: forward x and its fp32 copy; backward x, dy, the dW accumulator.
    fwd_per_thread: tuple = (8, 64)
    bwd_per_thread: tuple = (4, 16)
    per_sm: tuple = (1, 2, 4, 8)  # persistent grids' programs per SM (64 warps at most)


GPU_SPACE = Space()
# Under the interpreter: small blocks so that N of a few hundred loops, any warps.
CHECK_SPACE = Space(
    tiles=(256,), loop_blocks=(64, 512), col_blocks=(64, 512), fwd_per_thread=(1, 64),
    bwd_per_thread=(1, 64), per_sm=(None,),
)  # fmt: skip


# The longest rows each launcher can take whole (those past the register-resident tiles read
# twice: rms_norm.rms_fwd_rereads and rms_bwd_max_block, layer_norm.ln_bwd_max_block); longer
# whole-row tiles spill hundreds of bytes per thread.
WHOLE_ROW_MAX = {
    ("rms_norm", "fwd"): 65536,
    ("layer_norm", "fwd"): 32768,
    ("rms_norm", "bwd"): 32768,
    ("layer_norm", "bwd"): 16384,
}


def candidates(op, direction, n, space=GPU_SPACE):
    """Configs worth timing for `op` at hidden size n: whole-row tiles of one or more rows (up
    to WHOLE_ROW_MAX), column-block loops for rows longer than a block
    (the backward's row-dot and column kernels), the warps giving each thread the space's
    elements, each programs-per-SM option of a persistent grid (the backward's, and the forward
    loops')."""
    from fastnn.triton_kernels.norm_common import BWD_MAX_BLOCK

    bn = _pow2(n)
    fwd = direction == "fwd"
    lo, hi = space.fwd_per_thread if fwd else space.bwd_per_thread

    def options(block, persistent):
        for w in (4, 8, 16, 32):
            per_thread = block // (32 * w)
            # Backward rows past the register cap, one per tile, are read twice (rms_norm's
            # bwd_rereads) and hold only dW: up to 64 elements per thread (32K over 16 warps).
            reread_row = not fwd and block == bn and block > BWD_MAX_BLOCK
            if not lo <= per_thread <= (64 if reread_row else hi):
                continue
            # 32 warps cap a thread at 64 registers: backward tiles of 16 elements per thread
            # held across the reduction spilled 100-312 B there (sm_90, triton 3.6), 8 did not.
            if not fwd and w == 32 and per_thread > 8 and block > bn:
                continue
            for p in space.per_sm if persistent else (None,):
                if p is None or p * w <= 64:
                    yield w, p

    out = []
    if bn <= WHOLE_ROW_MAX[op, direction]:
        for tile in sorted({max(bn, t) for t in (bn, *space.tiles)}):
            for w, p in options(tile, not fwd):
                out.append(Config(tile // bn, bn, True, w, p))
    # Backward rows of 4K or less: the row tile moves 3 units, the column paths 5; not timed.
    blocks = space.loop_blocks if fwd else space.col_blocks if n > space.tiles[0] else ()
    for block in blocks:
        if block < n:
            out += [Config(1, block, False, w, p) for w, p in options(block, True)]
    return out


_POLICIES = ("row_config", "persistent_programs")


@contextlib.contextmanager
def replaced_policies(replace):
    """Inside, each launcher policy of _POLICIES for which replace(name, real) answers a
    function is that function, in norm_common (its own helpers call them) and in rms_norm and
    layer_norm (which import them by name)."""
    from fastnn.triton_kernels import layer_norm, norm_common, rms_norm

    modules = (norm_common, rms_norm, layer_norm)
    saved = {(m, name): getattr(m, name) for m in modules for name in _POLICIES
             if hasattr(m, name)}  # fmt: skip
    new = {name: replace(name, real) for (m, name), real in saved.items() if m is norm_common}
    for m, name in saved:
        if new[name] is not None:
            setattr(m, name, new[name])
    try:
        yield
    finally:
        for (m, name), value in saved.items():
            setattr(m, name, value)


def launched_with(config):
    """Inside, the Triton norm launchers use `config` (None: their own choices)."""

    def replace(name, real):
        if config is None:
            return None
        if name == "row_config":
            return lambda *args: (config.block_m, config.block_n, config.single, config.num_warps)
        # A config's per_sm is timed as given, even past what fits (resident).
        return lambda device, work, per_sm, share=1, resident=None: real(
            device, work, config.per_sm or per_sm, share, None if config.per_sm else resident
        )

    return replaced_policies(replace)


def current_config(call, direction):
    """The Config the launchers choose themselves in `call()` (its policies' answers, recorded
    on the way; per_sm None where the launcher asked for none: the forward's whole-row tier is
    not persistent)."""
    seen = {}

    def recording(name, real):
        def policy(*args, **kwargs):
            seen[name] = (args, kwargs, real(*args, **kwargs))
            return seen[name][2]

        return policy

    with replaced_policies(recording):
        call()
    block_m, block_n, single, num_warps = seen["row_config"][2]
    per_sm = None
    if "persistent_programs" in seen:  # what was asked for, capped at what fits (resident)
        args, kwargs, _ = seen["persistent_programs"]
        per_sm = min(args[2], kwargs.get("resident") or args[2])
    return Config(block_m, block_n, single, num_warps, per_sm)


def make_inputs(op, direction, rows, n, dtype, device, seed=0, stats=None):
    """x, w, b (LayerNorm) and for the backward dy and the forward's statistics: `stats` when
    given (compiling without a GPU, where no forward runs), else from a forward."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, n, generator=g, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype)
    b = (0.1 * torch.randn(n, generator=g, device=device)).to(dtype)
    inputs = {"x": x, "w": w, "b": b if op == "layer_norm" else None}
    if direction == "bwd":
        inputs["dy"] = torch.randn(rows, n, generator=g, device=device).to(dtype)
        inputs["stats"] = stats if stats is not None else run_op(op, "fwd", inputs)[2:]
    return inputs


def run_op(op, direction, inputs):
    from fastnn.triton_kernels import layer_norm, rms_norm

    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    if op == "rms_norm":
        if direction == "fwd":
            return rms_norm.rms_norm_fwd(x, None, w, EPS[op])
        return rms_norm.rms_norm_bwd(inputs["dy"], None, x, w, *inputs["stats"])
    if direction == "fwd":
        return layer_norm.layer_norm_fwd(x, None, w, b, EPS[op])
    return layer_norm.layer_norm_bwd(inputs["dy"], None, x, w, b, *inputs["stats"])


def disagreement(got, ref):
    """Largest relative error (norm of the difference over the norm of ref) over the outputs a
    config computes, the forward's statistics included; summed in fp64 over chunks of 2^26
    elements (a [32768, 65536] tensor whole in fp64 would take 16 GiB)."""
    worst = 0.0
    for a, r in zip(got, ref, strict=True):
        a, r = a.reshape(-1), r.reshape(-1)
        diff = norm = 0.0
        for i in range(0, r.numel(), 2**26):
            x, y = a[i : i + 2**26].double(), r[i : i + 2**26].double()
            diff += float((x - y).square().sum())
            norm += float(y.square().sum())
        if r.numel():
            err = (diff / max(norm, 1e-300)) ** 0.5
            worst = max(worst, err if err == err else float("inf"))  # NaN: disagrees
    return worst


# Two configs' bf16 outputs, rounded from fp32 sums taken in other orders, differ in the last
# bit here and there (relative error ~1e-3); a config that drops or repeats rows is off by O(1).
AGREE = 1e-2


def check(ns=(40, 300, 2500), rows=6, verbose=False):
    """Under the interpreter: every config of CHECK_SPACE (the GPU's kinds of config, with
    blocks small enough that these N loop) agrees with the launcher's own choice. Returns the
    list of (case, config, error) that do not."""
    import torch

    bad = []
    for op in ("rms_norm", "layer_norm"):
        for direction in ("fwd", "bwd"):
            for n in ns:
                inputs = make_inputs(op, direction, rows, n, torch.bfloat16, "cpu")
                ref = run_op(op, direction, inputs)  # the launchers' own choice
                for config in candidates(op, direction, n, CHECK_SPACE):
                    try:
                        with launched_with(config):
                            err = disagreement(run_op(op, direction, inputs), ref)
                    except Exception as e:  # a config the kernels refuse is a finding too
                        err = f"{type(e).__name__}: {e}"
                    if verbose:
                        print(op, direction, n, config.label(), err, flush=True)
                    if isinstance(err, str) or err > AGREE:
                        bad.append(((op, direction, n), config, err))
    return bad


def _precompile(job):
    """Worker: compile one config (few rows, the same N, so the same specialisation)."""
    op, direction, n, config, rows, device = job
    import torch

    try:
        inputs = make_inputs(op, direction, rows, n, torch.bfloat16, device)
        with launched_with(config):
            run_op(op, direction, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


# Rows of the compile-only launches: a multiple of 16 like the timed 32768 (Triton specialises
# integer arguments on divisibility by 16), and row-block counts above 1.
PRECOMPILE_ROWS = 1024


def time_calls(fn, device):
    """Median seconds per call over ROUNDS rounds of CALLS back-to-back calls: on a GPU from
    CUDA events, each round queued behind a GPU sleep twice as long as the host took to queue
    the warm-up round (at least 5 ms), so host time never shows; on the CPU (the interpreter dry
    run) from the host clock."""
    import torch

    from bench import harness

    begin = time.perf_counter()
    for _ in range(CALLS):
        fn()
    queued = time.perf_counter() - begin
    per_call = []
    for _ in range(ROUNDS):
        if device == "cuda":
            torch.cuda.synchronize()
            harness.gpu_sleep(max(5e-3, 2 * queued))
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(CALLS):
                fn()
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(CALLS):
                fn()
            seconds = time.perf_counter() - begin
        per_call.append(seconds / CALLS)
    return statistics.median(per_call)


def copy_bandwidth(device):
    import torch

    src = torch.randn(2**28 if device == "cuda" else 2**20, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / time_calls(lambda: dst.copy_(src), device)


@contextlib.contextmanager
def nan_filled_allocations():
    """Inside, torch.empty, torch.empty_like and Tensor.new_empty fill floating tensors with
    NaN: the launchers' outputs and partial sums start as NaN, so a config that leaves any of
    them unwritten shows as a disagreement (the caching allocator would otherwise hand it the
    block the previous call just filled with the right values; fresh CPU memory, zeros)."""
    import torch

    real = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *args, **kwargs: poisoned(real[0](*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poisoned(real[1](*args, **kwargs))
    torch.Tensor.new_empty = lambda *args, **kwargs: poisoned(real[2](*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real


def warm_compile_cache(jobs, rows, device, timeout_s):
    """Compiles the configs of `jobs` in worker processes (Triton's on-disk cache then serves
    the timed runs; about 0.6 s a kernel, one at a time otherwise). Configs that differ only in
    per_sm share their kernels and compile once. Best effort: a config that failed here is
    still tried when timed (a worker's CUDA error could fail the jobs after it), and the phase
    ends after timeout_s. Returns {job: error or None} for the jobs that finished."""
    unique = list(
        dict.fromkeys((op, d, n, dataclasses.replace(c, per_sm=None)) for op, d, n, c in jobs)
    )
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(min(16, os.cpu_count() or 1), mp_context=context)
    futures = {pool.submit(_precompile, (*job, rows, device)): job for job in unique}
    done, pending = concurrent.futures.wait(futures, timeout=timeout_s)
    if pending:  # stop the workers: compiling (and their GPU work) would skew the timings
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
    pool.shutdown(wait=not pending, cancel_futures=True)
    results = {}
    for future in done:
        try:
            results[futures[future]] = future.result()
        except Exception as e:  # a worker died (BrokenProcessPool): the job is not trusted
            results[futures[future]] = f"{type(e).__name__}: {e}"
    return results


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (a sticky error): nothing after it can be timed."""


def device_healthy(device):
    import torch

    if device != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def sweep_case(op, direction, n, rows, device, space, copy):
    """Records of one case: the launchers' own choice, every candidate, the own choice again
    (how much the GPU drifted over the case)."""
    import torch

    from bench.test_norms import norm_bytes

    inputs = make_inputs(op, direction, rows, n, torch.bfloat16, device)
    nbytes = norm_bytes(op, direction, rows, n, 2)
    call = functools.partial(run_op, op, direction, inputs)
    ref = call()  # the launchers' own choice
    results = [("current", None, time_calls(call, device), 0.0, None)]
    chosen = current_config(call, direction)
    for config in candidates(op, direction, n, space):
        seconds = err = error = None
        try:
            with launched_with(config):
                with nan_filled_allocations():
                    err = disagreement(call(), ref)
                if err <= AGREE:
                    seconds = time_calls(call, device)
                else:
                    error = f"disagrees with the current config: {err:.1e}"
        except Exception as e:  # recorded; the sweep goes on while the device is healthy
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if not device_healthy(device):
                raise DeviceLost(f"{op} {direction} {n} {config.label()}: {error}") from e
        results.append(("candidate", config, seconds, err, error))
    results.append(("current (again)", None, time_calls(call, device), 0.0, None))
    records = []
    for role, config, seconds, err, error in results:
        label = config.label() if config else f"{role}: {chosen.label()}"
        records.append(dict(
            op=op, direction=direction, n=n, rows=rows, role=role, label=label,
            config=dataclasses.asdict(config if config else chosen),
            us=seconds and seconds * 1e6, gbps=seconds and nbytes / seconds / 1e9,
            pct_copy=seconds and 100 * nbytes / seconds / copy,
            disagreement=err if err is None or err < float("inf") else "inf", error=error,
        ))  # fmt: skip
    return records


def sweep(cases, rows, budget_s, out):
    """Times every candidate of every case on the GPU (on the CPU under the interpreter, a dry
    run of the same steps over CHECK_SPACE's configs: tests/test_triton_sweep.py). sweep.jsonl
    and sweep.md are rewritten after every case, so a run cut short keeps what it measured."""
    import torch

    start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (device == "cuda") == (os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("triton_sweep: run it on a GPU with TRITON_INTERPRET=0, or on the CPU "
                           "with TRITON_INTERPRET=1 (a dry run)")  # fmt: skip
    space = GPU_SPACE if device == "cuda" else CHECK_SPACE
    jobs = [(op, d, n, c) for op, d, n in cases for c in candidates(op, d, n, space)]
    print(f"triton_sweep: {len(jobs)} configs over {len(cases)} cases; compiling", flush=True)
    compile_rows = PRECOMPILE_ROWS if device == "cuda" else rows
    compiled = warm_compile_cache(jobs, compile_rows, device, timeout_s=budget_s / 2)
    failed = sum(1 for error in compiled.values() if error)
    print(f"triton_sweep: {len(compiled)} kernels compiled ({failed} failed) in "
          f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    copy = copy_bandwidth(device)
    records = []
    for op, direction, n in cases:
        if time.monotonic() - start > budget_s:
            print(f"triton_sweep: budget spent; skipped {op} {direction} {n} and after")
            break
        try:
            case = sweep_case(op, direction, n, rows, device, space, copy)
        except DeviceLost as e:
            print(f"triton_sweep: the device is lost after {e}; stopping", flush=True)
            break
        except Exception as e:  # the case's own setup failed: go on with the next
            print(f"triton_sweep: {op} {direction} {n} failed: {type(e).__name__}: {e}")
            continue
        finally:
            if device == "cuda" and device_healthy(device):
                torch.cuda.empty_cache()
        records += case
        with open(os.path.join(out, "sweep.jsonl"), "w") as log:
            log.writelines(json.dumps(r) + "\n" for r in records)
        write_summary(records, copy, device, os.path.join(out, "sweep.md"))
        timed = [r for r in case if r["us"]]
        best = max(timed, key=lambda r: r["gbps"])
        print(f"{op} {direction} {n}: current {case[0]['pct_copy']:.0f}% of copy, best "
              f"{best['pct_copy']:.0f}% ({best['label']})", flush=True)  # fmt: skip
    return records


def write_summary(records, copy, device, path):
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter dry run)"
    lines = [
        f"# Triton norm launch-config sweep, {name}, {time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
        f"bf16, copy {copy / 1e9:,.0f} GB/s; torch {torch.__version__}; "
        f"triton {__import__('triton').__version__}. Per case: the launcher's current choice, "
        "then the 5 fastest configs; failed configs counted; the current choice again at the "
        "end of the case (the GPU's drift over it).",
        "",
        "| op | dir | N | config | µs | % of copy |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    keys = sorted({(r["op"], r["direction"], r["n"]) for r in records}, key=str)
    for key in keys:
        rows = [r for r in records if (r["op"], r["direction"], r["n"]) == key]
        timed = sorted((r for r in rows if r["us"]), key=lambda r: r["us"])
        failed = sum(1 for r in rows if r["error"])
        current = [r for r in rows if r["role"] != "candidate"]
        for r in current + [r for r in timed if r["role"] == "candidate"][:5]:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['label']} | "
                         f"{r['us']:,.1f} | {r['pct_copy']:.0f}% |")  # fmt: skip
        if failed:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {failed} configs failed | | |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def static_resources(cases, path):
    """Without a GPU: every candidate of `cases` compiled for sm_90 (bench/kernel_resources.py),
    its kernels' registers, spill stores, shared memory and resident programs per SM written to
    `path` (JSON lines). Returns the records; about 0.2 s a config on the dev VM."""
    import torch

    from bench.kernel_resources import compiling_for_sm90

    records = []
    with open(path, "w") as out:
        for op, direction, n in cases:
            stat = torch.ones(16)  # 16 rows: specialised as 32768
            stats = (stat,) if op == "rms_norm" else (stat, stat)
            inputs = make_inputs(op, direction, 16, n, torch.bfloat16, "cpu", stats=stats)
            for config in candidates(op, direction, n):
                launches, error = [], None
                try:
                    with launched_with(config), compiling_for_sm90() as launches:
                        run_op(op, direction, inputs)
                except Exception as e:
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                kernels = [
                    dict(kernel=k.kernel, regs=k.regs, spill=k.spill, shared=k.shared,
                         resident_per_sm=k.resident_per_sm)
                    for k in launches if k.kernel != "_reduce_partials_kernel"
                ]  # fmt: skip
                record = dict(op=op, direction=direction, n=n, label=config.label(),
                              kernels=kernels, error=error)  # fmt: skip
                out.write(json.dumps(record) + "\n")
                records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="CPU interpreter check of configs")
    parser.add_argument(
        "--static", action="store_true", help="no GPU: compile every config for sm_90, resources"
    )
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--ops", default="rms_norm,layer_norm")
    parser.add_argument("--dirs", default="bwd,fwd")
    parser.add_argument("--n", default="", help="hidden sizes (default: the CASES list)")
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--out", default="bench/results/triton-sweep")
    args = parser.parse_args(argv)
    if args.check:
        bad = check(verbose=True)
        for case, config, err in bad:
            print("DISAGREES", case, config.label(), err)
        return 1 if bad else 0
    ops, dirs = args.ops.split(","), args.dirs.split(",")
    ns = [int(v) for v in args.n.split(",")] if args.n else None
    cases = [c for c in CASES if c[0] in ops and c[1] in dirs and (ns is None or c[2] in ns)]
    if ns:
        cases += [(o, d, n) for o in ops for d in dirs for n in ns if (o, d, n) not in cases]
    os.makedirs(args.out, exist_ok=True)
    if args.static:
        records = static_resources(cases, os.path.join(args.out, "static.jsonl"))
        spilled = [r for r in records if any(k["spill"] > 32 for k in r["kernels"])]
        failed = [r for r in records if r["error"]]
        print(f"{len(records)} configs compiled for sm_90: {len(spilled)} spill over 32 B, "
              f"{len(failed)} failed (static.jsonl in {args.out})")  # fmt: skip
        return 1 if failed else 0
    sweep(cases, args.rows, args.budget_s, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
