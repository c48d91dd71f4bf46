"""`vnm profile` plumbing on CPU (the measurement itself runs on the GPU: tests marked gpu)."""

import json

import pytest
import torch

from vnmsparse import VNMPattern
from vnmsparse.profile import SHIPPED_TABLES, model_shapes, parse_shapes, profile, table_path, write_table
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


# --- the tables shipped in the package (H100: `vnm profile`, every V:2:M; H200: the serving sweep's patterns) ----

SHIPPED = sorted(SHIPPED_TABLES.glob("speed-*.json"))


def test_an_h100_table_is_shipped_for_decode_and_prefill():
    names = {p.name for p in SHIPPED}
    assert {"speed-nvidia-h100-80gb-hbm3-n16.json", "speed-nvidia-h100-80gb-hbm3-n2048.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_table_is_complete_and_checked(path):
    data = json.loads(path.read_text())
    table = SpeedTable.load(path)
    assert table.source.startswith(f"measured on {data['gpu']}, N={data['n_tokens']}")
    swept = {VNMPattern.parse(p) for records in data["per_shape"].values() for p in records}
    if "h100" in path.name:  # `vnm profile` sweeps every V:2:M the kernels take
        assert swept == {VNMPattern.parse(f"{V}:2:{M}") for V in (16, 32, 64, 128) for M in range(4, 33)}
    assert set(table.speedups) == swept
    for shape, records in data["per_shape"].items():
        assert set(records) == {str(p) for p in swept}, shape
        for pattern, r in records.items():
            assert r["rel_err"] <= 1e-2, f"{shape} {pattern}: the kernel was not checked correct"
            assert abs(r["speedup"] - r["dense_ms"] / r["vnm_ms"]) < 1e-9
    # the aggregate is total dense time over total sparse time across the layer shapes
    def total(key: str) -> float:
        return sum(data["per_shape"][s]["64:2:8"][key] * count for s, count in data["layers_per_shape"].items())

    assert table.speedups[VNMPattern.parse("64:2:8")] == pytest.approx(total("dense_ms") / total("vnm_ms"))


def test_select_finds_the_shipped_table_nearest_the_token_count():
    gpu = "NVIDIA H100 80GB HBM3"
    assert SpeedTable.find(gpu, 1, [SHIPPED_TABLES]).source.endswith("N=16, 3 shapes")
    assert SpeedTable.find(gpu, 4096, [SHIPPED_TABLES]).source.endswith("N=2048, 3 shapes")
    assert SpeedTable.find("Some Other GPU", 16, [SHIPPED_TABLES]).source == SpeedTable.analytic().source
