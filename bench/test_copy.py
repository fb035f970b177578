"""The memory-bandwidth ceiling, measured in the same run as the kernels: a large
device-to-device `dst.copy_(src)`, bytes read plus bytes written. report.py expresses every
kernel's GB/s as a percentage of this.

On the CPU the copy's ordinary stores read each destination line before writing it, so 3 bytes
move for the 2 counted. A kernel writing a fresh output (the norms, the GLU family) pays the
same and stays comparable; an in-place update (the optimizers) does not, and can pass 100%
(Adam 153% on the 2-core dev VM, bench/results/cpu-amd-epyc-2026-11-28)."""

import pytest
import torch

from bench import harness

# fp32 elements: 1 GiB on a GPU (20x its ~50 MB L2), 64 MiB on the CPU, 16 KiB for the smoke run.
ELEMENTS = {"cuda": 2**28, "cpu": 2**24, "smoke": 2**12}


@pytest.mark.headline
def test_copy(benchmark):
    n = ELEMENTS[harness.profile()]
    src = harness.randn((n,), torch.float32)
    dst = torch.empty_like(src)
    harness.run(
        benchmark,
        lambda: dst.copy_(src),
        nbytes=2 * src.nbytes,
        info={"op": "copy", "mode": "copy", "impl": "torch", "dtype": "fp32", "shape": [n]},
    )
    assert torch.equal(dst, src)
