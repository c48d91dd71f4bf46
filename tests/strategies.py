"""Hypothesis strategies shared by the tests: patterns, shapes (odd ones included) and score matrices."""

import torch
from hypothesis import strategies as st

from vnmsparse import VNMPattern

patterns = st.builds(VNMPattern, V=st.sampled_from([1, 2, 3, 4, 8, 16]), M=st.integers(4, 11))


@st.composite
def scores_for(draw, pattern: VNMPattern, ties: bool | None = None):
    """A score matrix whose shape need not divide the pattern; `ties` draws from few integer values."""
    rows = draw(st.integers(1, 3 * pattern.V + 2))
    cols = draw(st.integers(1, 3 * pattern.M + 3))
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans()) if ties is None else ties
    gen = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (rows, cols), generator=gen).float()
    return torch.rand(rows, cols, generator=gen)
