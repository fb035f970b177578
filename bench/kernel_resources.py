"""Registers, spills and occupancy of fastnn's Triton norm kernels on Hopper, without a GPU.

`triton.compile` needs no driver once it is given a target: this module swaps in a stand-in
driver that names sm_90, runs the real launchers of fastnn/triton_kernels/{rms,layer}_norm.py
on small CPU tensors while their launches compile (warmup) instead of running, and assembles
each kernel's PTX with triton's own ptxas for its report. So the configs checked are the ones
the launchers pick, specialised as on a GPU (16-byte aligned pointers).

    python -m bench.kernel_resources            # the table for bf16 rows, N = 512 .. 256K
    python -m bench.kernel_resources --json     # every tier (sweep()), one JSON line each

What it tells, per kernel and N: warps, registers per thread, bytes of spill stores, shared
memory (a pipelined loop's buffers show here), resident programs per SM (by registers, threads
and shared memory), and for the persistent backward grids the programs per SM the launcher asks
for: more than fit run as a second wave.
The numbers are those of this triton's ptxas (the GPU machines run another triton version).
tests/test_kernel_resources.py holds every tier to register-resident rows.
"""

import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

# Hopper (sm_90) per-SM limits (CUDA C programming guide, compute capability 9.0).
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are given to a warp in units of 256
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024


# Kernels launched on a persistent grid of persistent_programs(...) programs.
PERSISTENT_KERNELS = {
    "_rms_bwd_kernel",
    "_rms_bwd_cols_kernel",
    "_ln_bwd_kernel",
    "_ln_bwd_cols_kernel",
}


@dataclass
class Launch:
    kernel: str
    num_warps: int
    regs: int
    spill: int  # bytes of spill stores
    shared: int
    # Programs per SM the launcher sized a persistent grid for (None: not persistent).
    asked_per_sm: int | None

    @property
    def resident_per_sm(self):
        """Programs of this kernel that fit on one SM at once."""
        warp_regs = -(-self.regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = REGS_PER_SM // (warp_regs * self.num_warps)
        by_threads = MAX_THREADS_PER_SM // (32 * self.num_warps)
        by_shared = SHARED_PER_SM // (self.shared + SHARED_RESERVED_PER_BLOCK)
        return min(by_regs, by_threads, by_shared, MAX_BLOCKS_PER_SM)


def _ptxas():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    if not os.path.exists(path):
        raise RuntimeError(f"no ptxas in this triton ({path})")
    return path


def _resources(ptx):
    """(registers, spill store bytes) of the one kernel in `ptx`, assembled for sm_90a with the
    options triton passes (triton does not keep the report). Spill stores, not the stack frame:
    an fp32 division's slow path is a subroutine whose call saves registers on the stack."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
               "-o", os.path.join(tmp, "kernel.cubin")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas printed no resource usage:\n{log}")
    return int(regs.group(1)), int(spill.group(1))


class _Sm90Driver:
    """What JITFunction.run asks the active driver for, answered for an H100 (sm_90)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for_sm90():
    """Inside: every Triton launch compiles for sm_90 and is recorded, nothing runs (outputs
    stay uninitialised). Yields the list of Launch records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_resources compiles kernels: run it without TRITON_INTERPRET=1")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from fastnn.triton_kernels import layer_norm, rms_norm

    launches = []
    asked = []  # per_sm of the last persistent_programs call
    real_run, real_programs = JITFunction.run, rms_norm.persistent_programs

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        regs, spill = _resources(kernel.asm["ptx"])
        per_sm = asked[-1] if self.fn.__name__ in PERSISTENT_KERNELS else None
        launches.append(
            Launch(self.fn.__name__, kernel.metadata.num_warps, regs, spill,
                   kernel.metadata.shared, per_sm)
        )  # fmt: skip
        return kernel

    def persistent_programs(device, work, per_sm, share=1):
        asked.append(per_sm)  # share splits the programs over grid columns, not SMs
        return real_programs(device, work, per_sm, share)

    # reset_active() would build the default driver, which fails on a machine without a GPU.
    previous_driver = driver._active
    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    rms_norm.persistent_programs = layer_norm.persistent_programs = persistent_programs
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        rms_norm.persistent_programs = layer_norm.persistent_programs = real_programs
        driver._active = previous_driver


def norm_launches(op, n, dtype, residual=False, rows=8):
    """Launch records of one forward and one backward of `op` ("rms_norm" / "layer_norm") at
    hidden size n, with weight (and bias), compiled for sm_90."""
    import torch

    from fastnn.triton_kernels import layer_norm, rms_norm

    x = torch.zeros(rows, n, dtype=dtype)
    r = torch.zeros_like(x) if residual else None
    w = torch.zeros(n, dtype=dtype)
    stat = torch.zeros(rows, dtype=torch.float32)
    with compiling_for_sm90() as launches:
        if op == "rms_norm":
            rms_norm.rms_norm_fwd(x, r, w, 1e-6)
            rms_norm.rms_norm_bwd(x, r, x, w, stat)
        else:
            layer_norm.layer_norm_fwd(x, r, w, w, 1e-5)
            layer_norm.layer_norm_bwd(x, r, x, w, w, stat, stat)
    return [launch for launch in launches if launch.kernel != "_reduce_partials_kernel"]


def sweep():
    """Every tier of both norms: N = 1 .. 64K in powers of two (each power of two up to the
    register caps is its own compile; beyond them the looping kernels take N at run time) and
    two N that are not multiples of 16, in bf16 and fp32, with and without the residual."""
    import torch

    sizes = [1 << k for k in range(17)] + [1000, 40000]
    for op in ("rms_norm", "layer_norm"):
        for dtype in (torch.bfloat16, torch.float32):
            for residual in (False, True):
                for n in sizes:
                    for launch in norm_launches(op, n, dtype, residual):
                        yield dict(op=op, n=n, dtype=str(dtype).removeprefix("torch."),
                                   residual=residual, **asdict(launch),
                                   resident_per_sm=launch.resident_per_sm)  # fmt: skip


def main():
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="every tier (sweep()) as JSON lines")
    if parser.parse_args().json:
        for row in sweep():
            print(json.dumps(row), flush=True)
        return
    print(
        "| op | N | kernel | warps | regs | spill stores B | shared B | resident / SM | asked / SM |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for op in ("rms_norm", "layer_norm"):
        for log_n in range(9, 19):
            n = 1 << log_n
            for launch in norm_launches(op, n, torch.bfloat16):
                asked = "" if launch.asked_per_sm is None else launch.asked_per_sm
                print(
                    f"| {op} | {n} | {launch.kernel} | {launch.num_warps} | {launch.regs} | "
                    f"{launch.spill} | {launch.shared} | {launch.resident_per_sm} | {asked} |"
                )


if __name__ == "__main__":
    main()
