"""The permutation search: it never loses score, improves structured scores, keeps rows within their labels, and
names bad arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vnmsparse.masks import vnm_mask
from vnmsparse.permute import find_joint_permutation, find_permutation, kept_fraction


PATTERNS = st.sampled_from(["1:2:4", "2:2:5", "4:2:8", "8:2:6", "3:2:7"])


def _is_permutation(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.int64 and torch.equal(p.sort().values, torch.arange(n))


def _ria_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """|W| times a heavy-tailed per-column activation scale: the structure RIA scores have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).abs() * torch.randn(cols, generator=g).exp()


@st.composite
def score_matrices(draw):
    rows, cols = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    values = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 10.0]), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).view(rows, cols)


@settings(max_examples=40, deadline=None)
@given(scores=score_matrices(), pattern=PATTERNS, optimize_out=st.booleans(), seed=st.integers(0, 3))
def test_search_returns_permutations_that_never_lose_score(scores, pattern, optimize_out, seed):
    r = find_permutation(scores, pattern, iters=2, optimize_out=optimize_out, seed=seed)
    rows, cols = scores.shape
    assert _is_permutation(r.perm_out, rows) and _is_permutation(r.perm_in, cols)
    assert r.kept_before == pytest.approx(kept_fraction(scores, pattern))
    assert r.kept_after == pytest.approx(kept_fraction(scores[r.perm_out][:, r.perm_in], pattern))
    assert r.kept_after >= r.kept_before
    if not optimize_out:
        assert torch.equal(r.perm_out, torch.arange(rows))


@settings(max_examples=15, deadline=None)
@given(scores=score_matrices(), head=st.integers(1, 6))
def test_rows_stay_within_their_labels(scores, head):
    labels = torch.arange(scores.shape[0]) // head
    r = find_permutation(scores, "2:2:5", out_labels=labels)
    assert torch.equal(labels[r.perm_out], labels)


def test_search_improves_real_structured_scores_in_both_orders():
    scores = _ria_like(128, 320)
    for pattern in ("32:2:8", "32:2:5"):
        inputs_only = find_permutation(scores, pattern, iters=1, optimize_out=False)
        both = find_permutation(scores, pattern, iters=1)
        assert inputs_only.kept_after > inputs_only.kept_before + 0.005
        assert both.kept_after > both.kept_before + 0.005
        assert not torch.equal(both.perm_out, torch.arange(128))


def test_never_worse_than_identity_even_when_sweeps_propose_worse(monkeypatch):
    """Scores that a V:N:M mask already keeps entirely: any other order can only lose, so identity must win."""
    scores = torch.rand(32, 40) * vnm_mask(torch.rand(32, 40), "8:2:5")
    worse = lambda S, pattern, slots, *rest: slots.flip(0)  # noqa: E731 - a deliberately bad sweep
    monkeypatch.setattr("vnmsparse.permute.search._column_sweep", worse)
    monkeypatch.setattr("vnmsparse.permute.search._row_sweep", lambda mats, pattern, slots, *rest: slots.flip(0))
    r = find_permutation(scores, "8:2:5")
    assert r.kept_before == r.kept_after == pytest.approx(1.0)
    assert torch.equal(r.perm_out, torch.arange(32)) and torch.equal(r.perm_in, torch.arange(40))


def test_blockwise_mode_is_valid_and_close_to_full():
    scores = _ria_like(128, 480, seed=1)
    full = find_permutation(scores, "32:2:8", iters=1)
    fast = find_permutation(scores, "32:2:8", iters=1, chunk=16)
    assert _is_permutation(fast.perm_in, 480) and _is_permutation(fast.perm_out, 128)
    assert fast.kept_after > fast.kept_before
    assert fast.kept_after > full.kept_after - 0.01


def test_joint_search_shares_rows_and_keeps_every_layer_at_least_identity():
    gate, up = _ria_like(96, 80, seed=2), _ria_like(96, 72, seed=3)
    a, b = find_joint_permutation([gate, up], "16:2:5")
    assert torch.equal(a.perm_out, b.perm_out)
    assert a.kept_after >= a.kept_before and b.kept_after >= b.kept_before
    assert a.kept_after + b.kept_after > a.kept_before + b.kept_before


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(scores=[[1.0, 2.0]]), TypeError, "scores"),
        (dict(scores=torch.ones(4, 4, dtype=torch.int64)), TypeError, "scores"),
        (dict(scores=torch.ones(8)), ValueError, "scores"),
        (dict(scores=torch.tensor([[1.0, float("nan")]])), ValueError, "scores"),
        (dict(scores=-torch.ones(2, 2)), ValueError, "scores"),
        (dict(pattern="64:3:8"), ValueError, "N"),
        (dict(pattern=8), TypeError, "pattern"),
        (dict(iters=1.5), TypeError, "iters"),
        (dict(iters=-1), ValueError, "iters"),
        (dict(levels=0), ValueError, "levels"),
        (dict(chunk=1), ValueError, "chunk"),
        (dict(optimize_out="yes"), TypeError, "optimize_out"),
        (dict(out_labels=torch.zeros(3, dtype=torch.int64)), ValueError, "out_labels"),
        (dict(out_labels=torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])), ValueError, "out_labels"),
        (dict(out_labels=torch.zeros(8)), TypeError, "out_labels"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    args = dict(scores=torch.rand(8, 10), pattern="4:2:5") | kwargs
    with pytest.raises(error, match=match):
        find_permutation(**args)


def test_joint_search_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="row count"):
        find_joint_permutation([torch.rand(8, 10), torch.rand(6, 10)], "4:2:5")
