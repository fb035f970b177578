#!/usr/bin/env bash
# `make gpu-check`: the one command to run on a machine with an NVIDIA GPU.
#
#   1. builds fastnn._C in place for this card's arch only (TORCH_CUDA_ARCH_LIST from
#      torch.cuda.get_device_capability(), computed here, never in setup.py), with the system
#      python3 and no pip install: the lent machines have no network and their own torch;
#   2. runs the whole test suite (tests/) on CUDA with compiled Triton (TRITON_INTERPRET=0: the
#      interpreted CPU runs are CI's), `-m "not slow"` (the slow tests build wheels or run CPU
#      kernels on 12 GB tensors);
#   3. runs the benchmark suite and writes the report (python -m bench.run), with what is left of
#      the time budget, so everything ends within about GPU_CHECK_BUDGET_S;
#   4. with GPU_CHECK_SWEEP_S set, then sweeps the Triton norm kernels' launch configs for that
#      many seconds (python -m bench.triton_sweep: sweep.md, the data for their launch policies);
#   5. leaves build.log, tests.log, bench.log, benchmark.json, report.md, the plots,
#      host_time.md (python -m bench.host_time: host time per eager call at a small shape, about
#      a minute, after the benchmarks), sweep/ and a summary (gpu-check.md) in
#      bench/results/<device>-<date>/, the folder to commit.
#
# Without a CUDA GPU it prints why and exits 2: a non-zero status, so no script can mistake a
# machine without a GPU for a passed check. Exit 1: the build or some tests failed (the report is
# still written when the build succeeded). Exit 0: built, every test passed, report written.
#
# Knobs: GPU_CHECK_PYTHON (python3), GPU_CHECK_BUDGET_S (480), GPU_CHECK_TEST_TIMEOUT_S (240),
# GPU_CHECK_TESTS (cuda: the GPU cases; all: the CPU cases too),
# GPU_CHECK_OUT (the results folder),
# GPU_CHECK_PYTEST_ARGS (extra pytest args for tests/, e.g. "-n 4" or "-k rms"),
# GPU_CHECK_BENCH_K (a pytest -k expression selecting benchmarks, e.g. "copy or test_norm": a
# focused run; keep "copy" in it, the report's % of copy needs it), GPU_CHECK_SWEEP_S (0: no
# sweep; its seconds come out of the benchmarks' share of the budget), GPU_CHECK_HOST_TIME_S
# (90; 0: no host-time table; out of the same share), MAX_JOBS.
# Peers that are not installed there (Liger-Kernel is pure Python) can be carried as wheels in
# .whl/: they are installed with pip --no-index into a private folder on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-240}
start=$SECONDS

if ! why=$("$PY" -c '
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"cannot import torch ({e})")
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
' 2>&1); then
  echo "gpu-check: no CUDA GPU to check on: $why (python: $PY)." >&2
  echo "gpu-check: run it on a machine with an NVIDIA GPU; on this one use 'make test' and 'make bench'." >&2
  exit 2
fi

# fastnn is built in place, not installed: subprocesses (torchrun in the example's tests) find it
# through PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastnn-gpu-check-site .whl/*.whl &&
    export PYTHONPATH="/tmp/fastnn-gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi

pack() {
  # On a lent machine only $OUT comes back, a few files at most: pack the results folder there.
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    tar czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" &&
      echo "gpu-check: packed into \$OUT/gpu-check.tar.gz"
  fi
}

arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
out=${GPU_CHECK_OUT:-$("$PY" -m bench.run --print-out)} || exit 1
mkdir -p "$out"
summary="$out/gpu-check.md"
echo "gpu-check: results in ${out#"$PWD"/}"
{
  echo "# gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  "$PY" -c 'import torch, platform; p = torch.cuda.get_device_properties(0)
print(f"{p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Python {platform.python_version()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton not installed")'
  nvcc --version 2>/dev/null | tail -n 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed "s/^/nvidia-smi: /"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  echo '```'
  echo
} >"$summary"

# 1. Build for this card only: one arch keeps the build to a few minutes at most.
echo "gpu-check: building fastnn._C for sm_${arch/./} (log: build.log)"
t=$SECONDS
lock=()  # the lock `make build` takes too, so the two never build at once
command -v flock >/dev/null && mkdir -p build && lock=(flock build/.lock)
TORCH_CUDA_ARCH_LIST="$arch" FASTNN_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  ${lock[@]+"${lock[@]}"} "$PY" setup.py build_ext --inplace >"$out/build.log" 2>&1
build_rc=$?
if [ $build_rc -eq 0 ]; then
  "$PY" -c 'import fastnn
from fastnn import _backend, _extension
assert _extension.load(), _extension.error()
for family in ("rms_norm", "layer_norm", "glu", "adam", "rmsprop"):
    for backend in ("native", "triton"):
        why = _backend.unavailable_reason(backend, family, "cuda") or "available"
        print(f"{family:10} {backend:6} on cuda: {why}")' >>"$out/build.log" 2>&1
  build_rc=$?
fi
echo "- build (TORCH_CUDA_ARCH_LIST=$arch): $([ $build_rc -eq 0 ] && echo ok || echo FAILED), $((SECONDS - t)) s" >>"$summary"
if [ $build_rc -ne 0 ]; then
  tail -n 30 "$out/build.log"
  echo "gpu-check: the build failed (full log: $out/build.log)" >&2
  pack
  exit 1
fi
tail -n 10 "$out/build.log"

# 2. The test suite on CUDA, compiled Triton: the cases that touch the GPU (`-k "cuda or gpu"`:
# every test_*_gpu.py module and every case parametrised on cuda). CI runs the CPU cases; with
# GPU_CHECK_TESTS=all they run here too (a few minutes more on 16 cores). `timeout` bounds it so
# the benchmarks still run; with pytest-timeout, a hanging case fails alone.
echo "gpu-check: tests (log: tests.log, at most ${TEST_TIMEOUT} s)"
t=$SECONDS
per_test=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 120)
# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of words
select=(-k "cuda or gpu")
[ "${GPU_CHECK_TESTS:-cuda}" = all ] && select=()
TRITON_INTERPRET=0 timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -ra -p no:cacheprovider \
  -m "not slow" ${select[@]+"${select[@]}"} ${per_test[@]+"${per_test[@]}"} tests \
  ${GPU_CHECK_PYTEST_ARGS:-} 2>&1 | tee "$out/tests.log"
test_rc=${PIPESTATUS[0]}
case $test_rc in
  0) tests="all passed" ;;
  124 | 137) tests="TIMED OUT after ${TEST_TIMEOUT} s (see the end of tests.log)" ;;
  *) tests="FAILED (pytest exit $test_rc)" ;;
esac
last=$(grep -E '[0-9]+ (passed|failed|errors?)' "$out/tests.log" | tail -n 1)
echo "- tests: $tests, $((SECONDS - t)) s${last:+: \`$last\`}" >>"$summary"

# 3. Benchmarks and report, with what is left of the budget (at least a minute) after the shares
# of the host-time table and the sweep.
SWEEP=${GPU_CHECK_SWEEP_S:-0}
HOST_TIME_S=${GPU_CHECK_HOST_TIME_S:-90}  # step 3b's share: ~8 torch.compile warm-ups, then timing
left=$((BUDGET - (SECONDS - start) - SWEEP - HOST_TIME_S - 20))
[ $left -lt 60 ] && left=60
echo "gpu-check: benchmarks (log: bench.log, budget ${left} s)"
t=$SECONDS
bench_k=()
[ -n "${GPU_CHECK_BENCH_K:-}" ] && bench_k=(-k "$GPU_CHECK_BENCH_K")
TRITON_INTERPRET=0 "$PY" -m bench.run --out "$out" --budget-s "$left" ${bench_k[@]+"${bench_k[@]}"}
bench_rc=$?
echo "- benchmarks: $([ $bench_rc -eq 0 ] && echo ok || echo "pytest exit $bench_rc"), $((SECONDS - t)) s; report: [report.md](report.md)" >>"$summary"

# 3b. Host time per eager call at a small shape (the GPU timer above hides it by design); its
# files are rewritten after every case, so a timeout keeps the cases measured.
if [ "$HOST_TIME_S" -gt 0 ]; then
  echo "gpu-check: host time per eager call (host_time.md, at most ${HOST_TIME_S} s)"
  t=$SECONDS
  TRITON_INTERPRET=0 timeout -k 10 "$HOST_TIME_S" "$PY" -m bench.host_time --out "$out" \
    >"$out/host_time.log" 2>&1
  echo "- host time: exit $?, $((SECONDS - t)) s; table: [host_time.md](host_time.md)" >>"$summary"
fi

# 4. The launch-config sweep of the Triton norm kernels, when asked for (its own budget).
if [ "$SWEEP" -gt 0 ]; then
  echo "gpu-check: Triton norm launch-config sweep (log: sweep/sweep.log, budget ${SWEEP} s)"
  t=$SECONDS
  mkdir -p "$out/sweep"
  TRITON_INTERPRET=0 timeout -k 10 $((SWEEP + 30)) "$PY" -m bench.triton_sweep \
    --budget-s "$SWEEP" --out "$out/sweep" >"$out/sweep/sweep.log" 2>&1
  echo "- sweep: exit $?, $((SECONDS - t)) s; tables: [sweep/sweep.md](sweep/sweep.md)" >>"$summary"
fi
echo "- total: $((SECONDS - start)) s" >>"$summary"

pack
cat "$summary"
# The targets table last: where only the tail of the output comes back, it is what one reads.
[ -f "$out/report.md" ] && awk '/^## Targets/ {p = 1} /^## / && !/^## Targets/ {p = 0} p' "$out/report.md"
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
