"""The compiled binding refuses bad calls with a RuntimeError naming the problem, and never crashes the process.

Each case runs in its own process (bench/binding_errors.py), so a segfault fails one case instead of the session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import binding_errors  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("case", list(binding_errors.CASES))
def test_binding_refuses_cleanly(case):
    if case == "wgmma_control" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sparse-wgmma kernel runs on sm_90 only")
    rc, last, err = binding_errors.run_isolated(case)
    assert rc == 0, f"{case}: the process crashed (rc={rc}): {err}"
    assert binding_errors.CASES[case] in last, f"{case}: got {last!r}"
