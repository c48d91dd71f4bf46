"""The source writer: one unit per kernel, the table in catalogue order, the supported-V list for the binding,
incremental writes."""

from __future__ import annotations

from vnmsparse.ops import codegen, limits, variants


def test_generated_sources_follow_the_list(tmp_path):
    names = [k.name for k in variants.KERNELS]
    assert len(set(names)) == len(names)
    files = codegen.write(tmp_path)
    assert files[-1].name == "vnm_table.cu"
    table = (tmp_path / "vnm_table.cu").read_text()
    positions = [table.index(f'"{n}"') for n in names]
    assert positions == sorted(positions)  # table order is list order: Python indexes it
    traits = (tmp_path / "vnm_tiles.h").read_text()
    for v in variants.VARIANTS:
        assert f"_{v.tag} {{" in traits
    assert {f.name for f in files} == {f"gen_{n}.cu" for n in names} | {"vnm_table.cu"}
    # Writing again changes nothing on disk (incremental builds stay incremental).
    before = {f: f.stat().st_mtime_ns for f in files}
    codegen.write(tmp_path)
    assert before == {f: f.stat().st_mtime_ns for f in files}


def test_every_supported_v_has_a_gemm_for_each_dtype():
    for V in limits.SUPPORTED_V:
        for dtype in limits.DTYPES:
            assert any(k.variant.kind == "gemm" and k.V == V and k.dtype == dtype for k in variants.KERNELS)


def test_the_binding_checks_v_against_the_limits():
    header = codegen.sources()["vnm_limits.h"]
    assert "kSupportedV[] = {" + ", ".join(map(str, limits.SUPPORTED_V)) + "}" in header


def test_the_fingerprint_follows_the_sources():
    assert codegen.fingerprint() == codegen.fingerprint()
    assert len(codegen.fingerprint()) == 12
