"""Loads the compiled extension `fastnn._C` (the `native` backend) and explains why when it
cannot. Loading registers the C++ schemas and kernels with the dispatcher; it queries no device.

setup.py writes fastnn/_build_info.py next to the extension (VARIANT 'cuda', 'cpu' or 'pure',
TORCH_VERSION, CUDA_VERSION, CUDA_TOOLKIT, CUDA_ARCHS, CXX11_ABI). Before importing `_C`, load()
compares it with the running torch: the kernels use torch's C++ API, whose ABI changes between
torch minor releases, so a mismatched extension fails with an undefined symbol (or loads and
crashes). Checking first turns that into a sentence that says what to install.
"""

import importlib
import warnings

import torch

_error = None  # why the extension is unavailable, once load() has failed
_loaded = False

REBUILD = (
    "`make build` in a source checkout, or `pip install --no-build-isolation --force-reinstall "
    "--no-deps .` from a source tree (wheel users: install the fastnn wheel built for this torch)"
)


def build_info():
    """What the extension was built against (written by setup.py), or None without a build."""
    try:
        return importlib.import_module("fastnn._build_info")
    except ImportError:
        return None


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def running_torch():
    """The facts of the running torch that a built extension must match."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def mismatch(info, running=None):
    """Why an extension built as `info` cannot load into `running` (a running_torch() dict,
    default this process's torch), or None when it can."""
    running = running_torch() if running is None else running
    torch_version, torch_cuda, cxx11_abi = running["torch"], running["cuda"], running["cxx11_abi"]
    variant = getattr(info, "VARIANT", "cuda" if getattr(info, "CUDA_VERSION", None) else "cpu")
    if variant == "pure":
        return (
            "this fastnn is a pure-Python build (FASTNN_NO_EXTENSION=1) without the fastnn._C "
            f"extension; install a binary wheel or build it: {REBUILD}"
        )
    built = info.TORCH_VERSION
    if _major_minor(built) != _major_minor(torch_version):
        # torch's C++ ABI changes between minor releases: loading would fail with an undefined
        # symbol, or worse, load and crash. Say what to do instead.
        mm = ".".join(_major_minor(built))
        return (
            f"fastnn._C was built against torch {built} but torch {torch_version} is installed; "
            f"install a fastnn wheel built for torch {'.'.join(_major_minor(torch_version))}, "
            f"or torch=={mm}.*, or rebuild fastnn against this torch: {REBUILD}"
        )
    built_cuda = getattr(info, "CUDA_VERSION", None)
    if variant == "cuda" and torch_cuda is None:
        return (
            f"fastnn._C was built with CUDA {built_cuda} kernels (torch {built}) but this torch "
            f"({torch_version}) is a CPU-only build, which lacks the CUDA libraries they link; "
            "install the CPU-only fastnn wheel (built with FASTNN_BUILD_CUDA=0) or a CUDA build "
            "of torch"
        )
    if variant == "cuda" and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"fastnn._C was built for CUDA {built_cuda} (torch {built}) but this torch uses CUDA "
            f"{torch_cuda} ({torch_version}); CUDA major versions do not share a runtime library. "
            f"Install a fastnn wheel built for CUDA {torch_cuda}, or rebuild: {REBUILD}"
        )
    built_abi = getattr(info, "CXX11_ABI", None)
    if built_abi is not None and bool(built_abi) != bool(cxx11_abi):
        return (
            f"fastnn._C was built with _GLIBCXX_USE_CXX11_ABI={int(built_abi)} but this torch "
            f"uses {int(bool(cxx11_abi))}; rebuild fastnn against this torch: {REBUILD}"
        )
    return None


def load():
    """Import fastnn._C once; returns True when it is loaded. Never raises."""
    global _error, _loaded
    if _loaded or _error is not None:
        return _loaded
    info = build_info()
    if info is not None:
        _error = mismatch(info)
    # A pure-Python install, built so (VARIANT pure) or from a source tree never built, went
    # without the extension by choice: nothing to warn about.
    chosen = getattr(info, "VARIANT", None) == "pure"
    try:
        if _error is None:
            importlib.import_module("fastnn._C")
    except ImportError as e:
        if info is None and isinstance(e, ModuleNotFoundError) and e.name == "fastnn._C":
            chosen = True
            _error = (
                "the fastnn._C extension is not built (pure-Python install); build it: "
                f"`make setup` or {REBUILD}"
            )
        else:  # an extension file that does not load, with or without its build info
            _error = f"the fastnn._C extension failed to load: {e}; rebuild it: {REBUILD}"
    if _error is not None:
        if not chosen:
            # A built extension that cannot load is a broken install, not a choice: say so once
            # instead of running every op on the (slow) torch backend unannounced.
            warnings.warn(
                f"fastnn: native kernels unavailable, `auto` uses the other backends: {_error}",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    _loaded = True
    return True


def error():
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return _error
