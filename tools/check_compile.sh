#!/usr/bin/env bash
# Compile one C++ or CUDA source of the extension on its own, with the build's flags, without
# linking: a quick check before a file joins the shared build. Usage: tools/check_compile.sh FILE
set -euo pipefail
cd "$(dirname "$0")/.."
file=$1
read -r torch_inc py_inc cuda_home < <(.venv/bin/python - <<'PY'
import os, sysconfig, torch.utils.cpp_extension as c
print(os.path.dirname(c.include_paths()[0]) + "/include", sysconfig.get_paths()["include"],
      os.environ.get("CUDA_HOME") or "/usr/local/cuda")
PY
)
incs=(-Icsrc/include -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" -I"$py_inc" -I"$cuda_home/include")
defs=(-DPy_LIMITED_API=0x030A0000 -DTORCH_EXTENSION_NAME=_C -DFASTNN_WITH_CUDA=1)
case "$file" in
  *.cu) "$cuda_home/bin/nvcc" -std=c++20 -O3 -arch=sm_90 "${incs[@]}" "${defs[@]}" \
          -Xcompiler -fPIC -c "$file" -o /tmp/check_compile.$$.o && rm -f /tmp/check_compile.$$.o ;;
  *) c++ -std=c++20 -O3 -fopenmp -Wall -fPIC "${incs[@]}" "${defs[@]}" -fsyntax-only "$file" ;;
esac
echo "ok: $file"
