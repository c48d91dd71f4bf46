"""Every benchmark script starts and explains itself on a machine without a GPU.

Most of them only run on the device, where a broken import costs a device call; `--help` here catches that.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts(script):
    proc = subprocess.run([sys.executable, script.name, "--help"], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in (proc.stdout + proc.stderr).lower()


def test_serving_merge_replaces_the_cases_measured_again():
    import json

    sys.path.insert(0, str(BENCH))
    import serving

    base = json.loads((BENCH / "results" / "serving-h200.json").read_text())
    old = base["records"][3]
    new = {**serving._run_of(base), "date": "2026-12-04T00:00:00+00:00", "command": "python bench/serving.py sweep --n 96",
           "records": [{**old, "vnm_us": 1.0, "speedup": 9.0}, {**old, "pattern": "32:2:8", "speedup": 0.5}]}
    runs = len(base.get("runs") or [base])  # the committed sweep may already be a merge of several runs
    merged = serving.merge(base, new)
    assert len(merged["records"]) == len(base["records"]) + 1  # one replaced in place, one added
    assert merged["records"][3]["speedup"] == 9.0 and merged["records"][3]["run"] == runs
    assert merged["records"][0]["run"] == base["records"][0].get("run", 0) and merged["records"][-1]["pattern"] == "32:2:8"
    text = serving.markdown(merged)
    assert f"run {runs}: 2026-12-04" in text and "2 records now from it" in text
    again = serving.merge(merged, {**new, "date": "2026-12-05T00:00:00+00:00", "records": new["records"][:1]})
    assert [r["run"] for r in again["records"]].count(runs + 1) == 1 and len(again["runs"]) == runs + 2


def test_the_tuner_times_each_wgmma_kind_narrowest_tile_at_any_n():
    sys.path.insert(0, str(BENCH))
    import serving
    from vnmsparse.ops import variants

    for kind, narrowest in serving.SMALLEST_BN.items():
        tiles = [k for k in variants.KERNELS if k.variant.kind == kind]
        assert all(serving.worth_timing(k, 24) == (k.variant.BN == narrowest) for k in tiles)
        assert all(serving.worth_timing(k, k.variant.BN // 2) for k in tiles)  # half full: timed
        assert not any(serving.worth_timing(k, k.variant.BN // 2 - 1) for k in tiles if k.variant.BN > narrowest)
    decode = next(k for k in variants.KERNELS if k.variant.kind == "decode")
    assert serving.worth_timing(decode, 1)  # the rule is for sparse-wgmma tiles only


def test_serving_compare_ratios_best_common_candidates():
    sys.path.insert(0, str(BENCH))
    import serving

    def table(us_a, us_b, extra=None):
        case = {"V": 64, "M": 8, "R": 4096, "C": 4096, "window": 64}
        cands = {"wgmma_v64_c2m1n64s8/4": us_a, "wgmma_v64_c2m1n128s8/2": us_b, **(extra or {})}
        return {"command": "tune", "date": "d", "entries": [{**case, "N": 64, "candidates_us": cands},
                                                            {**case, "N": 128, "candidates_us": {}}]}

    # best over candidates both timed: base 10, new 8 -> 1.25; the new-only 1 us candidate is left out
    text = serving.compare(table(10.0, 12.0), table(8.0, 12.0, {"wgmma_v64_c2m1n256s4/1": 1.0}))
    assert "| 64 | 1 | 1.2500 | 1.250-1.250 | 1 | 0 |" in text
    assert "| wgmma_v64_c2m1n64s8 | 1 | 1.2500 |" in text and "| wgmma_v64_c2m1n128s8 | 1 | 1.0000 |" in text
    assert "| 4 | 1 | 1.2500 |" in text and "| 2 | 1 | 1.0000 |" in text  # per k-split
    assert "| 128 |" not in text  # a case without candidates is not compared
    # the new build timed one more kernel: the best over each table's own candidates is 10 / 1 -> 10
    assert "each table's own candidates" in text and "| 64 | 1 | 10.0000 | 10.000-10.000 | 1 | 0 |" in text
    assert "own candidates" not in serving.compare(table(10.0, 12.0), table(8.0, 12.0))  # same kernels: not shown
    with pytest.raises(ValueError, match="no case in common"):
        serving.compare(table(1.0, 1.0), {"entries": []})
