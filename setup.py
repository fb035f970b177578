"""Build fastnn and its torch extension `fastnn._C`.

Environment knobs (all optional):
  FASTNN_NO_EXTENSION=1        pure-Python install: reference and Triton backends only
                               (a py3-none-any wheel).
  FASTNN_BUILD_CUDA=auto|0|1   CUDA kernels: auto builds them when torch is a CUDA build and a
                               CUDA toolkit is found; 1 fails loudly when it cannot; 0 never.
  TORCH_CUDA_ARCH_LIST         archs to compile for; default DEFAULT_CUDA_ARCHS below.
  CUDA_HOME                    the toolkit; found from `nvcc` on PATH when unset, even when that
                               `nvcc` is a wrapper script that execs the real one.
  MAX_JOBS                     parallel compile jobs (ninja), as torch's cpp_extension reads it.
  FASTNN_BUILD_DIR             build folder (default `build`); wheel builds use their own
                               (tools/build_wheel.sh) so they never touch the in-place dev build's
                               objects in build/temp.*.
  FASTNN_LOCAL_VERSION=1       a binary build's version carries a local label (below); set by
                               tools/build_wheel.sh. Off by default: pip refuses a wheel it built
                               from an sdist (fastnn-0.1.0.tar.gz) whose version differs from the
                               archive's ("inconsistent version").
No GPU is needed to build: nothing here queries a device.

A wheel with the extension is tied to the torch it was built against: the kernels use torch's
C++ API (ATen, c10, torch/library.h), whose ABI changes between torch minor releases. So its
metadata requires torch==X.Y.* and a released wheel's version carries a local label saying what
it was built against (0.1.0+cu130.torch2.14, 0.1.0+cpu.torch2.14). setup.py also writes
fastnn/_build_info.py next to the built extension; fastnn/_extension.py compares it with the
running torch and explains a mismatch instead of failing with an undefined symbol. The extension uses only CPython's limited
API (Py_LIMITED_API), so one wheel serves every CPython >= 3.10 (tag cp310-abi3).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent
# Ampere (A100, A10/3090), Ada (L4/4090), Hopper (H100/H200), plus PTX for newer cards to JIT.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# A pure-Python install works with any torch that has the torch.library API fastnn uses: tested
# with 2.14 and 2.13 (CI) and 2.11 (the GPU machines' torch), so 2.11 is the floor.
PURE_TORCH_REQUIREMENT = "torch>=2.11"
BUILD_INFO = ("fastnn", "_build_info")  # package, module: written by the build, never copied


def _base_version():
    text = (ROOT / "fastnn" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


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


def _toolkit_version(cuda_home):
    """nvcc's release, e.g. '13.0.88', or None when it cannot be read."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"\bV(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def _links_shared_libstdcxx(cxx):
    """Whether the gcc-style driver `cxx` finds libstdc++.so (it prints the bare name when not)."""
    try:
        found = subprocess.run(
            [cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True  # cannot ask: let the build report its own errors
    return os.path.isabs(found)


def _use_a_shared_libstdcxx_compiler():
    """torch's cpp_extension compiles and links with $CXX (else `c++`). A compiler that can only
    link libstdc++ statically gives the extension a private, uninitialised copy of the C++ runtime:
    every error message it formats then segfaults (seen 2026-11-25 on a GPU machine whose image
    sets CXX=/opt/gcc/bin/g++, a GCC 13.3 without libstdc++.so). Such a CXX is swapped for `c++`
    on PATH (and CC for `cc`) when that one links the shared runtime torch uses; else we stop."""
    cxx = os.environ.get("CXX")
    if not cxx or _links_shared_libstdcxx(cxx):
        return
    fallback = shutil.which("c++")
    if not fallback or not _links_shared_libstdcxx(fallback):
        sys.exit(
            f"fastnn: CXX={cxx} has no shared libstdc++ (libstdc++.so), so the extension would "
            "carry its own C++ runtime and crash on its first error message; set CXX to a "
            "compiler that links the shared libstdc++ (e.g. the system g++)"
        )
    print(f"fastnn: CXX={cxx} has no shared libstdc++; building with {fallback}", file=sys.stderr)
    os.environ["CXX"] = fallback
    if os.environ.get("CC") and shutil.which("cc"):
        os.environ["CC"] = shutil.which("cc")


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _build_info_text(facts):
    lines = ["# Written by setup.py next to the extension it describes; do not edit."]
    lines += [f"{key} = {value!r}" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def _write_if_changed(path, text):
    path = Path(path)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class build_py(_build_py):
    """Never copies a source-tree fastnn/_build_info.py (it describes the in-place dev build, not
    this one); a pure-Python build writes its own, saying it has no extension."""

    pure_info = None  # build-info text for a pure-Python build, else None

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != BUILD_INFO]

    def run(self):
        super().run()
        if self.pure_info is not None:
            _write_if_changed(
                Path(self.build_lib, *BUILD_INFO[:-1], "_build_info.py"), self.pure_info
            )


SDIST = "sdist" in sys.argv  # a source archive: no binary, so no build-specific version label


def _installed_torch_version(isolated_dir):
    """(__version__, git_version) of the torch installed where this build's package goes, read
    from its torch/version.py (a wheel's metadata version lacks the +cu130 label), or None.
    pip's isolated build runs the target environment's interpreter (sys.prefix is the target's)
    with its site-packages off sys.path; `python -m build` runs in a venv of its own, whose
    torch is the isolated one itself (None)."""
    import sysconfig

    keys = ("__version__", "git_version")
    for lib in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
        version_py = Path(lib, "torch", "version.py")
        if not version_py.is_file() or version_py.parent.resolve() == Path(isolated_dir).resolve():
            continue
        text = version_py.read_text()
        found = [re.search(rf"^{k}\s*=\s*['\"]([^'\"]*)['\"]", text, re.M) for k in keys]
        if all(found):
            return tuple(m.group(1) for m in found)
    return None


def _refuse_isolated_build(torch):
    """pip's build isolation (and `python -m build`'s) installs the newest torch into a throwaway
    environment; an extension compiled there would require that torch, not the user's, unless
    the user's is the same version."""
    where = os.path.dirname(torch.__file__)
    isolated = "pip-build-env" in where or f"{os.sep}build-env-" in where
    if not isolated or SDIST or _flag("FASTNN_ALLOW_BUILD_ISOLATION", "0") == "1":
        return
    installed = _installed_torch_version(where)
    if installed == (torch.__version__, torch.version.git_version):
        return  # the same torch build as the one the package will run with
    yours = f"your environment's is {installed[0]}" if installed else "your environment has none"
    sys.exit(
        f"fastnn: this build runs in an isolated environment whose torch ({torch.__version__}, "
        f"{where}) is not the one you will run with ({yours}), and the extension is tied to the "
        "torch it is built against. Build against your torch: pip install "
        "--no-build-isolation . (with setuptools, wheel and ninja installed), or "
        "FASTNN_NO_EXTENSION=1 for a pure-Python install; FASTNN_ALLOW_BUILD_ISOLATION=1 builds "
        "here anyway."
    )


def _extensions():
    """(ext_modules, cmdclass, facts) for this build."""
    facts = {
        "VARIANT": "pure",
        "TORCH_VERSION": None,
        "CUDA_VERSION": None,
        "CUDA_TOOLKIT": None,
        "CUDA_ARCHS": "",
        "CXX11_ABI": None,
    }
    if _flag("FASTNN_NO_EXTENSION", "0") in ("1", "true", "yes"):
        build_py.pure_info = _build_info_text(facts)
        return [], {"build_py": build_py}, facts
    build_cuda = _flag("FASTNN_BUILD_CUDA", "auto")
    if build_cuda not in ("auto", "0", "1"):
        sys.exit(f"FASTNN_BUILD_CUDA must be auto, 0 or 1, got {build_cuda!r}")
    cuda_home = _find_cuda_home() if build_cuda != "0" else None
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    _use_a_shared_libstdcxx_compiler()
    import torch
    from torch.utils import cpp_extension

    _refuse_isolated_build(torch)

    with_cuda = build_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if with_cuda and not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        sys.exit(
            f"fastnn: the CUDA toolkit {cuda_home} (CUDA_HOME / CUDA_PATH) has no bin/nvcc; point "
            "CUDA_HOME at a toolkit, unset it (nvcc is then found on PATH), or build without "
            "CUDA: FASTNN_BUILD_CUDA=0"
        )
    if build_cuda == "1" and not with_cuda:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit found"
        sys.exit(f"FASTNN_BUILD_CUDA=1 but {why}; set CUDA_HOME or use FASTNN_BUILD_CUDA=0")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").rglob("*.cu"))
    define_macros = [("Py_LIMITED_API", "0x030A0000")]  # one wheel for every CPython >= 3.10
    # -Wno-psabi: the CPU kernels pass 32-byte GCC vectors between always-inline helpers (inlined
    # into AVX2 clones), which GCC flags as an ABI change that no call ever makes.
    # -g0: Python's CFLAGS carry -g, whose debug info made the CPU extension 15.9 MB against
    # 1.4 MB (symbol names, all perf needs, stay).
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-psabi", f"-DFASTNN_WITH_CUDA={int(with_cuda)}"]
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
    facts.update(
        VARIANT="cuda" if with_cuda else "cpu",
        TORCH_VERSION=torch.__version__,
        CUDA_VERSION=torch.version.cuda if with_cuda else None,
        CUDA_TOOLKIT=_toolkit_version(cuda_home) if with_cuda else None,
        CUDA_ARCHS=os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else "",
        CXX11_ABI=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    )
    info = _build_info_text(facts)
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class build_ext(base):
        """Writes _build_info.py next to the extension it describes: into the build folder (and
        so the wheel) and, for in-place and editable builds, into the source tree."""

        def run(self):
            super().run()
            _write_if_changed(Path(self.build_lib, "fastnn", "_build_info.py"), info)
            if self.inplace:
                _write_if_changed(ROOT / "fastnn" / "_build_info.py", info)

    return [ext], {"build_ext": build_ext, "build_py": build_py}, facts


def _version(facts):
    """The base version, plus a local label naming what a binary build is built against when
    FASTNN_LOCAL_VERSION=1 (module docstring)."""
    if facts["VARIANT"] == "pure" or SDIST or _flag("FASTNN_LOCAL_VERSION", "0") != "1":
        return _base_version()
    torch_mm = ".".join(facts["TORCH_VERSION"].split("+")[0].split(".")[:2])
    device = "cu" + facts["CUDA_VERSION"].replace(".", "") if facts["CUDA_VERSION"] else "cpu"
    return f"{_base_version()}+{device}.torch{torch_mm}"


def _requirements(facts):
    if facts["VARIANT"] == "pure":
        return [PURE_TORCH_REQUIREMENT]
    major, minor = facts["TORCH_VERSION"].split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*"]


def _options(ext_modules):
    options = {}
    if ext_modules:  # tag cp310-abi3: one wheel for every CPython >= 3.10
        options["bdist_wheel"] = {"py_limited_api": "cp310"}
    build_dir = os.environ.get("FASTNN_BUILD_DIR")
    if build_dir:
        build_dir = os.path.abspath(build_dir)
        os.makedirs(build_dir, exist_ok=True)
        options["build"] = {"build_base": build_dir}
        options["egg_info"] = {"egg_base": build_dir}  # keep fastnn.egg-info out of the source
    return options


ext_modules, cmdclass, facts = _extensions()
setup(
    version=_version(facts),
    install_requires=_requirements(facts),
    packages=find_packages(include=["fastnn", "fastnn.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=_options(ext_modules),
)
