"""Two CPU processes under torchrun (gloo): DDP and FSDP2 runs end with identical masks and weights on both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_end_identical(tmp_path):
    out = tmp_path / "runs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert set(runs) == {"lora-ddp", "lora-fsdp", "srste-ddp", "srste-fsdp"}
    for name, run in runs.items():
        assert run["steps"] == 20 and run["remask_steps"] == [2, 5, 8], name
        assert len(run["masks"]) == 2 and len(set(run["masks"])) == 1, f"{name}: ranks hold different masks"
        assert len(run["weights"]) == 2 and len(set(run["weights"])) == 1, f"{name}: ranks hold different weights"
    # gloo sums in the same order for DDP's all-reduce and FSDP's reduce-scatter: the two strategies agree too
    assert runs["lora-ddp"]["weights"] == runs["lora-fsdp"]["weights"]
