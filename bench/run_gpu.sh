#!/usr/bin/env bash
# The one script the device machine runs (repository root, python3 with torch): build the kernels, check the
# mma.sp register layout, run the GPU tests, benchmark, profile, and run compute-sanitizer over the GPU tests.
#
#   bash bench/run_gpu.sh [STEPS] [bench/kernel.py args]
#   STEPS: comma-separated from probe,errors,test,bench,cpu,profile,table,sanitize,wgmma (default probe,test,bench,sanitize);
#          the build always runs first.
#   e.g.   bash bench/run_gpu.sh bench --shapes 4096x4096 --n 1,16 --patterns 64:2:8
#
#   wgmma: the sm_90a sparse-wgmma validation in one call (bench/NOTES-wgmma.md): layout probe, a smoke run (a hang
#          stops the wgmma steps there), its GPU tests, its benchmark against cuBLAS, cuSPARSELt and the mma.sp
#          path in the same run (kernel-<gpu>-wgmma.json/.md), compute-sanitizer memcheck over its tests. Every
#          GPU step has a timeout, so the whole call stays under 10 minutes.
#          bash bench/run_gpu.sh wgmma
#   errors: every input check of the binding, each bad call in its own process (bench/binding_errors.py).
#   profile: ncu over bench/profile_kernels.py (PROFILE_CASES=6,7 picks cases; full report in $OUT/ncu.txt).
#   table:   `vnm profile` of the speed table shipped in src/vnmsparse/tables (TABLE_ARGS, default LLaMA-2-7B
#            shapes at N=16), copied to $OUT/tables.
# Into $OUT (the device tool brings it back): log.txt (env, probe, build, tests, sanitizer), bench.txt, ncu.txt,
# and kernel-<gpu>.json/.md (the benchmark merges into bench/results/kernel-<gpu>.json and copies it here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vnm_out}
mkdir -p "$OUT"
STEPS=${1:-probe,test,bench,sanitize}
[ $# -gt 0 ] && shift
has() { [[ ",$STEPS," == *",$1,"* ]]; }
WGMMA_BENCH=${WGMMA_BENCH:---shapes 4096x4096,8192x8192,28672x8192 --n 2048,4096,8192 --patterns 64:2:8,64:2:5,128:2:8,64:2:16 --variants --warmup-ms 5 --rep-ms 25}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export VNMSPARSE_BUILD_DIR=${VNMSPARSE_BUILD_DIR:-/tmp/vnm_build} MAX_JOBS=${MAX_JOBS:-16}
LOG="$OUT/log.txt"
rm -f /tmp/wgmma_hang
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

{
step env
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1

if has probe; then
  step "mma.sp layout probe"
  nvcc -O2 -gencode=arch=compute_90a,code=sm_90a -o /tmp/mma_sp_probe bench/mma_sp_probe.cu && /tmp/mma_sp_probe || status=1
fi

step build
time python3 -c "
from vnmsparse import ops
m = ops.extension('cuda')
print('kernels built and loaded' if m else 'BUILD FAILED: ' + str(ops.unavailable_reason('cuda')))
raise SystemExit(0 if m else 1)" || { echo "build failed"; exit 1; }

if has errors; then
  step "binding input checks (one process per bad call)"
  timeout 120 python3 bench/binding_errors.py || status=1
fi

if has wgmma; then
  step "wgmma: layout probe (A registers, metadata, N-major swizzled B, D)"
  nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc/vnmsparse/ops/csrc -o /tmp/wgmma_probe \
    bench/wgmma_sp_probe.cu && timeout 60 /tmp/wgmma_probe || status=1
  step "wgmma: smoke run (one kernel, 1024x2048, N=1024; a timeout here means a pipeline hang)"
  timeout 90 python3 -m pytest tests/ops/test_wgmma_gpu.py -q -x -p no:cacheprovider -k matches_mma_sp 2>&1 | tail -15
  smoke=${PIPESTATUS[0]}
  echo "smoke exit $smoke"
  if [ "$smoke" -eq 124 ]; then echo "WGMMA HANG: skipping the other wgmma steps"; touch /tmp/wgmma_hang; status=1
  else
    [ "$smoke" -eq 0 ] || status=1
    step "wgmma: GPU tests"
    timeout 180 python3 -m pytest tests/ops/test_wgmma_gpu.py -q -rf -p no:cacheprovider -W ignore::DeprecationWarning \
      > "$OUT/wgmma_tests.txt" 2>&1; rc=$?
    tail -25 "$OUT/wgmma_tests.txt"; echo "wgmma tests exit $rc"; [ $rc -eq 0 ] || status=1
  fi
fi

if has test; then
  step "GPU tests"
  python3 -m pytest tests/ops -q -rf -p no:cacheprovider -W ignore::DeprecationWarning > /tmp/tests.txt 2>&1 || status=1
  tail -25 /tmp/tests.txt
fi
exit $status  # this block runs in a subshell (the pipe): hand its status out
} 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if has bench; then
  step benchmark | tee -a "$LOG"
  python3 bench/kernel.py --merge "$@" 2>&1 | grep -v "Warning\|found = torch" | tee "$OUT/bench.txt" || status=1
  cp bench/results/kernel-*.json bench/results/kernel-*.md "$OUT/" 2>/dev/null
fi

if has wgmma && [ ! -e /tmp/wgmma_hang ]; then
  step "wgmma: benchmark (--path wgmma $WGMMA_BENCH)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout 210 python3 bench/kernel.py --path wgmma --merge $WGMMA_BENCH 2>&1 | grep -v "Warning\|found = torch" \
    | tee "$OUT/wgmma_bench.txt"; rc=${PIPESTATUS[0]}
  echo "wgmma bench exit $rc" | tee -a "$LOG"; [ "$rc" -eq 0 ] || status=1
  cp bench/results/kernel-*-wgmma.json bench/results/kernel-*-wgmma.md "$OUT/" 2>/dev/null
  step "wgmma: compute-sanitizer memcheck over its tests (bf16 variants, public path; no graphs)" | tee -a "$LOG"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest \
    tests/ops/test_wgmma_gpu.py -q -p no:cacheprovider -W ignore::DeprecationWarning -k "bf16 or public" \
    > "$OUT/wgmma_sanitizer.txt" 2>&1
  rc=$?
  { grep -E "^=========" "$OUT/wgmma_sanitizer.txt" | head -40; tail -5 "$OUT/wgmma_sanitizer.txt"; echo "wgmma sanitizer exit $rc (124: timed out)"; } | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
fi

if has cpu; then
  step "CPU cost of one vnmsparse.ops.linear call (no profiler attached)" | tee -a "$LOG"
  python3 bench/profile_kernels.py --cases 0,1,3 2>&1 | grep "^case" | tee -a "$LOG"
fi

if has profile; then
  step "Nsight Compute" | tee -a "$LOG"
  timeout "${PROFILE_TIMEOUT:-240}" ncu --profile-from-start off --clock-control none -k regex:vnm_ \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats python3 bench/profile_kernels.py ${PROFILE_CASES:+--cases $PROFILE_CASES} \
    > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $?" | tee -a "$LOG"
  grep -E "^case|vnm_.*_kernel|Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Warp Per Scheduler" "$OUT/ncu.txt" | head -150 | tee -a "$LOG"
fi

if has table; then
  step "vnm profile (speed table)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "${TABLE_TIMEOUT:-300}" python3 -m vnmsparse.cli profile ${TABLE_ARGS:---shapes 4096x4096,11008x4096,4096x11008 --tokens 16} \
    --out "$OUT/tables" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -40 | tee -a "$LOG"
fi

if has sanitize; then
  step "compute-sanitizer memcheck over the GPU tests" | tee -a "$LOG"
  # No caching allocator, so an out-of-bounds access cannot hide inside a larger cached block. Graph capture,
  # torch.compile and the subprocess test are left out (the sanitizer breaks stream capture by itself).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT:-420}" compute-sanitizer --tool memcheck \
    --error-exitcode 3 python3 -m pytest tests/ops/test_kernels_gpu.py -q -p no:cacheprovider -W ignore::DeprecationWarning \
    -k "not compile and not fresh_process and not graph" > /tmp/sanitizer.txt 2>&1
  rc=$?
  { grep -E "^=========" /tmp/sanitizer.txt | head -40; tail -5 /tmp/sanitizer.txt; echo "sanitizer exit $rc"; } | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
fi
echo; echo "run_gpu.sh $STEPS finished with status $status" | tee -a "$LOG"
exit $status
