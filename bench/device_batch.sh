#!/usr/bin/env bash
# Run several device steps in one call and bring everything back as ONE archive ($OUT/batch.tgz), refreshed after
# every step, so a call cut off by its time limit still returns what finished (the device tool returns at most
# eight files per call). Each step is "NAME TIMEOUT_S COMMAND..." on its own line of the file given as $1;
# its output goes to NAME.log. bench/results/*-h100* are copied in after every step.
#
#   bash bench/device_batch.sh bench/batches/e2e.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vnm_out}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export VNMSPARSE_BUILD_DIR=${VNMSPARSE_BUILD_DIR:-/tmp/vnm_build} MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT"
while read -r name limit cmd; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  start=$(date +%s)
  WORK="$WORK" timeout "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1
  echo "$name exit $? in $(( $(date +%s) - start )) s" | tee -a "$WORK/steps.txt"
  cp bench/results/*h100* "$WORK/" 2>/dev/null
  tar czf "$OUT/batch.tgz" -C "$WORK" .
done < "$1"
