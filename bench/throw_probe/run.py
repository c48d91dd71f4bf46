"""Diagnosis only: build a two-function torch extension and call each throwing function in its own process."""
import subprocess, sys, os
from pathlib import Path
HERE = Path(__file__).parent
def load():
    from torch.utils import cpp_extension
    return cpp_extension.load(name="vnm_throw_probe", sources=[str(HERE / "probe.cpp"), str(HERE / "probe_cu.cu")],
                              build_directory=os.environ.get("PROBE_DIR", "/tmp/throw_probe"), verbose=False)
if len(sys.argv) > 1:
    m = load(); fn = getattr(m, sys.argv[1])
    try:
        print("returned", fn(7) if sys.argv[1] in ("format_int", "throw_int") else fn())
    except RuntimeError as e:
        print("RuntimeError:", str(e).splitlines()[0][:100])
    raise SystemExit(0)
os.makedirs(os.environ.get("PROBE_DIR", "/tmp/throw_probe"), exist_ok=True); load()
for case in ("format_int", "throw_str", "throw_int", "throw_after_cu", "throw_after_cu_int", "throw_std"):
    p = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True)
    out = (p.stdout.strip().splitlines() or ["(none)"])[-1]
    print(f"{case:20s} rc={p.returncode} {out}", flush=True)
