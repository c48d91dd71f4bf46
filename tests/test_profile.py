"""`vnm profile` plumbing on CPU (the measurement itself runs on the GPU: tests marked gpu)."""

import json

import pytest
import torch

from vnmsparse import VNMPattern
from vnmsparse.profile import model_shapes, parse_shapes, profile, table_path, write_table
from vnmsparse.select import ANALYTIC_SOURCE, SpeedTable, gpu_slug


def test_parse_shapes():
    assert parse_shapes("4096x4096, 11008x4096") == [(4096, 4096), (11008, 4096)]
    for bad in ("4096", "4096x", "0x5", "ax4"):
        with pytest.raises(ValueError, match="RxC"):
            parse_shapes(bad)


def test_model_shapes_keep_repeats_and_skip_lm_head():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(4, 8), "lm_head": torch.nn.Linear(8, 100)})
    assert model_shapes(model) == [(8, 4), (8, 4)]


def _table(gpu, n, speed):
    return {"gpu": gpu, "n_tokens": n, "source": f"{gpu} N={n}", "speedups": {"64:2:8": speed}}


def test_find_prefers_the_user_table_then_the_nearest_token_count(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_table(_table("NVIDIA H100 80GB HBM3", 16, 2.5), shipped)
    write_table(_table("NVIDIA H100 80GB HBM3", 4096, 1.2), shipped)
    assert table_path("NVIDIA H100 80GB HBM3", 16, shipped).name == "speed-nvidia-h100-80gb-hbm3-n16.json"
    found = SpeedTable.find("NVIDIA H100 80GB HBM3", 2048, [user, shipped])
    assert found.speedups[VNMPattern.parse("64:2:8")] == 1.2
    assert SpeedTable.find("NVIDIA H100 80GB HBM3", 1, [user, shipped]).speedups[VNMPattern.parse("64:2:8")] == 2.5
    write_table(_table("NVIDIA H100 80GB HBM3", 16, 3.0), user)
    assert SpeedTable.find("NVIDIA H100 80GB HBM3", 4096, [user, shipped]).source == "NVIDIA H100 80GB HBM3 N=16"
    assert SpeedTable.find("Some Other GPU", 16, [user, shipped]).source == ANALYTIC_SOURCE
    assert SpeedTable.find(None, 16, [user, shipped]).source == ANALYTIC_SOURCE
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert json.loads(table_path("NVIDIA H100 80GB HBM3", 16, user).read_text())["n_tokens"] == 16


def test_profile_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        profile([(64, 64)], 16)


@pytest.mark.gpu
def test_profile_measures_and_checks_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    table = profile([(256, 512), (256, 512)], 16, ["64:2:8", "16:2:5"], repeats=5, progress=False)
    assert set(table["speedups"]) == {"64:2:8", "16:2:5"}
    assert table["layers_per_shape"] == {"256x512": 2}
    for row in table["per_shape"]["256x512"].values():
        assert row["rel_err"] < 1e-2 and row["vnm_ms"] > 0
