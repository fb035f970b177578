"""The CPU kernels' ISA clones that this machine does not pick, against the ones it does.

Every hot CPU loop exists twice (csrc/include/fastnn/cpu_isa.h): baseline x86-64 (SSE2, 16-byte
vectors) and an AVX2 clone chosen at run time; the GLU family's and the norms' loops a third
time, as an AVX-512 clone. FASTNN_CPU_NO_AVX2=1 makes fastnn take the baseline code, FASTNN_CPU_NO_AVX512=1
the AVX2 clones; a subprocess computes every native CPU op that way on fixed inputs, this process
computes the same with the clones it picks, and the two must agree: bit for bit for the optimizer
updates (the same IEEE operations per lane, no FMA in either), within the fp32 / bf16 tolerance
of the testing guide for the norms and the GLU family (the clones contract into FMAs and sum in
another order). Sizes are odd so that both vector loops and their scalar tails run. The
subprocess also sets FASTNN_CPU_NO_HUGE_PAGES=1, the other CPU knob (fastnn/cpu_alloc.h).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import skip_unless_available
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, RTOL, rel_error

import fastnn

NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _norm_outputs(out):
    for dtype in NORM_DTYPES:
        name = str(dtype).split(".")[-1]
        x = torch.randn(37, 1003).to(dtype).requires_grad_()
        r = torch.randn(37, 1003).to(dtype).requires_grad_()
        w = torch.randn(1003).to(dtype).requires_grad_()
        b = torch.randn(1003).to(dtype).requires_grad_()
        dy = torch.randn(37, 1003).to(dtype)
        y, s = fastnn.functional.rms_norm(x, (1003,), w, 1e-6, residual=r)
        out[f"rms_norm {name} y"] = (y, dtype, FORWARD)
        grads = torch.autograd.grad((y, s), (x, r, w), (dy, dy))
        out[f"rms_norm {name} dx"] = (grads[0], dtype, INPUT_GRAD)
        out[f"rms_norm {name} dw"] = (grads[2], dtype, PARAM_GRAD)
        y = fastnn.functional.layer_norm(x, (1003,), w, b, 1e-5)
        out[f"layer_norm {name} y"] = (y, dtype, FORWARD)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        kinds = (INPUT_GRAD, PARAM_GRAD, PARAM_GRAD)
        for what, g, kind in zip(("dx", "dw", "db"), grads, kinds, strict=True):
            out[f"layer_norm {name} {what}"] = (g, dtype, kind)


def _glu_outputs(out):
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        for act in ("silu", "gelu", "gelu_tanh", "relu", "sigmoid"):
            g = (4 * torch.randn(5, 1001)).to(dtype).requires_grad_()
            u = torch.randn(5, 1001).to(dtype).requires_grad_()
            h = fastnn.functional.glu_family(g, u, activation=act)
            dg, du = torch.autograd.grad(h, (g, u), torch.randn(5, 1001).to(dtype))
            out[f"glu {act} {name} h"] = (h, dtype, FORWARD)
            out[f"glu {act} {name} dg"] = (dg, dtype, INPUT_GRAD)
            out[f"glu {act} {name} du"] = (du, dtype, INPUT_GRAD)


def _optimizer_outputs(out):
    variants = {
        "adamw amsgrad": (fastnn.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
        "adam l2": (fastnn.optim.Adam, {"weight_decay": 0.1}),
        "rmsprop centered momentum": (
            fastnn.optim.RMSprop,
            {"centered": True, "momentum": 0.9, "weight_decay": 0.1},
        ),
    }
    for name, (cls, options) in variants.items():
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in (1, 7, 1029)]
            opt = cls(params, lr=1e-2, **options)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            for i, p in enumerate(params):
                out[f"{name} {dtype} param {i}"] = (p.detach(), dtype, None)  # None: bitwise


def outputs():
    """{name: (tensor, dtype, tolerance kind or None for bitwise)} of the native CPU ops."""
    torch.manual_seed(0)
    out = {}
    with fastnn.use_backend("native"):
        _norm_outputs(out)
        _glu_outputs(out)
        _optimizer_outputs(out)
    return {k: (t.detach(), dtype, kind) for k, (t, dtype, kind) in out.items()}


if __name__ == "__main__":  # the subprocess: its results into sys.argv[1]
    torch.save(outputs(), sys.argv[1])


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])


@pytest.mark.parametrize("disabled", ["FASTNN_CPU_NO_AVX2", "FASTNN_CPU_NO_AVX512"])
def test_other_isa_matches_the_clones_picked(tmp_path, disabled):
    for family in ("rms_norm", "layer_norm", "glu", "adam", "rmsprop"):
        skip_unless_available("native", family, "cpu")
    if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        pytest.skip("the ISA clones exist on x86-64 only")
    needed = {"FASTNN_CPU_NO_AVX2": "avx2", "FASTNN_CPU_NO_AVX512": "avx512bw"}[disabled]
    if needed not in _cpu_flags():
        pytest.skip(f"this CPU has no {needed}: {disabled}=1 would change nothing")
    path = tmp_path / "other.pt"
    env = dict(os.environ, FASTNN_CPU_NO_HUGE_PAGES="1", **{disabled: "1"})
    subprocess.run(
        [sys.executable, __file__, str(path)], env=env, check=True, timeout=300,
        cwd=os.path.dirname(__file__),
    )  # fmt: skip
    other = torch.load(path)
    clones = outputs()
    assert other.keys() == clones.keys()
    for name, (want, dtype, kind) in clones.items():
        got = other[name][0]
        if kind is None:
            assert torch.equal(got, want), f"{name}: updates differ with {disabled}=1"
        else:
            err = rel_error(got, want)
            assert err <= RTOL[dtype][kind], f"{name}: {err:.2e} apart with {disabled}=1"
