"""The measured dispatch tables: lookup rules, and the shipped tables against what the dispatcher picks."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest

from vnmsparse.ops import configure, dispatch, tuned, two_four_width, variants

H200 = (9, 0)


def _entry(V=64, R=4096, Kc=64, window=64, N=64, kind="gemm", tag="v64_m64n64w2x2s4", ksplit=4, us=10.0):
    return {"V": V, "R": R, "Kc": Kc, "window": window, "N": N, "kind": kind, "tag": tag, "ksplit": ksplit, "us": us}


def test_gpu_slug_names_the_model():
    assert tuned.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert tuned.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_lookup_takes_the_nearest_shape_and_the_smallest_covering_n():
    table = tuned.parse({"entries": [
        _entry(N=32, ksplit=2), _entry(N=64, ksplit=4), _entry(N=128, ksplit=8),
        _entry(R=28672, Kc=205, N=64, ksplit=1), _entry(V=128, N=64, tag="v128_m64n64w2x2s4"),
    ]})
    assert tuned.lookup(table, 50, 4096, 64, 64, 64).ksplit == 4  # 50 -> the N=64 measurement
    assert tuned.lookup(table, 32, 4096, 64, 64, 64).ksplit == 2  # exact N
    assert tuned.lookup(table, 1, 5000, 64, 70, 64).ksplit == 2  # nearest shape is 4096, smallest N covers 1
    assert tuned.lookup(table, 64, 20000, 64, 180, 64).ksplit == 1  # nearest shape is 28672 x ...
    assert tuned.lookup(table, 129, 4096, 64, 64, 64) is None  # beyond the largest measured N: rules decide
    assert tuned.lookup(table, 64, 4096, 32, 64, 64) is None  # no entry for V = 32
    assert tuned.lookup(table, 64, 4096, 128, 64, 64).tag.startswith("v128")
    assert tuned.lookup(table, 64, 4096, 64, 64, 0).ksplit == 4  # no gathered-pack entry: the same V's


def test_lookup_keeps_packs_of_a_window_kernel_apart():
    # The 2:4 copy's pack (window 32) was timed on window kernels only, the V:2:8 packs on the gathering kernels:
    # neither may take the other's measurements, however near the shape.
    table = tuned.parse({"entries": [_entry(N=64, ksplit=4),
                                     _entry(Kc=128, window=32, N=64, kind="wgmma_window", tag="m4_c2m1n64s8", ksplit=2)]})
    assert tuned.lookup(table, 64, 4096, 64, 128, 32).kind == "wgmma_window"
    assert tuned.lookup(table, 64, 4096, 64, 128, 64).kind == "gemm"  # nearest shape, but not a copy
    assert tuned.lookup(table, 64, 4096, 64, 128, 0).kind == "gemm"  # permuted: the gathering kernels' entries
    only_gather = tuned.parse({"entries": [_entry(N=64)]})
    assert tuned.lookup(only_gather, 64, 4096, 64, 128, 32) is None  # no copy measured: the rules decide


def test_missing_table_is_empty():
    assert tuned.load("no-such-gpu") == ()


def test_dispatch_uses_a_measured_choice_only_where_it_can_run(monkeypatch):
    table = tuned.parse({"entries": [_entry(N=64, ksplit=4), _entry(N=1024, kind="wgmma", tag="v64_c2m1n256s4", ksplit=1)]})
    monkeypatch.setattr(tuned, "load", lambda gpu: table if gpu == "fake" else ())
    dispatch._plan.cache_clear()
    try:
        index, ks = dispatch.plan(64, 4096, 64, 64, "fp16", 132, H200, 64, "fake")
        kernel = variants.KERNELS[index]
        assert kernel.name == "gemm_fp16_v64_m64n64w2x2s4" and ks == 4  # the dtype follows the call
        index, ks = dispatch.plan(1000, 4096, 64, 64, "bf16", 132, (8, 0), 64, "fake")
        assert variants.KERNELS[index].variant.kind == "gemm"  # wgmma cannot run on sm_80: rules decide
        with configure(wgmma=False):
            index, _ = dispatch.plan(1000, 4096, 64, 64, "bf16", 132, H200, 64, "fake")
        assert variants.KERNELS[index].variant.kind != "wgmma"
        index, ks = dispatch.plan(64, 4096, 64, 3, "bf16", 132, H200, 64, "fake")
        assert ks == 3  # never more slices than k chunks
    finally:
        dispatch._plan.cache_clear()


def test_stream_k_choices_reach_the_binding_for_the_sparse_wgmma_kernels(monkeypatch):
    table = tuned.parse({"entries": [
        _entry(N=512, kind="wgmma", tag="v64_c2m1n256s4", ksplit=variants.STREAM_K),
        _entry(Kc=128, window=32, N=512, kind="wgmma_window", tag="m4_c2m2n128s5", ksplit=variants.STREAM_K),
        _entry(Kc=128, window=32, N=1024, kind="wgmma_window", tag="m4_c2m1n256s4", ksplit=64),
    ]})
    monkeypatch.setattr(tuned, "load", lambda gpu: table if gpu == "fake" else ())
    dispatch._plan.cache_clear()
    try:
        index, ks = dispatch.plan(500, 4096, 64, 64, "bf16", 132, H200, 64, "fake")
        assert variants.KERNELS[index].name == "wgmma_bf16_v64_c2m1n256s4" and ks == variants.STREAM_K
        index, ks = dispatch.plan(500, 4096, 64, 128, "bf16", 132, H200, 32, "fake")
        assert variants.KERNELS[index].name == "wgmma_window_bf16_m4_c2m2n128s5" and ks == variants.STREAM_K
        index, ks = dispatch.plan(1000, 4096, 64, 128, "bf16", 132, H200, 32, "fake")
        assert variants.KERNELS[index].name == "wgmma_window_bf16_m4_c2m1n256s4" and ks == 64  # 128 chunks: 64 stages
        index, ks = dispatch.plan(1000, 4096, 64, 101, "bf16", 132, H200, 32, "fake")
        assert ks == 51  # never more slices than the window kernel's 64-column stages
    finally:
        dispatch._plan.cache_clear()


def test_the_copy_is_taken_where_it_was_measured_faster(monkeypatch):
    # With both packs measured for a case, the copy runs exactly where its window kernel beat the weight's own pack;
    # beyond the measured N the rules decide (the window kernel at large N).
    table = tuned.parse({"entries": [
        _entry(N=32, kind="decode", tag="nt4r2w8u1s1", ksplit=2, us=9.0),
        _entry(N=128, kind="wgmma", tag="v64_c2m1n128s8", ksplit=2, us=20.0),
        _entry(N=512, kind="wgmma", tag="v64_c2m1n256s4", ksplit=1, us=60.0),
        _entry(Kc=128, window=32, N=128, kind="wgmma_window", tag="m4_c2m1n64s8", ksplit=2, us=25.0),
        _entry(Kc=128, window=32, N=512, kind="wgmma_window", tag="m4_c2m2n128s5", ksplit=1, us=40.0),
    ]})
    monkeypatch.setattr(tuned, "load", lambda gpu: table if gpu == "fake" else ())
    dispatch._uses_two_four_copy.cache_clear()
    try:
        use = lambda N, window=64: dispatch.uses_two_four_copy(N, 4096, 4096, 64, 8, window, "bf16", 132, H200, "fake")  # noqa: E731
        assert not use(24)  # the copy's first measurement (N = 128) is not this call's (N = 32): the rules, no copy
        assert not use(100)  # 25 us on the copy against 20 on its own pack
        assert use(300) and use(512)  # 40 against 60
        assert use(8192)  # beyond the table: the rules' window kernel
        assert use(300, window=0)  # permuted: its copy gathers x's columns into its layout; no permuted own pack measured
        with configure(wgmma=False):
            assert not use(300)
    finally:
        dispatch._uses_two_four_copy.cache_clear()


@pytest.mark.parametrize("entry", [_entry(ksplit=variants.STREAM_K), _entry(ksplit=-1),
                                   _entry(kind="decode", tag="nt1r4w8u1s2", ksplit=variants.STREAM_K)])
def test_a_table_with_an_impossible_split_is_refused(entry):
    with pytest.raises(ValueError, match="ksplit must be"):
        tuned.parse({"entries": [entry]})


def test_a_two_four_copy_call_runs_the_window_kernel_whenever_the_copy_is_taken():
    # The copy (a V:2:M weight as V:2:4, pack window 32) is taken where its window kernel was measured
    # faster than the weight's own pack, or beyond the table where the rules run the window kernel. The gather on the
    # copy (twice the values, twice the rows of x^T) must never run: every choice for the copy is a window kernel.
    dispatch._plan.cache_clear()
    dispatch._uses_two_four_copy.cache_clear()
    taken = 0
    for R, C in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)):
        for N in (64, 128, 256, 384, 512, 768, 1024, 2048, 8192):
            if not dispatch.uses_two_four_copy(N, R, C, 64, 8, 64, "bf16", 132, H200, "nvidia-h200"):
                continue
            taken += 1
            index, ks = dispatch.plan(N, R, 64, C // 32, "bf16", 132, H200, 32, "nvidia-h200")
            assert variants.KERNELS[index].variant.kind == "wgmma_window", (R, C, N, variants.KERNELS[index].name)
    assert taken >= 8


def test_stream_k_constant_matches_the_kernel_header():
    header = (resources.files("vnmsparse") / "ops" / "csrc" / "vnm_sm90_layout.h").read_text()
    assert f"constexpr int kStreamK = {variants.STREAM_K};" in header


@pytest.mark.parametrize("name", [p.name for p in (resources.files("vnmsparse") / "tables").iterdir()
                                  if p.name.startswith("dispatch-")])
def test_shipped_table_is_what_dispatch_picks(name):
    # Every measured case of a shipped table: the dispatcher runs the measured winner with its k-split, and the
    # winner was the fastest of the candidates timed for that case.
    record = json.loads((resources.files("vnmsparse") / "tables" / name).read_text())
    gpu = name.removeprefix("dispatch-").removesuffix(".json")
    by_name = {k.name: k for k in variants.KERNELS}
    dispatch._plan.cache_clear()
    for e in record["entries"]:
        index, ks = dispatch.plan(e["N"], e["R"], e["V"], e["Kc"], "bf16", 132, H200, e["window"], gpu)
        expected = by_name[f"{e['kind']}_bf16_{e['tag']}"]
        assert (variants.KERNELS[index], ks) == (expected, e["ksplit"]), e
        assert e["us"] <= min(e["candidates_us"].values()), e


def test_committed_sweep_ran_what_dispatch_picks_now():
    # The H200 serving sweep (bench/results/serving-h200.json) must describe the shipped table: every record's kernel
    # and k-split are what the dispatcher picks for that case today, so a re-tuned table without a re-sweep fails.
    path = Path(__file__).resolve().parents[2] / "bench" / "results" / "serving-h200.json"
    records = json.loads(path.read_text())["records"]
    dispatch._plan.cache_clear()
    dispatch._uses_two_four_copy.cache_clear()
    stale = []
    for r in records:
        V, _, M = (int(v) for v in r["pattern"].removesuffix("+copy").split(":"))
        if r["pattern"].endswith("+copy"):  # the layer holds a 2:4 copy: the record says which pack the call ran
            on_copy = dispatch.uses_two_four_copy(r["N"], r["R"], r["C"], V, M, 8 * M, "bf16", 132, H200, "nvidia-h200")
            if on_copy != (r["layout"] == "two_four"):
                stale.append((r["R"], r["C"], r["N"], r["pattern"], r["layout"], "copy now" if on_copy else "own pack now"))
            width, M = (two_four_width(r["C"], M), 4) if on_copy else (r["C"], M)
        else:
            width = r["C"]
        Kc = math.ceil(math.ceil(width / M) / 8)
        index, ks = dispatch.plan(r["N"], r["R"], V, Kc, "bf16", 132, H200, 8 * M, "nvidia-h200")
        if (variants.KERNELS[index].name, ks) != (r["kernel"], r["ksplit"]):
            stale.append((r["R"], r["C"], r["N"], r["pattern"], r["kernel"], r["ksplit"], variants.KERNELS[index].name, ks))
    assert not stale, stale[:5]
