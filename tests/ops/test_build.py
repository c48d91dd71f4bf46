"""The just-in-time build (no GPU here): architecture flags, the cache location, refusals with a reason, and the
compiled table checked against the catalogue."""

from __future__ import annotations

import types

import pytest
import torch

from vnmsparse.ops import build, variants


def test_arch_flags_use_the_arch_specific_target_on_hopper_only():
    assert build.arch_flags((9, 0)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert build.arch_flags((8, 0)) == ["-gencode=arch=compute_80,code=sm_80"]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VNMSPARSE_BUILD_DIR", str(tmp_path))
    assert build.cache_root() == tmp_path


def test_no_kernels_on_cpu_and_the_reason_is_kept():
    assert build.extension("cpu") is None
    assert "cpu" in build.unavailable_reason("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_no_cuda_gives_a_reason_not_an_error():
    assert build.extension("cuda") is None
    assert "CUDA is not available" in build.unavailable_reason("cuda")


def test_source_hash_is_stable_and_short():
    assert build._source_hash() == build._source_hash() and len(build._source_hash()) == 12


def test_a_compiled_table_that_differs_from_the_catalogue_is_refused():
    rows = [(k.name, {"decode": 0, "gemm": 1, "wgmma": 2, "wgmma_window": 3}[k.variant.kind], 0 if k.dtype == "bf16" else 1,
             k.V, k.variant.max_n, k.variant.rows, k.window) for k in variants.KERNELS]
    build._check_table(types.SimpleNamespace(table=lambda: rows))  # the same list: accepted
    with pytest.raises(RuntimeError, match="does not match variants.KERNELS"):
        build._check_table(types.SimpleNamespace(table=lambda: rows[::-1]))
