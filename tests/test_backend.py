"""Backend selection: names, forcing, errors that say why, auto's choice, torch.compile, and a
lean import (no CUDA context, no Triton)."""

import os
import subprocess
import sys

import pytest
import torch

import fastnn
from fastnn import _backend
from fastnn import functional as FF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("rms_norm", "layer_norm", "glu", "adam", "rmsprop")


def test_default_is_auto_and_names_are_checked():
    assert fastnn.get_backend() in _backend.BACKENDS
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        fastnn.set_backend("cudnn")


def test_use_backend_restores_previous():
    fastnn.set_backend("auto")
    with fastnn.use_backend("torch"):
        assert fastnn.get_backend() == "torch"
        with pytest.raises(RuntimeError), fastnn.use_backend("torch"):
            raise RuntimeError("inside")
        assert fastnn.get_backend() == "torch"
    assert fastnn.get_backend() == "auto"


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_on_cpu_picks_native_when_built_else_torch(family):
    expected = "native" if _backend.unavailable_reason("native", family, "cpu") is None else "torch"
    assert _backend.resolve(family, "cpu") == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_on_cuda_takes_the_first_available_in_the_family_order(family, monkeypatch):
    # Simulated availability: no GPU is needed to check the choice itself.
    order = _backend.auto_order(family, "cuda")
    assert order[-1] == "torch" and sorted(order) == ["native", "torch", "triton"]
    missing = set()
    monkeypatch.setattr(
        _backend, "unavailable_reason", lambda b, f, d: "missing" if b in missing else None
    )
    for expected in order:
        _backend.clear_cache()
        assert _backend._resolve(family, "cuda", "auto") == expected
        missing.add(expected)
    _backend.clear_cache()


def test_auto_on_cuda_prefers_triton_for_norms_only():
    # The measured choice (AUTO_ORDER_BY_FAMILY): Triton's norm kernels beat the native ones on
    # an H200; GLU and the optimizers stay native.
    assert [_backend.auto_order(f, "cuda")[0] for f in FAMILIES] == [
        "triton", "triton", "native", "native", "native"
    ]  # fmt: skip
    assert all(_backend.auto_order(f, "cpu") == ("native", "torch") for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_runs_everywhere(family):
    assert _backend.unavailable_reason("torch", family, "cpu") is None
    assert _backend.unavailable_reason("torch", family, "cuda") is None


def test_forced_unavailable_backend_says_why():
    # A made-up device type has no native kernel and no Triton support.
    with pytest.raises(fastnn.BackendUnavailableError, match="cannot run rms_norm on xpu"):
        _backend._resolve("rms_norm", "xpu", "native")
    with pytest.raises(fastnn.BackendUnavailableError, match="Triton kernels do not run on xpu"):
        _backend._resolve("rms_norm", "xpu", "triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.unavailable_reason("triton", "rms_norm", "cpu")
    assert why is not None and ("TRITON_INTERPRET=1" in why or "no Triton kernel" in why)


def test_missing_native_kernel_is_an_error_not_a_fallback(monkeypatch):
    # Pretend no kernel is registered: forcing native must raise, never fall back to torch.
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: False)
    _backend.clear_cache()
    try:
        if not fastnn._extension.load():
            pytest.skip("extension not built: covered by the not-built message instead")
        with fastnn.use_backend("native"), pytest.raises(fastnn.BackendUnavailableError):
            FF.rms_norm(torch.randn(2, 4), (4,))
    finally:
        monkeypatch.undo()
        _backend.clear_cache()


@pytest.mark.parametrize(
    "archs,capability,runs",
    [("9.0", (8, 0), False), ("9.0", (9, 0), True), ("8.0;8.6;8.9;9.0+PTX", (10, 0), True)],
)
def test_native_on_a_gpu_its_build_does_not_cover(monkeypatch, archs, capability, runs):
    """An sm_90-only build on an A100: auto must not pick native (its launches would fail with
    "no kernel image is available"), and forcing native names the archs. Simulated GPU."""
    if not fastnn._extension.load() or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastnn::glu_fwd", "CUDA"
    ):
        pytest.skip("the extension has no CUDA kernels here: the no-kernel message covers it")
    info = fastnn._extension.build_info()
    monkeypatch.setattr(info, "CUDA_ARCHS", archs)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = _backend.unavailable_reason("native", "glu", "cuda")
    if runs:
        assert why is None
    else:
        assert why is not None and f"archs {archs}" in why and "8.0" in why
    _backend.clear_cache()
    try:
        assert _backend._resolve("glu", "cuda", "auto") == ("native" if runs else "triton")
    finally:
        _backend.clear_cache()


def test_native_choice_touches_no_gpu_before_cuda_is_initialised(monkeypatch):
    """`fastnn info` asks for the cuda choice without a CUDA tensor: no device query then, and
    the unchecked choice is not cached for the ops that run once CUDA is up."""
    info = fastnn._extension.build_info()
    if info is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(info, "CUDA_ARCHS", "9.0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def query(*args):
        raise AssertionError("queried the GPU")

    monkeypatch.setattr(torch.cuda, "get_device_capability", query)
    assert _backend._uncovered_gpu_reason() is None
    _backend.clear_cache()
    _backend._resolve("glu", "cuda", "auto")
    assert ("glu", "cuda", "auto") not in _backend._resolved


def test_unknown_arch_name_counts_as_covered(monkeypatch):
    info = fastnn._extension.build_info()
    if info is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(info, "CUDA_ARCHS", "9.0;Feynman")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert _backend._uncovered_gpu_reason() is None


def test_env_var_forces_backend_and_bad_name_fails():
    code = "import fastnn; print(fastnn.get_backend())"
    env = dict(os.environ, FASTNN_BACKEND="torch")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    env["FASTNN_BACKEND"] = "fast"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0 and "unknown backend 'fast'" in out.stderr


def test_import_is_lean():
    """import fastnn initialises no CUDA context, imports no triton, compiles nothing."""
    code = (
        "import sys, torch, fastnn\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised by import'\n"
        "assert 'triton' not in sys.modules, 'triton imported by import fastnn'\n"
        "print('lean')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"


class _Block(torch.nn.Module):
    """A pre-norm transformer-style block built only from fastnn pieces."""

    def __init__(self, hidden=16):
        super().__init__()
        self.norm1 = fastnn.RMSNorm(hidden)
        self.mlp = fastnn.SwiGLUMLP(hidden, 2 * hidden)
        self.norm2 = fastnn.LayerNorm(hidden)

    def forward(self, x, residual):
        h, residual = self.norm1(x, residual=residual)
        h = self.mlp(h)
        return self.norm2(h, residual=residual)


def test_compile_fullgraph_block_matches_eager():
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 5, 16, requires_grad=True)
    r = torch.randn(2, 5, 16, requires_grad=True)
    out, res = block(x, r)
    (out.sum() + res.square().sum()).backward()
    grads = [t.grad.clone() for t in (x, r, *block.parameters())]
    for t in (x, r, *block.parameters()):
        t.grad = None
    compiled = torch.compile(block, fullgraph=True)
    c_out, c_res = compiled(x, r)
    (c_out.sum() + c_res.square().sum()).backward()
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_res, res)
    for g, t in zip(grads, (x, r, *block.parameters()), strict=True):
        torch.testing.assert_close(t.grad, g)


def test_compile_follows_a_backend_change():
    """The compiled graph guards on the forced backend: changing it re-traces, so forcing an
    unavailable backend raises instead of silently running the old choice."""
    fn = torch.compile(lambda x: FF.rms_norm(x, (4,)), fullgraph=True)
    x = torch.randn(3, 4)
    with fastnn.use_backend("torch"):
        torch.testing.assert_close(fn(x), torch.nn.functional.rms_norm(x, (4,)))
    if _backend.unavailable_reason("triton", "rms_norm", "cpu") is None:
        pytest.skip("every backend runs rms_norm here; nothing unavailable to force")
    with fastnn.use_backend("triton"), pytest.raises(Exception, match="cannot run rms_norm"):
        fn(x)
