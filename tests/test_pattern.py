import pytest

from vnmsparse import VNMPattern


def test_parse_and_print():
    p = VNMPattern.parse("64:2:8")
    assert (p.V, p.N, p.M) == (64, 2, 8)
    assert str(p) == "64:2:8"
    assert p.sparsity == 0.75
    assert VNMPattern.parse(p) is p
    assert VNMPattern.parse(" 128 : 2 : 5 ") == VNMPattern(V=128, M=5)


@pytest.mark.parametrize("text, rule", [
    ("64:4:8", "N must be 2"),
    ("64:2:3", "M must be >= 4"),
    ("0:2:8", "V must be >= 1"),
    ("64:2", "V:N:M"),
    ("a:2:8", "V:N:M"),
    ("-1:2:8", "V:N:M"),
])
def test_bad_patterns_name_the_rule(text, rule):
    with pytest.raises(ValueError, match=rule):
        VNMPattern.parse(text)


def test_bad_types():
    with pytest.raises(TypeError, match="pattern"):
        VNMPattern.parse(64)
    with pytest.raises(TypeError, match="V must be an int"):
        VNMPattern(V=64.0, M=8)
    with pytest.raises(TypeError, match="M must be an int"):
        VNMPattern(V=64, M=True)


def test_geometry_of_short_blocks():
    p = VNMPattern(V=64, M=5)
    assert p.blocks(100, 576) == (2, 116)
    assert p.padded_shape(100, 576) == (128, 580)
    with pytest.raises(ValueError, match="rows must be a positive int"):
        p.blocks(0, 5)


def test_bytes_per_weight_counts_values_positions_and_indices():
    p = VNMPattern.parse("64:2:8")
    assert p.bytes_per_weight(2.0) == pytest.approx(2 / 8 * 2 + 0.5 / 8 + 16 / (64 * 8))


def test_two_four_means_the_kernels_v_and_gives_the_plain_2_4_mask():
    import torch

    from vnmsparse import vnm_mask
    from vnmsparse.ops.limits import SUPPORTED_V
    from vnmsparse.pattern import TWO_FOUR_V

    p = VNMPattern.parse(" 2 : 4 ")
    assert p == VNMPattern(V=TWO_FOUR_V, M=4) and TWO_FOUR_V in SUPPORTED_V and p.sparsity == 0.5
    scores = torch.rand(70, 36)
    assert torch.equal(vnm_mask(scores, p), vnm_mask(scores, "1:2:4"))
