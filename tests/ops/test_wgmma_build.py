"""The sparse-wgmma units of the generated list compile for sm_90a as the kernel expects (nvcc; no GPU needed).

Per unit: nvcc and ptxas print no warning and nothing
spills; where a cuobjdump is found (the CUDA toolkit's, or the one Triton ships), the SASS holds the sparse wgmma
(HGMMA.SP, B transposed for the gather kernels, not for the window kernels), both register reallocations
(USETMAXREG), no local-memory traffic (LDL/STL), and each role stays under its setmaxnreg limit (consumers 232,
producers 40). The device probes in tools/ are compiled too, so they keep up with the headers they include.
Skipped where nvcc is missing. The units compile in parallel, one per core (~4 s each, about 15 s in all on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vnmsparse.ops import codegen, variants

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "src" / "vnmsparse" / "ops" / "csrc"
NVCC = shutil.which("nvcc") or next((str(p) for p in [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"]
                                     if p.exists()), None)
# One bf16 unit per (kind, V, m64 tiles per consumer): the first, preferred tile of each and the register-heaviest
# shapes. fp16 is the same template with another element type; the device build compiles the whole list.
_FIRST = {}
for _k in variants.KERNELS:
    if _k.variant.kind in ("wgmma", "wgmma_window") and _k.dtype == "bf16":
        _FIRST.setdefault((_k.variant.kind, _k.V, _k.variant.wg_m), _k.name)
UNITS = sorted(_FIRST.values())
PROBES = sorted(p.name for p in (ROOT / "tools").glob("*.cu"))
CONSUMER_REGS, PRODUCER_REGS = 232, 40  # setmaxnreg.inc / .dec in vnm_wgmma.cuh

pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump") or (Path(NVCC).parent / "cuobjdump" if NVCC else None)
    if found and Path(found).exists():
        return str(found)
    triton = importlib.util.find_spec("triton")
    bundled = Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" if triton else None
    return str(bundled) if bundled and bundled.exists() else None


def _nvcc(source: Path, obj: Path, *includes: Path) -> tuple[int, str]:
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
           *(f"-I{d}" for d in includes), str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{unit name: (nvcc return code, nvcc/ptxas log, object path)} for UNITS, compiled in parallel."""
    out = tmp_path_factory.mktemp("sm90")
    codegen.write(out / "gen")
    jobs = {name: (out / "gen" / f"gen_{name}.cu", out / f"{name}.o") for name in UNITS}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        logs = dict(zip(jobs, pool.map(lambda j: _nvcc(j[0], j[1], CSRC, out / "gen"), jobs.values())))
    return {name: (*logs[name], jobs[name][1]) for name in jobs}


def _highest_register(sass: str) -> dict[str, int]:
    """Highest register index + 1 used after USETMAXREG.TRY_ALLOC (consumers) and after .DEALLOC (producers).

    The producer code is laid out last and ends at its EXIT; the out-of-line wait loops after it are not counted.
    """
    part, top = None, {"consumer": 0, "producer": 0}
    for line in sass.splitlines():
        part = "consumer" if "USETMAXREG.TRY_ALLOC" in line else "producer" if "USETMAXREG.DEALLOC" in line else part
        if part == "producer" and re.search(r"\s{2}EXIT ;", line):
            part = "done"
        if part in top:
            code = line.split("/*")[1] if "/*" in line else line
            top[part] = max([top[part], *(int(r) + 1 for r in re.findall(r"\bR(\d+)\b", code))])
    return top


@pytest.mark.parametrize("name", UNITS)
def test_wgmma_unit_compiles_without_spills(built, name):
    rc, log, _ = built[name]
    assert rc == 0, log[-3000:]
    assert "warning" not in log.lower(), log
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, log


@pytest.mark.parametrize("name", UNITS)
def test_wgmma_unit_sass(built, name):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("needs cuobjdump (CUDA toolkit or Triton's)")
    rc, log, obj = built[name]
    assert rc == 0, log[-3000:]
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    hgmma = [line for line in sass.splitlines() if re.search(r"HGMMA\.SP\.64x\d+x32\.F32", line)]
    window = name.startswith("wgmma_window_")
    # The gather kernels read B N-major (tnspB), the window kernels K-major.
    assert hgmma and all(("tnspB" in line) != window for line in hgmma), hgmma[:4]
    assert sass.count("USETMAXREG") == 2
    assert not re.search(r"\bLDL|\bSTL", sass), "local-memory traffic"
    regs = _highest_register(sass)
    assert regs["consumer"] <= CONSUMER_REGS and regs["producer"] <= PRODUCER_REGS, regs


@pytest.mark.parametrize("probe", PROBES)
def test_probe_compiles(tmp_path, probe):
    rc, log = _nvcc(ROOT / "tools" / probe, tmp_path / "probe.o", CSRC)
    assert rc == 0, log[-3000:]
