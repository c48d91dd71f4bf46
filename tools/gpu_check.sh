#!/usr/bin/env bash
# The check to run on a GPU machine (repository root; python3 with torch, nvcc, compute-sanitizer): build the
# extension, run the GPU tests, run compute-sanitizer memcheck over a subset of them. Every step has a timeout, so
# a hanging kernel ends the step, not the call. Logs go to $OUT (default /tmp/vnm_out): log.txt (summary),
# build.txt, tests.txt, sanitize-<i>.txt. Exit status 0 only if every step passed.
#
#   bash tools/gpu_check.sh [STEPS]          STEPS: comma-separated from build,test,sanitize (default: all three)
#   TEST_ARGS="-k wgmma"                     extra pytest arguments for the GPU tests
#   SANITIZE="FILES -k EXPR; FILES ..."      memcheck subsets, ';'-separated (default below)
#   BUILD_TIMEOUT, TEST_TIMEOUT, SANITIZE_TIMEOUT (seconds per step; defaults 300, 300, 420)
# The three steps may exceed a 10-minute device call: run `build,test`, then `sanitize` (the build is cached in
# $VNMSPARSE_BUILD_DIR). Benchmarks are separate: each bench/*.py docstring has its command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vnm_out}
STEPS=${1:-build,test,sanitize}
# Memcheck leaves out graph capture, torch.compile and the tests that start processes (the sanitizer breaks stream
# capture by itself), and the fp16 twins of the sm_90 variants (time).
SANITIZE=${SANITIZE:-"tests/ops/test_kernels_gpu.py -k 'not compile and not fresh_process and not graph';
  tests/ops/test_wgmma_gpu.py tests/ops/test_wgmma_window_gpu.py -k 'not graph and (bf16 or public)'"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export VNMSPARSE_BUILD_DIR=${VNMSPARSE_BUILD_DIR:-/tmp/vnm_build} MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PYTEST="python3 -m pytest -q -rf -p no:cacheprovider -W ignore::DeprecationWarning"
status=0
has() { [[ ",$STEPS," == *",$1,"* ]]; }
run() {  # run NAME TIMEOUT COMMAND: COMMAND's output into $OUT/NAME.txt, its exit status and tail into the log
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T)): $*" | tee -a "$LOG"
  timeout "$limit" bash -c "$*" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -8 "$OUT/$name.txt" | tee -a "$LOG"
  echo "$name exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee -a "$LOG"
has build && run build "${BUILD_TIMEOUT:-300}" "python3 -c \"
from vnmsparse import ops
m = ops.extension('cuda')
print('kernels built and loaded' if m else 'BUILD FAILED: ' + str(ops.unavailable_reason('cuda')))
raise SystemExit(0 if m else 1)\""
has test && run tests "${TEST_TIMEOUT:-300}" "$PYTEST -m gpu ${TEST_ARGS:-}"
if has sanitize; then
  i=0
  IFS=';' read -ra subsets <<< "${SANITIZE//$'\n'/ }"  # one line, split at ';'
  for subset in "${subsets[@]}"; do
    i=$((i + 1))
    # No caching allocator, so an out-of-bounds access cannot hide inside a larger cached block.
    run "sanitize-$i" "${SANITIZE_TIMEOUT:-420}" "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --error-exitcode 3 $PYTEST $subset"
  done
fi
echo "gpu_check.sh $STEPS: $([ $status -eq 0 ] && echo PASSED || echo FAILED)" | tee -a "$LOG"
exit $status
