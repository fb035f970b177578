"""Loads the compiled extension `fastnn._C` (the `native` backend) and explains why when it
cannot. Loading registers the C++ schemas and kernels with the dispatcher; it queries no device.
"""

import importlib

import torch

_error = None  # why the extension is unavailable, once load() has failed
_loaded = False


def build_info():
    """What the extension was built against (written by setup.py), or None without a build."""
    try:
        return importlib.import_module("fastnn._build_info")
    except ImportError:
        return None


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def load():
    """Import fastnn._C once; returns True when it is loaded. Never raises."""
    global _error, _loaded
    if _loaded or _error is not None:
        return _loaded
    info = build_info()
    if info is not None and _major_minor(info.TORCH_VERSION) != _major_minor(torch.__version__):
        # torch's C++ ABI changes between minor releases: loading would fail with an undefined
        # symbol, or worse, load and crash. Say what to do instead.
        _error = (
            f"fastnn._C was built against torch {info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild fastnn against this torch "
            "(pip install --no-build-isolation .) or install the matching torch"
        )
        return False
    try:
        importlib.import_module("fastnn._C")
    except ImportError as e:
        if info is None:
            _error = (
                "the fastnn._C extension is not built (pure-Python install); build it with "
                "`make setup` or `pip install --no-build-isolation .`"
            )
        else:
            _error = f"the fastnn._C extension failed to load: {e}"
        return False
    _loaded = True
    return True


def error():
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return _error
