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
