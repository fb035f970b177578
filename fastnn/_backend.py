"""Backend selection: which implementation (`torch`, `native`, `triton`) runs an op.

`auto` (the default) picks, per op family and device, the first available backend in
auto_order(family, device). A forced backend that cannot run raises BackendUnavailableError saying why and what
to do; it never silently falls back. The choice is read from FASTNN_BACKEND once at import and
changed with set_backend() / use_backend(); it is process-global (not per thread).
"""

import contextlib
import importlib.util
import os

import torch

from fastnn import _extension
from fastnn._arch import arch_covers

BACKENDS = ("auto", "torch", "native", "triton")

# Preference of `auto`, per device type. Triton on a CPU runs only under the interpreter, which
# is for tests (about 1 ms per program), so auto never picks it there.
AUTO_ORDER = {
    "cpu": ("native", "torch"),
    "cuda": ("native", "triton", "torch"),
}
# Families whose Triton kernels measured faster than the native ones on CUDA: H100, 2026-11-27,
# commit f011790 (bench/results/nvidia-h100-80gb-hbm3-2026-11-27), % of copy, Triton / native.
# bf16, 32768 rows: RMSNorm forward 93-99 / 89-92 at N = 1K-8K (54 / 66 at 64K), backward
# 74-87 / 65-76 at 1K-8K and 43-57 / 34-41 at 16K-64K; LayerNorm at N = 4K forward 97 / 84,
# backward 82 / 77. fp32 [16384, 4096]: forwards within 1%, backwards native ahead (RMSNorm
# 88 / 91, LayerNorm 73 / 80). GLU (both at 101% of copy, H200, 2026-11-26) and the optimizers
# (native 1.01x Triton, H100) stay native. Re-measure when either side's norm kernels change.
AUTO_ORDER_BY_FAMILY = {
    ("rms_norm", "cuda"): ("triton", "native", "torch"),
    ("layer_norm", "cuda"): ("triton", "native", "torch"),
}


def auto_order(family, device_type):
    """The backends `auto` tries for `family` on `device_type`, preferred first."""
    default = AUTO_ORDER.get(device_type, ("torch",))
    return AUTO_ORDER_BY_FAMILY.get((family, device_type), default)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the requested device."""


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f"fastnn: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_current = _validate(os.environ.get("FASTNN_BACKEND", "auto").strip().lower() or "auto")


def get_backend():
    """The forced backend name, or 'auto'."""
    return _current


def set_backend(name):
    """Force `name` ('torch', 'native', 'triton') for every op, or 'auto' to choose per op."""
    global _current
    _current = _validate(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager: force backend `name` inside the block, restore the previous one after."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# Op families and where their kernels live, filled in by fastnn/ops/*.py.
# family -> (native schema name, triton kernel module)
_FAMILIES = {}


def register_family(family, native_op, triton_module):
    _FAMILIES[family] = (native_op, triton_module)


def unavailable_reason(backend, family, device_type):
    """None when `backend` can run `family` on `device_type`, else a sentence saying why."""
    if backend == "torch":
        return None
    native_op, triton_module = _FAMILIES[family]
    if backend == "native":
        if not _extension.load():
            return _extension.error()
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastnn::{native_op}", key
        ):
            info = _extension.build_info()
            built_without_cuda = info is None or getattr(info, "CUDA_VERSION", None) is None
            hint = (
                "; the extension was built without CUDA (needs a CUDA build of torch and the "
                "CUDA toolkit; see FASTNN_BUILD_CUDA)"
                if device_type == "cuda" and built_without_cuda
                else ""
            )
            return f"the native extension has no {device_type} kernel for {family}{hint}"
        return _uncovered_gpu_reason() if device_type == "cuda" else None
    if backend == "triton":
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "Triton kernels run on CUDA tensors; on a CPU only under the interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)"
            )
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if importlib.util.find_spec(triton_module) is None:
            return f"there is no Triton kernel for {family} yet"
        return None
    raise ValueError(f"fastnn: unknown backend {backend!r}")


def _uncovered_gpu_reason():
    """Why the extension's CUDA kernels cannot run on the current GPU (its arch is not among the
    built ones: an sm_90-only build on an A100), else None. Asked only once CUDA is initialised,
    as it is when an op meets a CUDA tensor, so that `fastnn info` still touches no device."""
    archs = getattr(_extension.build_info(), "CUDA_ARCHS", "")
    if not archs or not torch.cuda.is_initialized():
        return None
    # The current device's: choices are made per device type, and machines mixing GPU models
    # are rare.
    capability = torch.cuda.get_device_capability(torch.cuda.current_device())
    try:
        if arch_covers(archs, capability):
            return None
    except ValueError:  # an arch name this fastnn does not know (a newer torch's): assume so
        return None
    return (
        f"the native extension was built for CUDA archs {archs}, which do not run on this "
        f"GPU (compute capability {capability[0]}.{capability[1]}); rebuild with "
        f"TORCH_CUDA_ARCH_LIST including it"
    )


_resolved = {}


def _resolve(family, device_type, forced):
    # Cached and marked constant: torch.compile bakes the choice into the graph (it guards on
    # the forced name, which callers read outside this function) instead of tracing the checks.
    key = (family, device_type, forced)
    if key in _resolved:
        return _resolved[key]
    if forced != "auto":
        why = unavailable_reason(forced, family, device_type)
        if why is not None:
            raise BackendUnavailableError(
                f"fastnn: backend {forced!r} cannot run {family} on {device_type}: {why}"
            )
        choice = forced
    else:
        choice = next(
            b
            for b in auto_order(family, device_type)
            if unavailable_reason(b, family, device_type) is None
        )
    # Before CUDA is initialised the GPU's arch was not checked (_uncovered_gpu_reason): such a
    # CUDA choice (`fastnn info`, say) is not kept.
    if device_type != "cuda" or torch.cuda.is_initialized():
        _resolved[key] = choice
    return choice


# What torch.compiler.assume_constant_result(_resolve) does, without importing torch._dynamo:
# that import takes about 1.4 s and pulls in triton, and `import fastnn` must stay lean.
# tests/test_backend.py compiles with fullgraph=True, so a change in this marker would fail there.
_resolve._dynamo_marked_constant = True


def resolve(family, device_type):
    """The backend that runs `family` on tensors of `device_type`."""
    return _resolve(family, device_type, _current)


def clear_cache():
    """Forget resolved choices (tests that change the environment use this)."""
    _resolved.clear()
