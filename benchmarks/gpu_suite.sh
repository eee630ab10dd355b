#!/usr/bin/env bash
# The whole GPU check in one call (for the lent GPU machine, which reaches no package registry):
# build genfast against the torch already installed, run the GPU tests, run the benchmarks, and
# leave everything under $OUT (default ./gpu_out):
#   $OUT/info.txt  $OUT/build.log  $OUT/gpu_tests.log  $OUT/bench.log
#   $OUT/results/<device>.json|.md|.png   (commit these under benchmarks/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "== build" | tee "$OUT/build.log"
if ! $PY -m pip install --no-deps --no-build-isolation -e . >>"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "build failed"
  exit 1
fi
$PY -m genfast.info | tee "$OUT/info.txt"

echo "== GPU tests"
GENFAST_TEST_DEVICE=cuda $PY -m pytest -q -m "gpu or anydevice" tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
$PY -m benchmarks.run_all --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
