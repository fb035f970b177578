"""The optimizer math shared by the CPU and CUDA kernels rounds the same on both, checked without a
GPU: nvcc fuses a * b + c into one fma by default, the host build fuses none (only the header's
explicit fma_), so tests/cpp/optim_math_contraction.cpp is built both ways with g++ (the second
with -ffp-contract=fast and mul_'s device branch taken) and the checksums of 100,000 scalar updates
per op, math type and option combination must agree. A stand-in, not nvcc: GCC fuses only within
a basic block, so a product and an add that a runtime branch separates (AdamW's p * decay, behind
`if (decoupled)`) are not offered to it; such products go through mul_ in the header whether or
not this check would see them. On the CUDA side, tests/test_optim_gpu.py compares the bits
themselves."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "optim_math_contraction.cpp"
INCLUDE = f"-I{ROOT / 'csrc' / 'include'}"
COMMON = ["g++", "-std=c++20", "-O2", "-Wall", "-Werror", "-Wno-psabi", INCLUDE]
AS_HOST = ["-ffp-contract=off"]  # baseline x86-64: no fma instruction to contract into
# x86-64-v3 has FMA; -ffp-contract=fast fuses across the inlined header as nvcc's --fmad=true does.
AS_NVCC = ["-march=x86-64-v3", "-ffp-contract=fast", "-DFASTNN_EMULATE_NVCC"]
# beta1 beta2 eps weight_decay step lr grad_scale alpha momentum: torch's defaults with a grad
# scaler's power of two; odd values with a scale that takes the division branch; and an lr and
# weight decay whose 1 - lr * wd rounds differently once fused (in double: about 0.5% of random
# pairs do; round numbers like the others do not).
HYPERPARAMETERS = [
    ["0.9", "0.999", "1e-8", "0.01", "7", "0.001", "65536", "0.99", "0.9"],
    ["0.8", "0.95", "1e-6", "0.1", "1", "0.03", "3", "0.5", "0.7"],
    ["0.9", "0.999", "1e-8", "0.0889", "3", "0.0909", "1", "0.99", "0.9"],
]


def _why_not_buildable():
    """Why this machine cannot build and run the nvcc stand-in (x86-64-v3: AVX2 and FMA), or
    None."""
    if platform.machine() != "x86_64" or shutil.which("g++") is None:
        return "needs g++ on x86-64"
    cpuinfo = Path("/proc/cpuinfo")
    if not {"avx2", "fma"} <= set(cpuinfo.read_text().split() if cpuinfo.exists() else []):
        return "needs a CPU with AVX2 and FMA"
    probe = [*COMMON, "-march=x86-64-v3", "-x", "c++", "-E", "-o", "/dev/null", "/dev/null"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return "needs g++ with C++20 and -march=x86-64-v3"
    return None


def build(tmp_path, name, flags):
    exe = tmp_path / name
    subprocess.run([*COMMON, *flags, str(SOURCE), "-o", str(exe)], check=True)
    return exe


def checksums(exe, args):
    out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert len(lines) == 64, out  # {adam, rmsprop} x {float, double} x 16 option combinations
    return lines


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    why = _why_not_buildable()  # here, not at import: only when these tests run
    if why is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("contraction")
    return {
        "host": build(tmp, "host", AS_HOST),
        "nvcc": build(tmp, "nvcc", AS_NVCC),
        # The nvcc stand-in without mul_'s device branch: RMSprop's buf * momentum + g / avg
        # then fuses, which torch rounds twice; the check must see it.
        "unguarded": build(tmp, "unguarded", [a for a in AS_NVCC if a != "-DFASTNN_EMULATE_NVCC"]),
    }


@pytest.mark.parametrize("args", HYPERPARAMETERS, ids=["torch-defaults", "odd", "fusable-decay"])
def test_every_multiply_add_rounds_as_on_the_host(builds, args):
    host, nvcc = checksums(builds["host"], args), checksums(builds["nvcc"], args)
    differ = [f"{a}  vs  {b}" for a, b in zip(host, nvcc, strict=True) if a != b]
    assert not differ, "contracted build differs:\n" + "\n".join(differ)


def test_the_check_sees_an_unguarded_product(builds):
    args = HYPERPARAMETERS[0]
    host, unguarded = checksums(builds["host"], args), checksums(builds["unguarded"], args)
    pairs = zip(host, unguarded, strict=True)
    differ = {line.rsplit(" ", 1)[0] for line, other in pairs if line != other}
    momentum = {f"rmsprop {m} {f:2d}" for m in ("float", "double") for f in range(16) if f & 4}
    assert differ == momentum
