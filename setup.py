"""Build fastnn and its torch extension `fastnn._C`.

Environment knobs (all optional):
  FASTNN_NO_EXTENSION=1        pure-Python install: reference and Triton backends only.
  FASTNN_BUILD_CUDA=auto|0|1   CUDA kernels: auto builds them when torch is a CUDA build and a
                               CUDA toolkit is found; 1 fails loudly when it cannot; 0 never.
  TORCH_CUDA_ARCH_LIST         archs to compile for; default DEFAULT_CUDA_ARCHS below.
  CUDA_HOME                    the toolkit; found from `nvcc` on PATH when unset, even when that
                               `nvcc` is a wrapper script that execs the real one.
  MAX_JOBS                     parallel compile jobs (ninja), as torch's cpp_extension reads it.
No GPU is needed to build: nothing here queries a device.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Ampere (A100, A10/3090), Ada (L4/4090), Hopper (H100/H200), plus PTX for newer cards to JIT.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _toolkit_from_nvcc():
    """The toolkit folder of the nvcc on PATH, looking through wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper: find the real binary it names
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match is None:
            return None
        nvcc = os.path.realpath(match.group(1).decode())
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    home = _toolkit_from_nvcc()
    if home is None and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    return home


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _extensions():
    if _flag("FASTNN_NO_EXTENSION", "0") in ("1", "true", "yes"):
        return [], {}
    build_cuda = _flag("FASTNN_BUILD_CUDA", "auto")
    if build_cuda not in ("auto", "0", "1"):
        sys.exit(f"FASTNN_BUILD_CUDA must be auto, 0 or 1, got {build_cuda!r}")
    cuda_home = _find_cuda_home() if build_cuda != "0" else None
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = build_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if build_cuda == "1" and not with_cuda:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit found"
        sys.exit(f"FASTNN_BUILD_CUDA=1 but {why}; set CUDA_HOME or use FASTNN_BUILD_CUDA=0")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").rglob("*.cu"))
    define_macros = [("Py_LIMITED_API", "0x030A0000")]  # one wheel for every CPython >= 3.10
    cxx = ["-O3", "-fopenmp", f"-DFASTNN_WITH_CUDA={int(with_cuda)}"]
    nvcc = ["-O3", "-lineinfo", "-DFASTNN_WITH_CUDA=1"]
    include_dirs = [str(ROOT / "csrc" / "include")]
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = ext_cls(
        name="fastnn._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    _write_build_info(torch, with_cuda)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _write_build_info(torch, with_cuda):
    """Record what the extension is built against, for `python -m fastnn info` and for the
    torch-version check that turns an ABI mismatch into a readable error."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    text = (
        "# Written by setup.py when the extension is built; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )
    path = ROOT / "fastnn" / "_build_info.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fastnn", "fastnn.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
