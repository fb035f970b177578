#!/usr/bin/env bash
# Build a fastnn wheel into dist/ (or $DIST) and print what it holds.
# Usage: tools/build_wheel.sh [cuda|cpu|pure]
#   cuda (default)  CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST (default: setup.py's
#                   DEFAULT_CUDA_ARCHS); fails when torch is CPU-only or no CUDA toolkit is found.
#   cpu             CPU kernels only (FASTNN_BUILD_CUDA=0): loads into a CPU or CUDA torch.
#   pure            no extension (FASTNN_NO_EXTENSION=1): a py3-none-any wheel.
# Binary wheels are tagged cp310-abi3 (every CPython >= 3.10) and require the torch minor release
# they were built against (torch==X.Y.*). Builds in build/wheel-<variant> (FASTNN_BUILD_DIR), never
# in the build/temp.* of the in-place dev build, so `make build` stays incremental; the objects
# there are kept, so rebuilding a wheel only recompiles what changed. MAX_JOBS defaults to nproc.
# PY (default .venv/bin/python) is the Python whose torch the wheel is built against.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-cuda}
PY=${PY:-.venv/bin/python}
dist=${DIST:-dist}
case "$variant" in
  cuda) export FASTNN_BUILD_CUDA=1 FASTNN_NO_EXTENSION=0 ;;
  cpu) export FASTNN_BUILD_CUDA=0 FASTNN_NO_EXTENSION=0 ;;
  pure) export FASTNN_NO_EXTENSION=1 ;;
  *) echo "usage: $0 [cuda|cpu|pure]" >&2; exit 2 ;;
esac
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTNN_LOCAL_VERSION=${FASTNN_LOCAL_VERSION:-1}  # 0.1.0+cu130.torch2.14: see setup.py
export FASTNN_BUILD_DIR=${FASTNN_BUILD_DIR:-build/wheel-$variant}
# bdist_wheel packs everything under the build's lib folder: clear it so no extension left there
# by an earlier build (another arch list, a removed source) ships. Objects in temp.* stay.
rm -rf "$FASTNN_BUILD_DIR"/lib* "$FASTNN_BUILD_DIR"/bdist* "$FASTNN_BUILD_DIR/out"
mkdir -p "$FASTNN_BUILD_DIR/out" "$dist"
echo "building the $variant wheel with MAX_JOBS=$MAX_JOBS" \
  "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} in $FASTNN_BUILD_DIR"
start=$(date +%s)
"$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir ${WHEEL_VERBOSE:+-v} \
  -w "$FASTNN_BUILD_DIR/out" .
wheel=$(ls "$FASTNN_BUILD_DIR"/out/fastnn-*.whl)
mv -f "$wheel" "$dist/"
wheel="$dist/$(basename "$wheel")"
echo "built $wheel in $(($(date +%s) - start)) s"
"$PY" - "$wheel" <<'PY'
# Check and summarise the wheel: tag, requirement, build info, and no top-level triton_kernels
# (Triton and a PyPI project own that name; ours lives in fastnn.triton_kernels).
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as whl:
    names = whl.namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    wheel_file = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    tags = [l for l in whl.read(wheel_file).decode().splitlines() if l.startswith("Tag:")]
    reqs = [l for l in whl.read(meta).decode().splitlines() if l.startswith("Requires-Dist: torch")]
    info = whl.read("fastnn/_build_info.py").decode().splitlines()[1:]
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert tops == ["fastnn"], f"unexpected top-level entries {tops}"
assert "fastnn/triton_kernels/__init__.py" in names, "fastnn.triton_kernels is missing"
print("  " + "\n  ".join(tags + reqs))
print("  fastnn/_build_info.py:", *info, sep="\n    ")
print("  extension:", ", ".join(n for n in names if n.startswith("fastnn/_C")) or "none")
PY
