"""Register budgets of the Triton norm kernels, checked without a GPU: every tier the launchers
pick is compiled for sm_90 (bench/kernel_resources.py) and ptxas's report read.

The contract is register-resident rows: a row tile that does not fit shows as hundreds of bytes
of spill stores per thread (a whole 64K bf16 row over 16 warps spills 240 B). ptxas itself
sometimes parks a register or two to reach an occupancy step (4 B at 48 registers for the fp32
LayerNorm forward at N = 4096, 8 B at the fp32 caps), so up to 16 B, four registers, passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_SPILL_BYTES = 16


@pytest.fixture(scope="module")
def launches():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0 and "no ptxas in this triton" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _name(launch):
    return (
        f"{launch['op']} N={launch['n']} {launch['dtype']} residual={launch['residual']} "
        f"{launch['kernel']} ({launch['num_warps']} warps, {launch['regs']} registers)"
    )


def test_every_tier_was_compiled(launches):
    kernels = {launch["kernel"] for launch in launches}
    for op in ("rms", "ln"):
        for kind in ("fwd", "bwd", "rowdot", "bwd_cols"):
            assert f"_{op}_{kind}_kernel" in kernels


def test_rows_stay_in_registers(launches):
    spilled = [f"{_name(x)}: {x['spill']} B" for x in launches if x["spill"] > MAX_SPILL_BYTES]
    assert not spilled, "spill stores per thread:\n" + "\n".join(spilled)
