"""The implementations a benchmark compares, each a plain callable with one signature per op.

- `eager`: torch's own op in eager mode (F.rms_norm, F.layer_norm, F.silu(g) * u);
- `compile`: torch.compile of that same eager code (static shapes, Inductor's defaults);
- `fastnn-torch`, `fastnn-native`, `fastnn-triton`: fastnn.functional with the backend forced;
- `liger`: Liger-Kernel's autograd functions, when `liger_kernel` is importable (CUDA only).

`unavailable(impl, family)` says why an implementation cannot run here (None when it can); the
benchmarks skip with that sentence, so the JSON and report show only what ran.
"""

import importlib
import importlib.util

import torch
import torch.nn.functional as F

import fastnn
from bench import harness
from fastnn import _backend

NORM_IMPLS = ("eager", "compile", "fastnn-torch", "fastnn-native", "fastnn-triton", "liger")
GLU_IMPLS = NORM_IMPLS

# One compiled function per op is called at many shapes and dtypes; Dynamo's default limit of 8
# recompiles per function would silently fall back to eager after the 8th, so raise it.
for _name, _limit in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096)):
    if hasattr(torch._dynamo.config, _name):  # named cache_size_limit before torch 2.7
        setattr(torch._dynamo.config, _name, _limit)
    else:
        torch._dynamo.config.cache_size_limit = 256


def unavailable(impl, family):
    """None when `impl` can run `family` on harness.DEVICE, else why not."""
    if impl.startswith("fastnn-"):
        backend = impl.split("-", 1)[1]
        why = _backend.unavailable_reason(backend, family, harness.DEVICE)
        return None if why is None else f"fastnn {backend} backend: {why}"
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if harness.DEVICE != "cuda":
            return "Liger-Kernel's Triton kernels run on CUDA only"
    return None


def _eager_rms_norm(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _eager_layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _eager_swiglu(g, u):
    return F.silu(g) * u


_EAGER = {"rms_norm": _eager_rms_norm, "layer_norm": _eager_layer_norm, "glu": _eager_swiglu}
_COMPILED = {}


def _compiled(family):
    if family not in _COMPILED:
        _COMPILED[family] = torch.compile(_EAGER[family], dynamic=False)
    return _COMPILED[family]


def _fastnn(family, backend):
    fn = {
        "rms_norm": lambda x, w, eps: fastnn.functional.rms_norm(x, (x.shape[-1],), w, eps),
        "layer_norm": lambda x, w, b, eps: fastnn.functional.layer_norm(
            x, (x.shape[-1],), w, b, eps
        ),
        "glu": fastnn.functional.swiglu,
    }[family]

    def run(*args):
        # The backend is chosen at forward time; autograd then calls that backend's backward.
        with fastnn.use_backend(backend):
            return fn(*args)

    return run


def _liger(family):
    if family == "rms_norm":
        cls = importlib.import_module("liger_kernel.ops.rms_norm").LigerRMSNormFunction
        # (X, W, eps, offset, casting_mode, in_place): LLaMA casting; in_place=False so dX does
        # not overwrite dY, which the timed backward reuses (in place moves the same bytes).
        return lambda x, w, eps: cls.apply(x, w, eps, 0.0, "llama", False)
    if family == "layer_norm":
        cls = importlib.import_module("liger_kernel.ops.layer_norm").LigerLayerNormFunction
        return lambda x, w, b, eps: cls.apply(x, w, b, eps)
    cls = importlib.import_module("liger_kernel.ops.swiglu").LigerSiLUMulFunction
    return cls.apply


def get(impl, family):
    """The callable of `impl` for `family` ('rms_norm', 'layer_norm' or 'glu')."""
    if impl == "eager":
        return _EAGER[family]
    if impl == "compile":
        return _compiled(family)
    if impl.startswith("fastnn-"):
        return _fastnn(family, impl.split("-", 1)[1])
    if impl == "liger":
        return _liger(family)
    raise ValueError(f"unknown implementation {impl!r}")
