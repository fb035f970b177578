"""Every Triton kernel compiled for sm_90 without a GPU (bench/kernel_resources.py: the configs
the launchers pick, every norm tier, every GLU activation, every optimizer option), and the
register budgets of the native CUDA kernels the build compiled.

The interpreter that runs the Triton tests here is Python: it accepts code a GPU compile
rejects (an enum bound to a local name, say), so compiling is a test of its own.

And the norms' contract is register-resident rows: a row tile that does not fit shows as tens
to hundreds of bytes of spill stores per thread (a whole 64K bf16 row over 16 warps spills
240 B; the fp32 LayerNorm backward at 8K with a residual spilled 60 B under triton 3.6 before
its warps were raised). ptxas itself parks a few registers at times (4 B at 48 registers for
the fp32 LayerNorm forward at N = 4096, 16 B for the fp32 RMSNorm backward of misaligned
1000-wide rows), so up to 32 B, eight registers, passes. fp64 kernels exist so gradcheck runs
on them, not for speed: they only have to compile."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_resources import loads_in_flight, native_cuda_kernels, native_loads_in_flight

ROOT = Path(__file__).resolve().parent.parent
MAX_SPILL_BYTES = 32
NORM_AND_GLU_SOURCES = {"rms_norm.cu", "layer_norm.cu", "glu.cu"}


@pytest.fixture(scope="module")
def records():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0 and "no ptxas in this triton" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_kernel_compiles_for_sm90(records):
    failed = [f"{r['case']}: {r['error']}" for r in records if "error" in r]
    assert not failed, "\n\n".join(failed)
    kernels = {r["kernel"] for r in records}
    for op in ("rms", "ln"):
        for kind in ("fwd", "bwd", "rowdot", "bwd_cols"):
            assert f"_{op}_{kind}_kernel" in kernels
    assert {"_glu_fwd_kernel", "_glu_bwd_kernel", "_adam", "_rmsprop"} <= kernels


def test_no_spills(records):
    spilled = [
        f"{r['case']}: {r['kernel']} ({r['num_warps']} warps, {r['regs']} registers) {r['spill']} B"
        for r in records
        if "error" not in r and "float64" not in r["case"] and r["spill"] > MAX_SPILL_BYTES
    ]
    assert not spilled, "spill stores per thread:\n" + "\n".join(spilled)


def test_norm_kernels_keep_subnormals(records):
    """No norm kernel flushes subnormals to zero: with eps=0 a row of 1e-20s has a mean square
    of 1e-40, which tl.rsqrt (rsqrt.approx.ftz.f32) took for 0 (rstd = inf, torch: 1e20)."""
    flushing = [
        f"{r['case']}: {r['kernel']} ({r['ftz_ops']} .ftz instructions)"
        for r in records
        if "error" not in r and r["kernel"].startswith(("_rms_", "_ln_")) and r["ftz_ops"]
    ]
    assert not flushing, "\n".join(flushing)


def test_native_norm_and_glu_kernels_use_no_local_memory():
    """The CUDA norm and GLU kernels keep rows and vectors in registers: no stack (spills or
    local arrays) in any of their instantiations. (The fp16 / bf16 Adam and RMSprop kernels do
    spill 8-28 B at the 64-register cap of their launch bounds: not held here.)"""
    pytest.importorskip("triton")  # for its cuobjdump
    kernels = [k for k in native_cuda_kernels() if k["source"] in NORM_AND_GLU_SOURCES]
    if not kernels:
        pytest.skip("the extension has no CUDA code here (a CPU-only build)")
    assert {k["source"] for k in kernels} == NORM_AND_GLU_SOURCES
    stacked = [f"{k['source']} {k['kernel']}: {k['stack']} B" for k in kernels if k["stack"]]
    assert not stacked, "\n".join(stacked)


def cuda_constant(name):
    """A `constexpr int` of csrc/include/fastnn/cuda_utils.cuh (the CUDA kernels' tile sizes)."""
    text = (ROOT / "csrc/include/fastnn/cuda_utils.cuh").read_text()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def required_loads_in_flight(kernel):
    """Loads a CUDA norm kernel's thread must have in flight at once: one per vector of each
    input tile it loads (x; x and dy in the backward); None for kernels not held to it."""
    m = re.search(
        r"(?:rms|ln)_(fwd_reg|bwd_reg|fwd_staged|bwd_rowdot|bwd_cols)_kernelI(.*)", kernel
    )
    if m is None:
        return None
    kind, ints = m.group(1), [int(i) for i in re.findall(r"Li(\d+)E", m.group(2))]
    vec = ints[0]
    if kind == "fwd_reg":
        return ints[1]
    if kind == "bwd_reg":
        return 2 * ints[1]
    if vec == 1:  # the scalar fallback (misaligned, odd N, fp64)
        return None
    tile = {"fwd_staged": "kStagedItems", "bwd_rowdot": "kRowDotItems", "bwd_cols": "kColRows"}
    return (1 if kind == "fwd_staged" else 2) * cuda_constant(tile[kind])


def test_loads_in_flight_reads_sass():
    code = [
        ("LDG.E.128", "R4, desc[UR6][R2.64]"),
        ("LDG.E.128", "R8, desc[UR6][R12.64]"),
        ("ISETP.GE.AND", "P0, PT, R20, 0x1, PT"),
        ("FADD", "R16, R5, R0"),  # uses the first load
        ("LDG.E.128", "R4, desc[UR6][R2.64]"),
        ("STG.E.128", "desc[UR6][R2.64], R8"),  # uses the second
        ("LDG.E", "R30, desc[UR6][R2.64]"),
    ]
    assert loads_in_flight(code) == 2
    assert loads_in_flight(code[:2] + code[4:5]) == 3


def test_native_norm_kernels_keep_a_tile_of_loads_in_flight():
    """Every CUDA norm kernel issues all loads of a tile before it uses any (load_tile in
    cuda_utils.cuh). Before it, each vector was loaded and used inside its own `if (col < n)`:
    the RMSNorm forward's SASS had 1 load in flight at every vectors-per-thread, and it ran at
    45-55% of copy (H200, bf16, N = 1K-16K) where the Triton kernel ran at 88-97%."""
    pytest.importorskip("triton")  # for its cuobjdump
    loads = native_loads_in_flight()
    held = {k: (need, loads[k][0]) for k in loads if (need := required_loads_in_flight(k))}
    if not held:
        pytest.skip("the extension has no CUDA code here (a CPU-only build)")
    kinds = {re.search(r"((?:rms|ln)_(?:fwd|bwd)_\w+?)_kernelI", k).group(1) for k in held}
    assert {"rms_fwd_reg", "ln_bwd_cols", "rms_bwd_rowdot", "ln_fwd_staged"} <= kinds
    short = [f"{k}: {got} < {need}" for k, (need, got) in held.items() if got < need]
    assert not short, "loads in flight per thread:\n" + "\n".join(short)


def test_persistent_grids_ask_for_no_more_programs_than_fit(monkeypatch):
    """On a GPU the norm backwards' persistent grids take per SM the programs asked for or, when
    fewer fit, those that fit by the compiled kernel's registers (a second wave would run at low
    occupancy): the compiled kernel is read once per variant, with a dtype standing in for the
    partial sums the grid's size decides. A stand-in compiled kernel here (no GPU). Under the
    interpreter nothing is compiled, on CUDA tensors too: the grid is as asked."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from fastnn.triton_kernels import norm_common, rms_norm

    warmups = []
    compiled = SimpleNamespace(
        n_regs=93, metadata=SimpleNamespace(num_warps=16, shared=0), _init_handles=lambda: None
    )

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            warmups.append((args, kwargs))
            return compiled

    hopper = SimpleNamespace(
        max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=228 * 1024
    )
    monkeypatch.setattr(norm_common, "_RESIDENT", {})
    monkeypatch.setattr(norm_common, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: hopper)
    gpu, kernel, x = torch.device("cuda", 0), Kernel(), torch.empty(64, 4096)

    def grid(work, args, kwargs, aligned=True, device=gpu):
        return norm_common.persistent_grid(kernel, device, work, 2, args, kwargs, aligned)

    kwargs = dict(BLOCK_M=1, num_warps=16)
    # 93 registers over 16 warps: 1536 threads' registers leave room for one program, not two.
    assert grid(10**6, [x, torch.float32, 64], kwargs) == 132
    assert grid(10**6, [x, torch.float32, 64], kwargs) == 132
    assert len(warmups) == 1 and warmups[0][0][1] is torch.float32
    assert grid(10**6, [x, torch.float32, 65], kwargs) == 132
    assert len(warmups) == 2  # 65 rows: not a multiple of 16, another compiled variant
    assert grid(10**6, [x, torch.float32, 64], kwargs, aligned=False) == 132
    assert len(warmups) == 3  # rows that are not 16-byte vectors: another variant
    compiled.n_regs = 40  # three fit: the two asked for
    kwargs = dict(BLOCK_M=2, num_warps=16)
    assert grid(10**6, [x, None, 64], kwargs) == 264
    assert grid(100, [x, None, 64], kwargs) == 100
    # CPU tensors under the interpreter: 4 programs, whatever the kernel.
    assert grid(10**6, [x, None, 64], kwargs, device=x.device) == 4
    assert len(warmups) == 4
    # An interpreted kernel on CUDA tensors compiles nothing (its warmup answers None): as asked.
    interpreted = InterpretedFunction(rms_norm._rms_bwd_kernel.fn)
    grid_args = (gpu, 10**6, 2, [x, None, 64], kwargs, True)
    assert norm_common.persistent_grid(interpreted, *grid_args) == 264
    # The table's rows (bench/kernel_resources.py, triton 3.6, sm_90): LayerNorm's bf16 backward
    # with a residual at N = 512, 78 registers over 4 warps, fits 6 of the 8 asked for.
    assert norm_common.programs_that_fit(78, 4, 0, 2048, 228 * 1024) == 6
    assert norm_common.programs_that_fit(72, 4, 0, 2048, 228 * 1024) == 7
    assert norm_common.programs_that_fit(32, 4, 0, 2048, 228 * 1024) == 16  # by threads
