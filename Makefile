# fastnn developer commands. Everything runs inside .venv (created by `make setup`).
PY := .venv/bin/python
# Dev builds compile CUDA for one arch (a compile check on machines without a GPU; gpu-check
# builds for the local card). Wheels use setup.py's full default list instead.
DEV_CUDA_ARCH ?= 9.0
# torch 2.14.1 is a CUDA 13.0 build (5.5 GB installed; it brings triton 3.8.0), so the CUDA sources
# compile here. .ci/run swaps in "torch==2.13.0 triton==3.8.0" (a CPU-only build, 1.8 GB with
# triton) when the disk is short; the CUDA compile check is then skipped.
TORCH_REQUIREMENT ?= torch==2.14.1

.PHONY: setup build test lint format demo bench gpu-check wheel clean

setup: .venv/.deps-stamp .venv/.editable-stamp build

.venv/bin/python:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

.venv/.deps-stamp: requirements-dev.txt | .venv/bin/python
	$(PY) -m pip install -q --no-cache-dir $(TORCH_REQUIREMENT) -r requirements-dev.txt
	touch $@

# The editable install only puts the source tree on the path; `build` compiles the extension in
# place. (Letting pip build it too would compile every source twice, in two build folders.)
.venv/.editable-stamp: setup.py pyproject.toml .venv/.deps-stamp
	FASTNN_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) rebuild of the extension in place; a no-op when nothing changed.
build: .venv/.editable-stamp
	mkdir -p build
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$(DEV_CUDA_ARCH)}" \
	  flock build/.lock $(PY) setup.py -q build_ext --inplace

CXX_SOURCES = $(shell find csrc tests/cpp -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

lint: .venv/.deps-stamp
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: .venv/.deps-stamp
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	.venv/bin/clang-format -i $(CXX_SOURCES)

# The whole suite on the CPU, Triton kernels under the interpreter (tests/conftest.py sets it).
# The extension must load: without it every native test would skip and the run still pass.
test: setup lint
	$(PY) -c "from fastnn import _extension as e; assert e.load(), e.error(); print('extension:', e.build_info().VARIANT)"
	$(PY) -m pytest -q -ra tests
	$(PY) -m pytest -q bench --benchmark-disable

# Benchmarks on the device present (CUDA when visible, else the CPU: a few minutes), the copy
# bandwidth measured in the same run, then report.md and plots in bench/results/<device>-<date>/.
bench: setup
	$(PY) -m bench.run

# The one command on a machine with an NVIDIA GPU (no .venv there: the system python3 and its
# torch): build for the local arch, every test on CUDA, benchmarks, report; see bench/gpu_check.sh.
# Without a GPU it says so and exits 2.
gpu-check:
	bash bench/gpu_check.sh

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m torch.distributed.run --nproc-per-node $$($(PY) -c "import torch; print(torch.cuda.device_count() or 2)") examples/train_ddp.py --compare

# Binary wheel into dist/: CPU kernels plus CUDA kernels for TORCH_CUDA_ARCH_LIST (default: the
# list in setup.py), cp310-abi3, requiring the torch minor release of .venv. Built in its own
# folder (build/wheel-<variant>), so the in-place dev build stays incremental. MAX_JOBS defaults
# to the core count. WHEEL_VARIANT=cpu (no CUDA kernels) or pure (no extension, py3-none-any).
WHEEL_VARIANT ?= cuda
wheel: .venv/.deps-stamp
	tools/build_wheel.sh $(WHEEL_VARIANT)

clean:
	rm -rf build dist *.egg-info fastnn/*.so fastnn/_build_info.py .venv/.editable-stamp
