#!/usr/bin/env bash
# The whole GPU check in one short call, for a bare GPU machine with torch and Triton installed
# and no package registry: build genfast for sm_90, run the GPU tests, run the benchmarks, and
# leave everything under $OUT (default ./gpu_out):
#   $OUT/summary.txt (printed first)  $OUT/plan.txt  $OUT/build.log  $OUT/info.txt
#   $OUT/gpu_tests.log  $OUT/bench.log  $OUT/results/<device>.json|.md|.png (commit these)
#
#   benchmarks/gpu_suite.sh [--quick] [--dry-run] [--budget-s SECONDS]
#
# Wall-clock budget: 480 s (--quick: 240 s), or --budget-s. The build and the tests run under
# hard time limits (the tests are interrupted, and say so, at theirs); the benchmarks get what
# is left minus a reserve for the report, and stop starting cases when the next would not fit
# (benchmarks/run_all.py --budget-s; torch.compile warm-up and autotuning count). --quick runs
# the GPU tests and one shape per family (both dtypes) plus the DCGAN training step.
# --dry-run prints the plan and the budget of each step and runs nothing heavy.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
DRY=0
TOTAL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --budget-s) TOTAL=$2; shift ;;
    --budget-s=*) TOTAL=${1#*=} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  TOTAL=${TOTAL:-240}; BUILD_S=100; TESTS_S=45; RESERVE_S=15; BENCH_FLAGS="--quick"
else
  TOTAL=${TOTAL:-480}; BUILD_S=150; TESTS_S=120; RESERVE_S=25; BENCH_FLAGS=""
fi
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "$@" >&2; }   # progress on stderr: stdout is the summary, then the tables
BENCH_S=$(( TOTAL - BUILD_S - TESTS_S - RESERVE_S ))
mkdir -p "$OUT/results"

plan() {
  echo "gpu_suite plan: total budget ${TOTAL} s$([ "$QUICK" = 1 ] && echo ' (--quick)')"
  echo "  step build       <= ${BUILD_S} s  pip install --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
  echo "  step tests       <= ${TESTS_S} s  GENFAST_TEST_DEVICE=cuda pytest -m 'gpu or anydevice' tests (interrupted at its budget)"
  echo "  step benchmarks  <= ${BENCH_S} s + what build and tests left  python -m benchmarks.run_all --budget-s <left> ${BENCH_FLAGS}"
  echo "  step report      <= ${RESERVE_S} s  summary, tables, plot"
  echo "  out: $OUT"
}
plan >"$OUT/plan.txt"
if [ "$DRY" = 1 ]; then
  cat "$OUT/plan.txt"
  $PY -m benchmarks.run_all --dry-run --budget-s "$BENCH_S" $BENCH_FLAGS
  exit $?
fi
cat "$OUT/plan.txt" >&2

log "## build ($(elapsed) s)"
BUILD="failed"
if timeout -k 10 "$BUILD_S" $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  BUILD="ok in $(elapsed) s"
  $PY -m genfast.info >"$OUT/info.txt" 2>&1
else
  rc=$?
  [ $rc = 124 ] && BUILD="failed: over its ${BUILD_S} s budget" || BUILD="failed (rc $rc), see build.log"
  tail -40 "$OUT/build.log" >&2
fi

tests_rc=1
if [[ "$BUILD" == ok* ]]; then
  log "## GPU tests ($(elapsed) s)"
  # SIGINT: pytest stops, still prints its counts, and says it was interrupted.
  GENFAST_TEST_DEVICE=cuda timeout -s INT -k 15 "$TESTS_S" $PY -m pytest -q -m "gpu or anydevice" tests \
    >"$OUT/gpu_tests.log" 2>&1
  tests_rc=$?
  tail -3 "$OUT/gpu_tests.log" >&2
fi

bench_rc=1
LEFT=$(( TOTAL - $(elapsed) - RESERVE_S ))
if [[ "$BUILD" == ok* ]] && [ "$LEFT" -gt 10 ]; then
  log "## benchmarks, budget ${LEFT} s ($(elapsed) s)"
  $PY -m benchmarks.run_all --out "$OUT/results" --budget-s "$LEFT" $BENCH_FLAGS ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  bench_rc=$?
  grep -E "^BUDGET|^results:" "$OUT/bench.log" >&2
else
  echo "benchmarks not run (build: $BUILD; ${LEFT} s left)" >"$OUT/bench.log"
fi

JSON=$(ls -t "$OUT"/results/*.json 2>/dev/null | head -1)
if [ -n "$JSON" ]; then
  $PY -m benchmarks.report "$JSON" --summary --build "$BUILD" --tests-log "$OUT/gpu_tests.log" >"$OUT/summary.txt" 2>&1
else
  { echo "build: $BUILD"; echo "tests: $(tail -1 "$OUT/gpu_tests.log" 2>/dev/null || echo 'not run')";
    echo "benchmarks: no results (see bench.log)"; } >"$OUT/summary.txt"
fi
echo "total: $(elapsed) s of ${TOTAL} s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
echo
[ -n "$JSON" ] && cat "${JSON%.json}.md"
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc; everything in $OUT"
exit $(( tests_rc != 0 || bench_rc != 0 ))
