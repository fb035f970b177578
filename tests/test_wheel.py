"""The wheel, end to end: built from this tree with tools/build_wheel.sh, installed into a fresh
virtual environment outside the source tree that reuses this torch, imported from there, every
op run on the native CPU backend against the fp64 reference, and, for a CUDA build, its CUDA
kernels found registered.

Variant (FASTNN_WHEEL_TEST_VARIANT): `cuda` by default when torch is a CUDA build and nvcc is on
PATH (as in CI), so the CUDA registration check runs there; else `cpu` (FASTNN_BUILD_CUDA=0).
Measured from scratch on this 2-core machine (shared: load average 7-15), MAX_JOBS=2,
6 C++ sources and 3 .cu files: the CPU-only wheel took 124 s CPU (392 s wall); the CUDA wheel for
the one arch 9.0 took 279 s CPU (1185 s wall), nvcc costing about 50 s CPU per .cu file. The whole
test (build, venv, install, run) took 94-145 s CPU: 11-13 min wall at that load, 139 s wall at
load 4 recompiling 4 of the 6 sources, 25 s when nothing changed.
`cuda` builds for FASTNN_WHEEL_TEST_ARCH (default 9.0) and also checks the CUDA kernels. Objects
are kept in build/wheel-test-<variant>, so a rerun recompiles only changed sources.
"""

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from tolerances import FORWARD, PARAM_GRAD, RTOL, assert_ratio_close, rel_error

from fastnn import _extension, ops

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VARIANT = os.environ.get(
    "FASTNN_WHEEL_TEST_VARIANT", "cuda" if torch.version.cuda and shutil.which("nvcc") else "cpu"
)
ARCH = os.environ.get("FASTNN_WHEEL_TEST_ARCH", "9.0")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if VARIANT == "cuda" and torch.version.cuda is None:
        pytest.skip("a CUDA wheel needs a CUDA build of torch")
    dist = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "DIST": str(dist),
        "PY": sys.executable,
        "FASTNN_BUILD_DIR": str(ROOT / "build" / f"wheel-test-{VARIANT}"),
        "TORCH_CUDA_ARCH_LIST": ARCH,
    }
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / "wheel-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not share a build folder at once
        _run(["bash", "tools/build_wheel.sh", VARIANT], cwd=ROOT, env=env, timeout=1800)
    (whl,) = dist.glob("fastnn-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv (outside the source tree) with the wheel installed and, through a .pth file
    added after the install, this environment's site-packages (torch) behind its own."""
    root = tmp_path_factory.mktemp("venv")
    assert ROOT not in root.parents
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")])
    python = root / "env" / "bin" / "python"
    # pip from this environment installs into the new one; --no-deps: torch comes from the .pth.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(wheel)])  # fmt: skip
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # A path line in a .pth only appends the folder; .pth files inside it (this tree's editable
    # fastnn) are not run, and the venv's own site-packages stays first.
    Path(site.strip(), "zz_torch_from_dev_env.pth").write_text(sysconfig.get_paths()["purelib"])
    return root, python


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta).decode()
        tags = whl.read(meta.replace("METADATA", "WHEEL")).decode()
        build_info = whl.read("fastnn/_build_info.py").decode()
    assert "Tag: cp310-abi3-linux_x86_64" in tags
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert f"Requires-Dist: torch=={major}.{minor}.*\n" in metadata
    label = f"cu{torch.version.cuda.replace('.', '')}" if VARIANT == "cuda" else "cpu"
    assert f"Version: 0.1.0+{label}.torch{major}.{minor}\n" in metadata
    assert f"VARIANT = {VARIANT!r}" in build_info
    assert f"TORCH_VERSION = {torch.__version__!r}" in build_info
    assert "fastnn/_C.abi3.so" in names
    # Every Python module of the package (Triton kernels included) and nothing top-level besides.
    sources = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "fastnn").rglob("*.py")
        if p.name != "_build_info.py" and "__pycache__" not in p.parts
    }
    assert sources <= names, sources - names
    assert "fastnn/triton_kernels/__init__.py" in names
    assert {n.split("/")[0] for n in names} == {"fastnn", meta.split("/")[0]}


def _cases():
    """(op name, args, kwargs) with fp32 inputs covering every op in the schema: odd N = 33,
    residual / weight / bias given and not, every GLU activation, Adam and RMSprop options."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, positive=False):
        t = torch.randn(*shape, generator=g)
        return t.abs() + 0.1 if positive else t

    rows, n, eps = 5, 33, 1e-5
    x, r, w, b, dy = rand(rows, n), rand(rows, n), rand(n), rand(n), rand(rows, n)
    cases = []
    for res, weight, bias in ((r, w, b), (None, None, None)):
        _, s, rstd = ops.get("torch", "rms_norm_fwd")(x, res, weight, eps)
        _, s_ln, mean, rstd_ln = ops.get("torch", "layer_norm_fwd")(x, res, weight, bias, eps)
        dres = dy.flip(0) if res is not None else None
        cases += [
            ("rms_norm_fwd", (x, res, weight, eps), {}),
            ("rms_norm_bwd", (dy, dres, s if res is not None else x, weight, rstd), {}),
            ("layer_norm_fwd", (x, res, weight, bias, eps), {}),
            ("layer_norm_bwd", (dy, dres, s_ln if res is not None else x, weight, bias, mean,
                                rstd_ln), {}),
        ]  # fmt: skip
    gate, up, gate_up = rand(rows, n), rand(rows, n), rand(rows, 2 * n)
    for act in ACTIVATIONS:
        cases += [
            ("glu_fwd", (gate, up, act), {}),
            ("glu_bwd", (dy, gate, up, act), {}),
            ("glu_packed_fwd", (gate_up, act), {}),
            ("glu_packed_bwd", (dy, gate_up, act), {}),
            # The in-place backward writes over its own copies (the cases share gate / up).
            ("glu_bwd_", (dy, gate.clone(), up.clone(), act), {}),
            ("glu_packed_bwd_", (dy, gate_up.clone(), act), {}),
        ]
    shapes = [(n,), (rows, 7)]
    params = [rand(*s) for s in shapes]
    grads = [rand(*s) for s in shapes]
    # Each update op and its *_keep_grads_ twin (grads only read), on fresh state.
    for name, (amsgrad, decoupled) in itertools.product(
        ("adam_step_", "adam_step_keep_grads_"), ((False, True), (True, False))
    ):
        adam_args = (
            [p.clone() for p in params], grads, [rand(*s) for s in shapes],
            [rand(*s, positive=True) for s in shapes],
            [rand(*s, positive=True) for s in shapes] if amsgrad else [],
            [torch.tensor(3.0) for _ in shapes], [], None, None, None,
        )  # fmt: skip
        adam_kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                       decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=False)  # fmt: skip
        cases.append((name, adam_args, adam_kw))
    for name, (centered, momentum) in itertools.product(
        ("rmsprop_step_", "rmsprop_step_keep_grads_"), ((True, 0.9), (False, 0.0))
    ):
        rms_args = (
            [p.clone() for p in params], grads, [rand(*s, positive=True) for s in shapes],
            [rand(*s) * 0.1 for s in shapes] if centered else [],
            [rand(*s) for s in shapes] if momentum else [],
            [torch.tensor(3.0) for _ in shapes], [], None, None, None,
        )  # fmt: skip
        rms_kw = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=momentum,
                      centered=centered, maximize=False)  # fmt: skip
        cases.append((name, rms_args, rms_kw))
    return cases


# Runs inside the venv: import the installed fastnn, report where it lives and what it has, and
# run every case on the native CPU kernels. Returns (outputs, mutated args) per case.
VENV_SCRIPT = r"""
import json, sys, torch
import fastnn
from fastnn import _extension, ops
from fastnn.__main__ import collect

cases = torch.load(sys.argv[1])
results = []
for name, args, kwargs in cases:
    out = getattr(torch.ops.fastnn, name)(*args, **kwargs) if _extension.load() else None
    results.append((out, args))
torch.save(results, sys.argv[2])
print(json.dumps({"file": fastnn.__file__, "info": collect()}))
"""


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flatten(item)]
    return []


@pytest.fixture(scope="module")
def installed(venv):
    root, python = venv
    cases = _cases()
    torch.save(cases, root / "cases.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTNN_BACKEND")}
    out = _run(
        [str(python), "-c", VENV_SCRIPT, str(root / "cases.pt"), str(root / "results.pt")],
        cwd=root,
        env=env,
        timeout=600,
    )
    report = json.loads(out.strip().splitlines()[-1])
    return root, cases, torch.load(root / "results.pt"), report


def test_installed_fastnn_is_the_wheel(installed, venv):
    root, _, _, report = installed
    assert Path(report["file"]).is_relative_to(root / "env"), report["file"]
    info = report["info"]
    ext = info["extension"]
    assert ext["loaded"], ext["error"]
    assert Path(ext["path"]).is_relative_to(root / "env")
    assert ext["variant"] == VARIANT and ext["torch"] == torch.__version__
    assert info["distribution"].startswith("0.1.0+")
    if VARIANT == "cuda":
        assert ext["cuda"] == torch.version.cuda and ext["cuda_archs"] == ARCH


def test_native_kernels_registered(installed):
    info = installed[3]["info"]
    all_ops = sorted(ops._SCHEMAS)
    assert info["native_kernels"]["cpu"] == all_ops, "ops without a native CPU kernel in the wheel"
    cuda = info["native_kernels"]["cuda"]
    if VARIANT == "cuda":
        # Every op with a CUDA source in the tree has its kernel registered in the installed copy.
        assert cuda, "a CUDA wheel with no CUDA kernel registered"
        if _extension.load() and getattr(_extension.build_info(), "VARIANT", None) == "cuda":
            dev = [
                op
                for op in all_ops
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnn::{op}", "CUDA")
            ]
            assert cuda == dev
    else:
        assert cuda == []
    for family in info["families"].values():
        assert family["cpu"]["backend"] == "native"


def test_every_op_on_native_cpu_matches_reference(installed):
    _, cases, results, _ = installed
    assert {name for name, _, _ in cases} == set(ops._SCHEMAS), "add a case for every new op"
    for (name, args, kwargs), (out, args_after) in zip(cases, results, strict=True):
        ref_args = [
            [t.double() for t in a]
            if isinstance(a, list)
            else a.double()
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        ]
        ref_out = ops.get("torch", name)(*ref_args, **kwargs)
        eager_args = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
        eager_out = ops.get("torch", name)(*eager_args, **kwargs)  # the same math in fp32
        got, want = _flatten((out, args_after)), _flatten((ref_out, ref_args))
        eager = _flatten((eager_out, eager_args))
        assert len(got) == len(want) == len(eager), name
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            # Reductions over rows (weight / bias grads) get the weight-grad tolerance.
            kind = PARAM_GRAD if name.endswith("norm_bwd") and i > 0 else FORWARD
            tol = RTOL[torch.float32][kind]
            what = f"{name} {args[-1] if isinstance(args[-1], str) else ''} {kwargs} output {i}"
            assert g.shape == w.shape, what
            assert rel_error(g, w) <= tol, f"{what}: {rel_error(g, w):.2e}"
            if "_step_" in name:
                # A step moves O(1) values by about lr = 1e-2, so the relative check above sees
                # little of the update; hold each element to twice eager fp32's error instead.
                assert_ratio_close(g, w, eager[i], what=what)


@pytest.mark.parametrize("local", [None, "1"], ids=["plain", "labelled"])
def test_version_label_only_when_asked(local, tmp_path):
    """`pip install fastnn-0.1.0.tar.gz` builds a wheel and refuses one whose version is not the
    archive's; the +cpu.torchX.Y label is for released wheels (tools/build_wheel.sh asks)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTNN_LOCAL_VERSION"}
    env.update(FASTNN_BUILD_CUDA="0", FASTNN_BUILD_DIR=str(tmp_path))
    if local:
        env["FASTNN_LOCAL_VERSION"] = local
    out = _run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env).split()[-1]
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert out == ("0.1.0+cpu.torch" + f"{major}.{minor}" if local else "0.1.0")
