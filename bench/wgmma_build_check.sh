#!/usr/bin/env bash
# Compile every sparse-wgmma kernel of the generated list for sm_90a on this machine (no GPU needed) and report
# registers, spills, stack and static shared memory per variant; fail unless the SASS holds the sparse wgmma
# (HGMMA.SP, B transposed for the gather kernels, not for the window kernels), register reallocation (USETMAXREG) and no local-memory traffic (LDL/STL).
#
#   bash bench/wgmma_build_check.sh [OUT_DIR]      (needs nvcc; cuobjdump from the CUDA toolkit or
#                                                   `pip install nvidia-cuda-cuobjdump` for the SASS checks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/vnm_sm90_check}
CSRC=src/vnmsparse/ops/csrc
mkdir -p "$OUT"
python3 -c "  # the generator alone (no torch needed): load the module by path
import importlib.util as u
spec = u.spec_from_file_location('instantiations', 'src/vnmsparse/ops/instantiations.py')
import sys; m = u.module_from_spec(spec); sys.modules['instantiations'] = m; spec.loader.exec_module(m); m.write('$OUT/gen')" || exit 1
CUOBJDUMP=$(command -v cuobjdump || ls /tmp/cutools/nvidia/cu13/bin/cuobjdump 2>/dev/null || python3 -c "
import importlib.util, pathlib; s = importlib.util.find_spec('nvidia'); print(next(pathlib.Path(p).glob('cu13/bin/cuobjdump')) if s else '')" 2>/dev/null)
status=0
printf "%-44s %5s %6s %6s %8s %s\n" kernel regs spillS spillL smem sass
for unit in "$OUT"/gen/gen_wgmma_*.cu; do
  name=$(basename "$unit" .cu); name=${name#gen_}
  obj="$OUT/$name.o"
  log=$(nvcc -c -O3 -std=c++17 -lineinfo -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -I"$CSRC" -I"$OUT/gen" \
        "$unit" -o "$obj" 2>&1) || { echo "$name: COMPILE FAILED"; echo "$log" | tail -20; status=1; continue; }
  regs=$(echo "$log" | grep -o "Used [0-9]* registers" | grep -o "[0-9]*" | head -1)
  spill_s=$(echo "$log" | grep -o "[0-9]* bytes spill stores" | grep -o "^[0-9]*" | head -1)
  spill_l=$(echo "$log" | grep -o "[0-9]* bytes spill loads" | grep -o "^[0-9]*" | head -1)
  smem=$(echo "$log" | grep -o "[0-9]* bytes smem" | grep -o "^[0-9]*" | head -1)
  if echo "$log" | grep -qi "warning"; then echo "$log" | grep -i warning | sed "s/^/  $name: /"; status=1; fi
  sass="-"
  if [ -n "$CUOBJDUMP" ]; then
    "$CUOBJDUMP" -sass "$obj" > "$OUT/$name.sass"
    # The gather kernels read B N-major (tnspB), the window kernels K-major (no tnspB).
    case "$name" in
      wgmma_window_*) hg=$(grep "HGMMA.SP.64x[0-9]*x32.F32" "$OUT/$name.sass" | grep -vc "tnspB") ;;
      *) hg=$(grep -c "HGMMA.SP.64x[0-9]*x32.F32.*tnspB" "$OUT/$name.sass") ;;
    esac
    mx=$(grep -c "USETMAXREG" "$OUT/$name.sass")
    lm=$(grep -cE "\bLDL|\bSTL" "$OUT/$name.sass")
    # Highest register index used in the consumer part (after the TRY_ALLOC) and the producer part (after the
    # DEALLOC, laid out last): must stay under the setmaxnreg limits (232 / 40).
    regs_used=$(python3 - "$OUT/$name.sass" <<'PY'
import re, sys
part, top = None, {"c": 0, "p": 0}
for line in open(sys.argv[1]):
    part = "c" if "USETMAXREG.TRY_ALLOC" in line else "p" if "USETMAXREG.DEALLOC" in line else part
    if part == "p" and re.search(r"\s{2}EXIT ;", line):  # producer code ends; out-of-line wait loops follow
        part = "done"
    if part in top:
        top[part] = max([top[part]] + [int(r) + 1 for r in re.findall(r"\bR(\d+)\b", line.split("/*")[1] if "/*" in line else line)])
print(f"consumerR<={top['c']} producerR<={top['p']}")
PY
)
    sass="HGMMA.SP=$hg USETMAXREG=$mx LDL/STL=$lm $regs_used"
    [ "$hg" -gt 0 ] && [ "$mx" -eq 2 ] && [ "$lm" -eq 0 ] || status=1
  fi
  printf "%-44s %5s %6s %6s %8s %s\n" "$name" "$regs" "$spill_s" "$spill_l" "$smem" "$sass"
  [ "${spill_s:-0}" -eq 0 ] || status=1
done
echo "wgmma build check: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
