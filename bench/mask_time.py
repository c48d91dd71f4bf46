"""Time `vnm_mask` on an 11008 x 4096 float32 score matrix (a LLaMA-7B MLP layer) on this machine's CPU.

Writes bench/results/mask-time-cpu.json and .md. Median of several runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import vnmsparse as vs

RESULTS = Path(__file__).parent / "results"


def time_mask(rows: int, cols: int, pattern: str, repeats: int) -> dict:
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(0))
    p = vs.VNMPattern.parse(pattern)
    mask = vs.vnm_mask(scores, p)  # warm-up, and a check that the result is V:N:M
    assert vs.is_vnm(mask, p)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        vs.vnm_mask(scores, p)
        seconds.append(time.perf_counter() - start)
    return {"rows": rows, "cols": cols, "pattern": pattern, "median_s": statistics.median(seconds),
            "min_s": min(seconds), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "load_average_1min": os.getloadavg()[0]}
    rows = [time_mask(11008, 4096, p, args.repeats) for p in ("64:2:8", "64:2:5", "128:2:16", "16:2:32", "1:2:4")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mask-time-cpu.json").write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    lines = [f"# vnm_mask time, 11008 x 4096 float32 scores, CPU ({env['threads']} threads, torch {env['torch']}, "
             f"load average {env['load_average_1min']:.1f} at the start: a shared machine inflates these)", "",
             "Command: `python bench/mask_time.py`", "", "| pattern | median s | min s |", "| --- | --- | --- |"]
    lines += [f"| {r['pattern']} | {r['median_s']:.3f} | {r['min_s']:.3f} |" for r in rows]
    (RESULTS / "mask-time-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
