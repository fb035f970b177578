#!/usr/bin/env bash
# A/B benchmark of two source trees on the device present: this checkout (A) and OTHER (B).
#
#   bash bench/ab.sh OTHER [BENCH_K]
#
# OTHER is a second checkout, e.g. a branch made with
#   git worktree add .ab/variant BRANCH        (ignore .ab/ in .git/info/exclude)
# which a lent GPU machine receives when the call carries ".ab". The script
#   1. builds the extension in place in both trees (for this GPU's arch when CUDA is present;
#      otherwise as `make build` would, FASTNN_BUILD_CUDA=0 skips the CUDA sources);
#   2. with AB_TESTS_K set, runs OTHER's tests selected by it (on a GPU, its CUDA cases): a
#      variant's numbers count only when it is correct;
#   3. benchmarks A, then B, with the same pytest -k selection BENCH_K (default: every case;
#      keep "copy" in it, % of copy needs it) and prints `python -m bench.compare` of A against B.
# Results in AB_OUT (default bench/results/ab-<date>): build-{a,b}.log, tests-b.log, a/ and b/
# (each a bench.run folder with its report) and compare.md; on a lent machine also packed into
# $OUT/ab.tar.gz. Knobs: AB_PYTHON (python3), AB_TESTS_K, AB_OUT, MAX_JOBS, and AB_A_RUN: a
# bench.run folder of this checkout from minutes before on the same machine (say gpu-check's) to
# compare B against instead of building and benchmarking A again (only the cases both ran pair).
# Exit status: 2 for bad arguments, 1 when a build, the tests or a benchmark run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1/setup.py" ]; then
  echo "usage: bash bench/ab.sh OTHER_CHECKOUT [BENCH_K] (OTHER_CHECKOUT must hold setup.py)" >&2
  exit 2
fi
A=$PWD
B=$(cd "$1" && pwd)
K=${2:-}
PY=${AB_PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # runs in both trees
out=${AB_OUT:-$A/bench/results/ab-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

cuda=0
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && cuda=1
build_env=()
if [ $cuda = 1 ]; then
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  build_env=(TORCH_CUDA_ARCH_LIST="$arch" FASTNN_BUILD_CUDA=1)
else
  build_env=(TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}")
fi

a_run=${AB_A_RUN:+$(cd "$AB_A_RUN" && pwd)}
if [ -n "${AB_A_RUN:-}" ] && [ ! -f "$a_run/benchmark.json" ]; then
  echo "ab: AB_A_RUN=$AB_A_RUN holds no benchmark.json" >&2
  exit 2
fi
sides=(a b)
[ -n "$a_run" ] && sides=(b)

status=0
for side in "${sides[@]}"; do
  tree=$A
  [ $side = b ] && tree=$B
  echo "ab: building $side ($tree)"
  (cd "$tree" && mkdir -p build && env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace >"$out/build-$side.log" 2>&1) || {
    tail -n 20 "$out/build-$side.log"
    echo "ab: the build of $side failed ($out/build-$side.log)" >&2
    exit 1
  }
done

if [ -n "${AB_TESTS_K:-}" ]; then
  echo "ab: tests of b (-k \"$AB_TESTS_K\")"
  select="$AB_TESTS_K"
  [ $cuda = 1 ] && select="(cuda or gpu) and ($AB_TESTS_K)"
  xdist=()
  "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "$(($(nproc) > 8 ? 8 : $(nproc)))")
  (cd "$B" && PYTHONPATH="$B" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    ${xdist[@]+"${xdist[@]}"} -k "$select" tests) >"$out/tests-b.log" 2>&1
  rc=$?
  tail -n 3 "$out/tests-b.log"
  if [ $rc -ne 0 ]; then
    echo "ab: b's tests failed ($out/tests-b.log): its numbers would not count" >&2
    exit 1
  fi
fi

k_args=()
[ -n "$K" ] && k_args=(-k "$K")
for side in "${sides[@]}"; do
  tree=$A
  [ $side = b ] && tree=$B
  echo "ab: benchmarks of $side"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -m bench.run --out "$out/$side" \
    ${k_args[@]+"${k_args[@]}"} >/dev/null 2>&1) || status=1
  [ -f "$out/$side/benchmark.json" ] || {
    echo "ab: no benchmarks from $side ($out/$side/bench.log)" >&2
    exit 1
  }
done

"$PY" -m bench.compare "${a_run:-$out/a}/benchmark.json" "$out/b/benchmark.json" | tee "$out/compare.md"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  tar czf "$OUT/ab.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" &&
    echo "ab: packed into \$OUT/ab.tar.gz"
fi
exit $status
