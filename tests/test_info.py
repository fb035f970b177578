"""`python -m fastnn info` reports the right facts, and a torch / CUDA / ABI mismatch between the
built extension and the running torch gives a readable error instead of an undefined symbol."""

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import fastnn
from fastnn import _backend, _extension, ops

ROOT = Path(__file__).resolve().parents[1]


def run_python(args, cwd=ROOT, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTNN_BACKEND", "PYTHONPATH")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def info_json(cwd=ROOT, env=None):
    return json.loads(run_python(["-m", "fastnn", "info", "--json"], cwd=cwd, env=env))


def expected_choice(family, device):
    """What `auto` must pick, from the dispatcher and installed packages directly."""
    native_op, triton_module = _backend._FAMILIES[family]
    native = _extension.load() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastnn::{native_op}", device.upper()
    )
    triton = device == "cuda" and all(
        importlib.util.find_spec(m) is not None for m in ("triton", triton_module)
    )
    # On CUDA the norms prefer Triton (measured faster there), the other families native.
    order = ("triton", "native") if family in ("rms_norm", "layer_norm") else ("native", "triton")
    found = {"native": native, "triton": triton}
    return next((b for b in order if found[b]), "torch")


def test_info_reports_versions_build_and_choices():
    facts = info_json()
    assert facts["fastnn"] == fastnn.__version__
    assert facts["location"] == str(ROOT / "fastnn")
    assert facts["python"] == platform.python_version()
    assert facts["torch"] == torch.__version__
    assert facts["torch_cuda"] == torch.version.cuda
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    assert facts["triton"] == triton_version

    ext = facts["extension"]
    assert ext["loaded"] == _extension.load()
    assert ext["error"] == _extension.error()
    info = _extension.build_info()
    if info is not None:
        assert ext["variant"] == info.VARIANT
        assert ext["torch"] == info.TORCH_VERSION
        assert ext["cuda"] == info.CUDA_VERSION
        assert ext["cuda_archs"] == info.CUDA_ARCHS
    if ext["loaded"]:
        assert Path(ext["path"]).parent == ROOT / "fastnn"

    assert facts["ops"] == sorted(ops._SCHEMAS)
    for device in ("cpu", "cuda"):
        have = [
            name
            for name in facts["ops"]
            if _extension.load()
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnn::{name}", device.upper())
        ]
        assert facts["native_kernels"][device] == have
    if ext["variant"] == "cpu":
        assert facts["native_kernels"]["cuda"] == []

    assert facts["backend"] == "auto"
    assert sorted(facts["families"]) == sorted(_backend._FAMILIES)
    for family, per_device in facts["families"].items():
        for device in ("cpu", "cuda"):
            assert per_device[device]["backend"] == expected_choice(family, device), family
    assert facts["devices"] is None  # not queried without --devices


def test_info_text_initialises_no_cuda_and_imports_no_triton():
    code = (
        "import sys, torch\n"
        "from fastnn.__main__ import main\n"
        "main(['info'])\n"
        "print('CUDA_INIT', torch.cuda.is_initialized(), 'TRITON', 'triton' in sys.modules)\n"
    )
    text = run_python(["-c", code])
    assert text.strip().splitlines()[-1] == "CUDA_INIT False TRITON False"
    assert f"torch {torch.__version__}" in text
    assert "backend: auto (FASTNN_BACKEND unset)" in text
    for family in _backend._FAMILIES:
        assert f"\n{family} " in text


def test_info_reports_backend_forced_by_env():
    facts = info_json(env={"FASTNN_BACKEND": "torch"})
    assert facts["backend"] == "torch" and facts["backend_env"] == "torch"
    for per_device in facts["families"].values():
        assert per_device["cpu"]["backend"] == per_device["cuda"]["backend"] == "torch"


def test_info_forced_backend_that_cannot_run_says_why(monkeypatch):
    from fastnn.__main__ import collect

    # Triton on CPU tensors needs the interpreter; without it the forced choice is an error.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backend.clear_cache()
    try:
        with fastnn.use_backend("triton"):
            facts = collect()
    finally:
        _backend.clear_cache()
    assert facts["backend"] == "triton"
    for per_device in facts["families"].values():
        assert per_device["cpu"]["backend"] is None
        assert "interpreter" in per_device["cpu"]["why"]["triton"]


@pytest.mark.parametrize(
    ("entry", "capability", "covered"),
    [
        ("8.0;8.6;8.9;9.0+PTX", (8, 0), True),
        ("8.0;8.6;8.9;9.0+PTX", (8, 7), True),  # sm_86 code runs on 8.7
        ("8.0;8.6;8.9;9.0+PTX", (10, 0), True),  # compute_90 PTX, JIT-compiled
        ("8.0;8.6;8.9;9.0+PTX", (7, 5), False),
        ("8.0;8.6;8.9;9.0", (10, 0), False),  # no PTX: machine code only runs within a major
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),
        ("9.0", (9, 0), True),
        ("9.0a+PTX", (12, 0), False),  # compute_90a PTX runs on 9.0 only
        ("Ampere;Hopper", (9, 0), True),  # torch's arch names
        ("Ampere", (8, 9), True),  # sm_86 code
        ("Ampere", (12, 0), True),  # compute_86 PTX
        ("Turing", (7, 0), False),
    ],
)
def test_arch_coverage(entry, capability, covered):
    from fastnn._arch import arch_covers

    assert arch_covers(entry, capability) is covered


# ---- Build-info mismatches -----------------------------------------------------------------------

RUNNING = {"torch": "2.14.1+cu130", "cuda": "13.0", "cxx11_abi": True}


def build(**kw):
    facts = dict(VARIANT="cuda", TORCH_VERSION="2.14.1+cu130", CUDA_VERSION="13.0", CXX11_ABI=True)
    facts.update(kw)
    return types.SimpleNamespace(**facts)


@pytest.mark.parametrize(
    ("info", "running", "expected"),
    [
        (build(), RUNNING, None),
        (build(TORCH_VERSION="2.14.0+cu130"), RUNNING, None),  # patch releases keep the ABI
        (build(CUDA_VERSION="13.2"), RUNNING, None),  # one CUDA major shares libcudart
        (build(VARIANT="cpu", CUDA_VERSION=None), {**RUNNING, "cuda": None}, None),
        (build(TORCH_VERSION="2.13.0+cu130"), RUNNING, "built against torch 2.13.0+cu130"),
        (build(), {**RUNNING, "torch": "2.14.1+cpu", "cuda": None}, "is a CPU-only build"),
        (build(CUDA_VERSION="12.8"), RUNNING, "CUDA major versions"),
        (build(CXX11_ABI=False), RUNNING, "_GLIBCXX_USE_CXX11_ABI=0"),
        (build(VARIANT="pure"), RUNNING, "pure-Python build"),
    ],
)
def test_mismatch_messages(info, running, expected):
    why = _extension.mismatch(info, running)
    if expected is None:
        assert why is None
    else:
        assert expected in why
        assert "install" in why  # and says what to do


def test_old_build_info_without_variant_still_checked():
    # A build-info file from before VARIANT existed is judged by its CUDA_VERSION.
    info = types.SimpleNamespace(TORCH_VERSION="2.14.1+cu130", CUDA_VERSION="13.0")
    assert "CPU-only" in _extension.mismatch(info, {**RUNNING, "cuda": None})


@pytest.fixture
def forged_copy(tmp_path):
    """A copy of the built package whose build info claims another torch minor release."""
    if _extension.build_info() is None or not _extension.load():
        pytest.skip("needs the built extension")
    dst = tmp_path / "fastnn"
    shutil.copytree(ROOT / "fastnn", dst, ignore=shutil.ignore_patterns("__pycache__"))
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    forged = f"{major}.{int(minor) - 1}.0"
    text = (dst / "_build_info.py").read_text()
    text = text.replace(repr(_extension.build_info().TORCH_VERSION), repr(forged))
    assert repr(forged) in text
    (dst / "_build_info.py").write_text(text)
    return tmp_path, forged


def test_forged_torch_mismatch_gives_readable_error(forged_copy):
    where, forged = forged_copy
    code = (
        "import sys, torch, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastnn\n"
        "print('WARNED', any('native kernels unavailable' in str(w.message) for w in caught))\n"
        "from fastnn import _extension\n"
        "print('LOCATION', fastnn.__file__)\n"
        "print('LOADED', _extension.load(), 'fastnn._C' in sys.modules)\n"
        "fastnn.set_backend('native')\n"
        "try:\n"
        "    fastnn.functional.rms_norm(torch.randn(2, 8), (8,))\n"
        "except fastnn.BackendUnavailableError as e:\n"
        "    print('ERROR', e)\n"
        "fastnn.set_backend('auto')\n"
        "from fastnn.__main__ import collect\n"
        "import json; print('FACTS', json.dumps(collect()))\n"
    )
    out = run_python(["-c", code], cwd=where)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["LOCATION"] == str(where / "fastnn" / "__init__.py")
    assert lines["LOADED"] == "False False"  # refused before importing fastnn._C
    assert lines["WARNED"] == "True"  # said once at import, not only by `fastnn info`
    error = lines["ERROR"]
    assert f"built against torch {forged}" in error and torch.__version__ in error
    assert "undefined symbol" not in error

    facts = json.loads(lines["FACTS"])
    assert facts["location"] == str(where / "fastnn")
    assert not facts["extension"]["loaded"]
    assert f"built against torch {forged}" in facts["extension"]["error"]
    assert all(f["cpu"]["backend"] == "torch" for f in facts["families"].values())


def _load_with(monkeypatch, info, import_error):
    """_extension.load() afresh with build info `info` and fastnn._C's import raising
    `import_error`; returns (the warnings it gave, the error it recorded)."""
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setattr(_extension, "build_info", lambda: info)

    def import_module(name):
        assert name == "fastnn._C"
        raise import_error

    monkeypatch.setattr(_extension.importlib, "import_module", import_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _extension.load()
    return [str(w.message) for w in caught], _extension.error()


def test_a_pure_python_install_does_not_warn(monkeypatch):
    """Without the extension by choice (a pure build, or a checkout never built): no warning."""
    not_found = ModuleNotFoundError("No module named 'fastnn._C'", name="fastnn._C")
    caught, error = _load_with(monkeypatch, types.SimpleNamespace(VARIANT="pure"), not_found)
    assert caught == [] and "pure-Python build" in error
    caught, error = _load_with(monkeypatch, None, not_found)
    assert caught == [] and "not built" in error


def test_an_extension_that_does_not_load_is_not_called_unbuilt(monkeypatch):
    """A _C file that cannot load, build info or not, is a broken install: said at import."""
    broken = ImportError("fastnn/_C.abi3.so: file too short", name="fastnn._C")
    caught, error = _load_with(monkeypatch, None, broken)
    assert "failed to load" in error and "file too short" in error
    assert len(caught) == 1 and "native kernels unavailable" in caught[0]
