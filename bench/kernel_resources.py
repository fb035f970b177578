"""Registers, spills and occupancy of fastnn's Triton kernels on Hopper, without a GPU.

`triton.compile` needs no driver once it is given a target: this module swaps in a stand-in
driver that names sm_90, runs the real launchers of fastnn/triton_kernels/ on small CPU tensors
while their launches compile (warmup) instead of running, and assembles each kernel's PTX with
triton's own ptxas for its report. So the configs checked are the ones the launchers pick,
specialised as on a GPU (16-byte aligned pointers).

    python -m bench.kernel_resources            # the table for bf16 rows, N = 512 .. 256K (1-2 min)
    python -m bench.kernel_resources --json     # every kernel (sweep()), one JSON line each
    python -m bench.kernel_resources --native   # the built extension's CUDA kernels (cuobjdump):
                                                # registers, stack, global loads in flight

What it tells, per kernel and N: warps, registers per thread, bytes of spill stores, shared
memory (a pipelined loop's buffers show here), resident programs per SM (by registers, threads
and shared memory), for the persistent backward grids the programs per SM the launcher asks
for (on a GPU it takes no more than fit: norm_common.resident_programs), and from the SASS the
global loads a thread has in flight into registers at most and the LDGSTS (cp.async: a
pipelined loop loading into shared memory) it issues (the table only: cuobjdump takes about
0.5 s a kernel).
The numbers are those of this triton's ptxas (the GPU machines run another triton version).
tests/test_kernel_resources.py holds every kernel to compiling for sm_90 (the interpreter runs
code a GPU compile rejects), every norm tier to register-resident rows, the CUDA norm and GLU
kernels to no local memory, and the CUDA norm kernels to a whole tile of loads in flight.
"""

import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from functools import partial

# Hopper (sm_90) per-SM limits that differ between GPUs (CUDA C programming guide, compute
# capability 9.0); the others are norm_common's.
MAX_THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024


# Kernels launched on a persistent grid of persistent_programs(...) programs (the forwards in
# their looping tier).
PERSISTENT_KERNELS = {
    "_rms_fwd_kernel",
    "_ln_fwd_kernel",
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
    # From the SASS, when asked for (sass=True: cuobjdump takes about 0.5 s a kernel): global
    # loads into registers issued and not yet used, at most; LDGSTS (a pipelined loop's loads
    # into shared memory).
    in_flight: int | None = None
    async_copies: int | None = None
    # PTX instructions that flush subnormals to zero (.ftz: libdevice's approximate rsqrt, exp)
    ftz_ops: int = 0

    @property
    def resident_per_sm(self):
        """Programs of this kernel that fit on one SM at once (as the launchers reckon it on a
        GPU: norm_common.resident_programs)."""
        from fastnn.triton_kernels.norm_common import programs_that_fit

        return programs_that_fit(
            self.regs, self.num_warps, self.shared, MAX_THREADS_PER_SM, SHARED_PER_SM
        )


def _triton_tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"no {name} in this triton ({path})")
    return path


def native_cuda_kernels():
    """[{source, kernel, regs, stack}] of every kernel in the built extension's CUDA code, from
    `cuobjdump -res-usage` (stack: bytes of local memory per thread, spills included). Empty
    when the extension is not built or has no CUDA code."""
    from fastnn import _extension

    if not _extension.load():
        return []
    import fastnn._C

    text = subprocess.run(
        [_triton_tool("cuobjdump"), "-res-usage", fastnn._C.__file__],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    kernels, source = [], None
    for line in text.splitlines():
        if m := re.match(r"identifier = (.*)", line.strip()):
            source = os.path.basename(m.group(1))
        elif m := re.match(r"\s*Function (\S+):", line):
            kernels.append(dict(source=source, kernel=m.group(1)))
        elif m := re.search(r"REG:(\d+) STACK:(\d+)", line):
            kernels[-1].update(regs=int(m.group(1)), stack=int(m.group(2)))
    return kernels


_SASS_FUNCTION = re.compile(r"Function : (\S+)")
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
_REGISTER = re.compile(r"^R(\d+)$")


def loads_in_flight(instructions):
    """The most global loads a thread has issued and not yet used in `instructions` [(opcode,
    operands)], scanned in address order: a load is in flight from its LDG until an instruction
    reads one of the registers it writes. A straight-line reading of the SASS (branches are not
    followed), so it shows what the compiler scheduled: a loop that used each vector inside the
    branch that loaded it shows 1 whatever its unroll."""
    pending, most = [], 0
    for opcode, operands in instructions:
        parts = [p.strip() for p in operands.split(",")]
        dest = _REGISTER.match(parts[0]) if parts and parts[0] else None
        sources = {int(r) for p in parts[1 if dest else 0 :] for r in re.findall(r"\bR(\d+)\b", p)}
        pending = [(first, count) for first, count in pending
                   if not any(first <= r < first + count for r in sources)]  # fmt: skip
        if opcode.startswith("LDG") and dest:
            width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
            pending.append((int(dest.group(1)), width))
            most = max(most, len(pending))
    return most


def native_loads_in_flight():
    """{kernel: (loads in flight, global loads)} of every kernel in the built extension's CUDA
    code (loads_in_flight over `cuobjdump -sass`); empty without CUDA code."""
    from fastnn import _extension

    if not _extension.load():
        return {}
    import fastnn._C

    text = subprocess.run(
        [_triton_tool("cuobjdump"), "-sass", fastnn._C.__file__], capture_output=True, text=True
    ).stdout
    return {
        name: (loads_in_flight(code), sum(op.startswith("LDG") for op, _ in code))
        for name, code in _sass_functions(text).items()
    }


def _sass_functions(text):
    """{kernel: [(opcode, operands)]} of `cuobjdump -sass` text."""
    functions, name = {}, None
    for line in text.splitlines():
        if m := _SASS_FUNCTION.search(line):
            name = m.group(1)
            functions[name] = []
        elif name and (m := _SASS_INSTRUCTION.search(line)):
            functions[name].append((m.group(1), m.group(2)))
    return functions


def _resources(ptx, sass=False):
    """(registers, spill store bytes, loads in flight, LDGSTS count) of the one kernel in `ptx`,
    assembled for sm_90a with the options triton passes (triton does not keep the report); the
    last two read from its SASS (loads_in_flight) when `sass`, else None. Spill stores, not the
    stack frame: an fp32 division's slow path is a subroutine whose call saves registers on the
    stack."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_triton_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
               "-o", cubin]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        code = None
        if sass:
            text = subprocess.run(
                [_triton_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                check=True,
            ).stdout  # fmt: skip
            (code,) = _sass_functions(text).values()
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas printed no resource usage:\n{log}")
    if code is None:
        return int(regs.group(1)), int(spill.group(1)), None, None
    async_copies = sum(op.startswith("LDGSTS") for op, _ in code)
    return int(regs.group(1)), int(spill.group(1)), loads_in_flight(code), async_copies


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
def compiling_for_sm90(sass=False):
    """Inside: every Triton launch compiles for sm_90 and is recorded, nothing runs (outputs
    stay uninitialised). Yields the list of Launch records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_resources compiles kernels: run it without TRITON_INTERPRET=1")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from fastnn.triton_kernels import layer_norm, norm_common, rms_norm

    launches = []
    # per_sm of the last persistent_programs call, until a persistent kernel's launch takes it
    asked = {"per_sm": None}
    real_run, real_programs = JITFunction.run, norm_common.persistent_programs

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        regs, spill, in_flight, async_copies = _resources(kernel.asm["ptx"], sass)
        per_sm = None
        if self.fn.__name__ in PERSISTENT_KERNELS:
            per_sm, asked["per_sm"] = asked["per_sm"], None
        ftz_ops = len(re.findall(r"\.ftz\b", kernel.asm["ptx"]))
        launches.append(
            Launch(self.fn.__name__, kernel.metadata.num_warps, regs, spill,
                   kernel.metadata.shared, per_sm, in_flight, async_copies, ftz_ops)
        )  # fmt: skip
        return kernel

    def persistent_programs(device, work, per_sm, share=1, resident=None):
        asked["per_sm"] = per_sm  # share splits the programs over grid columns, not SMs
        return real_programs(device, work, per_sm, share, resident)

    # reset_active() would build the default driver, which fails on a machine without a GPU.
    previous_driver = driver._active
    driver.set_active(_Sm90Driver())
    JITFunction.run = run
    for module in (norm_common, rms_norm, layer_norm):
        module.persistent_programs = persistent_programs
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        for module in (norm_common, rms_norm, layer_norm):
            module.persistent_programs = real_programs
        driver._active = previous_driver


def norm_launches(
    op, n, dtype, residual=False, weight_dtype=None, rows=8, sass=False, misaligned=False
):
    """Launch records of one forward and one backward of `op` ("rms_norm" / "layer_norm") at
    hidden size n, with weight (and bias) in weight_dtype (default: the input's), compiled for
    sm_90 (and read in SASS with `sass`). `misaligned`: x, the residual and the weight start
    one element past a 16-byte boundary, so none of their loads can be 16-byte vectors."""
    import torch

    from fastnn.triton_kernels import layer_norm, rms_norm

    def zeros(*shape, dtype=dtype):
        size = math.prod(shape) + misaligned
        return torch.zeros(size, dtype=dtype)[int(misaligned) :].view(shape)

    x = zeros(rows, n)
    r = zeros(rows, n) if residual else None
    w = zeros(n, dtype=weight_dtype or dtype)
    stat = torch.zeros(rows, dtype=torch.float32)
    with compiling_for_sm90(sass) as launches:
        if op == "rms_norm":
            rms_norm.rms_norm_fwd(x, r, w, 1e-6)
            rms_norm.rms_norm_bwd(x, r, x, w, stat)
        else:
            layer_norm.layer_norm_fwd(x, r, w, w, 1e-5)
            layer_norm.layer_norm_bwd(x, r, x, w, w, stat, stat)
    return [launch for launch in launches if launch.kernel != "_reduce_partials_kernel"]


def glu_launches(activation, dtype):
    """Launch records of the GLU kernels (separate and packed, forward and backward)."""
    import torch

    from fastnn.triton_kernels import glu

    gate = torch.zeros(4, 2048, dtype=dtype)
    packed = torch.zeros(4, 4096, dtype=dtype)
    with compiling_for_sm90() as launches:
        glu.glu_fwd(gate, gate, activation)
        glu.glu_bwd(gate, gate, gate, activation)
        glu.glu_packed_fwd(packed, activation)
        glu.glu_packed_bwd(gate, packed, activation)
    return launches


def optimizer_launches(name, param_dtype, state_dtype, everything):
    """Launch records of one Adam or RMSprop step on one parameter: with every option off, or
    (everything) with each on: weight decay, AMSGrad / centered + momentum, maximize, a tensor
    lr, the fused scaler's grad_scale and found_inf, and fp32 master weights when the params
    are low precision."""
    import torch

    from fastnn.triton_kernels import adam, rmsprop

    def zeros(dtype=state_dtype):
        return [torch.zeros(5000, dtype=dtype)]

    master = everything and param_dtype.itemsize < 4
    common = dict(
        params=zeros(param_dtype),
        grads=zeros(param_dtype),
        master_params=zeros(torch.float32) if master else [],
        lr_tensor=torch.tensor(1e-3) if everything else None,
        grad_scale=torch.tensor(1.0) if everything else None,
        found_inf=torch.tensor(0.0) if everything else None,
        lr=1e-3,
        weight_decay=0.01 if everything else 0.0,
        eps=1e-8,
        maximize=everything,
    )
    with compiling_for_sm90() as launches:
        if name == "adam":
            adam.adam_step_(
                exp_avgs=zeros(), exp_avg_sqs=zeros(), max_exp_avg_sqs=zeros() if everything else [],
                steps=[torch.tensor(1.0)], beta1=0.9, beta2=0.999,
                decoupled_weight_decay=everything, amsgrad=everything, **common,
            )  # fmt: skip
        else:
            rmsprop.rmsprop_step_(
                square_avgs=zeros(), grad_avgs=zeros() if everything else [],
                momentum_buffers=zeros() if everything else [], alpha=0.99,
                momentum=0.9 if everything else 0.0, centered=everything,
                steps=[torch.tensor(1.0)], **common,
            )  # fmt: skip
    return launches


def _norm_cases():
    """Every tier of both norms: N = 1 .. 64K in powers of two (each power of two up to the
    register caps is its own compile; beyond them the looping kernels take N at run time) and
    N that are not multiples of 16 (scalar loads: the tiers' caps are lower for them) in and
    past the whole-row tiers, 12000 (a masked 16-bit backward row read twice), in bf16 and fp32, with and without the residual; rows off a
    16-byte boundary at 24K; fp16 and fp64 at one N of each tier; bf16 rows with an fp32
    weight."""
    import torch

    sizes = [1 << k for k in range(17)] + [1000, 4097, 12000, 17000, 40001]
    for op in ("rms_norm", "layer_norm"):
        for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
            for residual in (False, True):
                for n in (
                    sizes if dtype in (torch.bfloat16, torch.float32) else [1024, 16384, 40001]
                ):
                    name = f"{op} N={n} {str(dtype)[6:]}{' residual' if residual else ''}"
                    yield name, partial(norm_launches, op, n, dtype, residual)
            name = f"{op} N=24576 {str(dtype)[6:]} residual misaligned"
            yield name, partial(norm_launches, op, 24576, dtype, True, misaligned=True)
        for n in sizes:  # bf16 rows, fp32 weight (an fp32 model under bf16 autocast)
            name = f"{op} N={n} bfloat16 fp32-weight"
            yield name, partial(norm_launches, op, n, torch.bfloat16, False, torch.float32)


def _glu_and_optimizer_cases():
    import torch

    from fastnn.reference.glu import ACTIVATIONS

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for activation in ACTIVATIONS:
            yield f"glu {activation} {str(dtype)[6:]}", partial(glu_launches, activation, dtype)
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
              (torch.float64, torch.float64)]  # fmt: skip
    for name in ("adam", "rmsprop"):
        for param_dtype, state_dtype in dtypes:
            for everything in (False, True):
                case = f"{name} params {str(param_dtype)[6:]} state {str(state_dtype)[6:]}"
                case += " every option" if everything else " plain"
                yield case, partial(optimizer_launches, name, param_dtype, state_dtype, everything)


def sweep():
    """Records (dicts) of every Triton kernel of fastnn at the configs its launchers pick for the
    cases above; a case whose kernels do not compile gives one record with its error."""
    from triton.compiler.errors import CompilationError

    for cases in (_norm_cases(), _glu_and_optimizer_cases()):
        for case, launches in cases:
            try:
                for launch in launches():
                    yield dict(case=case, **asdict(launch), resident_per_sm=launch.resident_per_sm)
            except CompilationError as e:
                yield dict(case=case, error=str(e))


def main():
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="every kernel (sweep()) as JSON lines")
    parser.add_argument(
        "--native", action="store_true", help="the built extension's CUDA kernels instead"
    )
    args = parser.parse_args()
    if args.native:
        in_flight = native_loads_in_flight()
        for k in native_cuda_kernels():
            pending, loads = in_flight.get(k["kernel"], (0, 0))
            print(
                f"{k['source']:14} regs {k['regs']:3} stack {k['stack']:3} B  in flight {pending:2} of {loads:3} loads  {k['kernel']}"
            )
        return
    if args.json:
        for row in sweep():
            print(json.dumps(row), flush=True)
        return
    print(
        "| op | N | kernel | warps | regs | spill stores B | shared B | resident / SM | asked / SM "
        "| loads in flight | async copies |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for op in ("rms_norm", "layer_norm"):
        for log_n in range(9, 19):
            n = 1 << log_n
            for launch in norm_launches(op, n, torch.bfloat16, sass=True):
                asked = "" if launch.asked_per_sm is None else launch.asked_per_sm
                print(
                    f"| {op} | {n} | {launch.kernel} | {launch.num_warps} | {launch.regs} | "
                    f"{launch.spill} | {launch.shared} | {launch.resident_per_sm} | {asked} | "
                    f"{launch.in_flight} | {launch.async_copies} |"
                )


if __name__ == "__main__":
    main()
