"""Masks follow the brief's rule exactly, on any shape, with ties broken toward the lower index."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import patterns, scores_for
from vnmsparse import VNMPattern, check_vnm, is_vnm, vnm_mask


def rule_by_loops(scores: torch.Tensor, p: VNMPattern) -> torch.Tensor:
    """The brief's rule written plainly, block by block and row by row: the oracle."""
    R, C = scores.shape
    s = scores.double().tolist()
    mask = torch.zeros(R, C, dtype=torch.bool)
    for r0 in range(0, R, p.V):
        rows = range(r0, min(r0 + p.V, R))
        for c0 in range(0, C, p.M):
            cols = list(range(c0, min(c0 + p.M, C)))
            col_sum = {c: sum(s[r][c] for r in rows) for c in cols}
            kept = sorted(sorted(cols, key=lambda c: (-col_sum[c], c))[:4])
            for r in rows:
                for c in sorted(kept, key=lambda c: (-s[r][c], c))[:2]:
                    mask[r, c] = True
    return mask


@given(data=st.data(), p=patterns)
def test_mask_equals_the_rule(data, p):
    scores = data.draw(scores_for(p))
    mask = vnm_mask(scores, p)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, rule_by_loops(scores, p))
    assert is_vnm(mask, p)


@given(data=st.data(), p=patterns)
def test_every_row_keeps_min_of_2_and_group_width(data, p):
    scores = data.draw(scores_for(p))
    mask = vnm_mask(scores, p)
    R, C = scores.shape
    for c0 in range(0, C, p.M):
        width = min(p.M, C - c0)
        assert (mask[:, c0 : c0 + p.M].sum(dim=1) == min(2, width)).all()


def test_all_ties_pick_the_lowest_indices():
    mask = vnm_mask(torch.ones(4, 8), VNMPattern(V=4, M=8))
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:, :2] = True
    assert torch.equal(mask, expected)


def test_short_last_group_keeps_every_real_column():
    p = VNMPattern(V=2, M=5)
    scores = torch.rand(3, 6)  # last group holds one real column
    mask = vnm_mask(scores, p)
    assert mask[:, 5].all()
    assert (mask[:, :5].sum(dim=1) == 2).all()


def test_scores_with_nan_or_inf_are_refused():
    s = torch.rand(4, 8)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        vnm_mask(s, "4:2:8")
    s[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        vnm_mask(s, "4:2:8")


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(8), ValueError, "2-D"),
    (torch.rand(0, 8), ValueError, "non-empty"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    (torch.rand(4, 8) > 0.5, TypeError, "real-valued"),
])
def test_bad_scores(bad, error, match):
    with pytest.raises(error, match=match):
        vnm_mask(bad, "4:2:8")


def test_check_names_the_first_offending_block_and_row():
    p = VNMPattern(V=2, M=8)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[2, [8, 9]] = True
    mask[3, [10, 11, 12]] = True  # 3 in a row, and 5 columns in block (rows 2..3, cols 8..15)
    assert not is_vnm(mask, p)
    with pytest.raises(ValueError, match=r"block \(rows 2..3, columns 8..15\) uses 5 columns"):
        check_vnm(mask, p)
    mask[2, 8] = False
    mask[3, 12] = False
    mask[0, [0, 1, 2]] = True
    with pytest.raises(ValueError, match="row 0 keeps 3 weights in columns 0..7"):
        check_vnm(mask, p)


def test_sparser_masks_are_still_vnm():
    p = VNMPattern(V=2, M=4)
    assert is_vnm(torch.zeros(3, 5, dtype=torch.bool), p)
    assert is_vnm(torch.eye(3, 5), p)


def test_cuda_and_cpu_agree():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for ties in (False, True):
        s = torch.randint(0, 4, (200, 300)).float() if ties else torch.rand(200, 300)
        for p in ("64:2:8", "16:2:5", "1:2:4"):
            assert torch.equal(vnm_mask(s, p), vnm_mask(s.cuda(), p).cpu())


@given(data=st.data(), p=patterns, kind=st.sampled_from(["float64", "int64"]))
def test_scores_rank_in_their_own_precision(data, p, kind):
    """Scores that differ below float32's precision (float64 near 1, integers above 2^24) keep their order."""
    R, C = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    k = torch.randint(0, 50, (R, C), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**31))))
    scores = 2**40 + k if kind == "int64" else 1 + k.double() * 2**-40  # every block sum exact in float64
    assert torch.equal(vnm_mask(scores, p), rule_by_loops(scores, p))


def test_float64_scores_beyond_float32_range():
    s = torch.tensor([[1, 2, 1e300, 3, 4, 5], [1, 2, -1e300, 3, 4, 5]], dtype=torch.float64)
    assert vnm_mask(s, "2:2:6").tolist() == [[False, False, False, False, True, True]] * 2
    huge = torch.tensor([[1e308, 1e308, -1e308, 1.0, 2.0, 3.0]] * 2, dtype=torch.float64)  # sums overflow float64
    assert vnm_mask(huge, "2:2:6").tolist() == [[True, True, False, False, False, False]] * 2


def test_meta_tensors_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="meta"):
        vnm_mask(torch.empty(4, 8, device="meta"), "4:2:8")
    with pytest.raises(ValueError, match="meta"):
        check_vnm(torch.empty(4, 8, dtype=torch.bool, device="meta"), "4:2:8")
