"""Build V:N:M masks from scores, and check that a mask is V:N:M. Vectorized, on any device.

The rule (the brief's, exactly): in each V x M block keep the 4 columns with the largest column sums of
scores; in each row keep the 2 largest scores among those 4 columns; prune everything else.

Shapes that do not divide: rows are padded to a multiple of V and columns to a multiple of M. A short
last row block simply has fewer rows (its column sums run over its real rows). A short last column
group of width w < M chooses among its w real columns: padding columns score -inf, so they are only
ever used when w < 4, and then every real column of that group is kept and each row keeps min(w, 2)
real weights. Ties go to the lower index, on every device, because selection is by exact rank
comparison rather than by a sort whose tie order is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import KEPT_COLUMNS, KEPT_PER_ROW, VNMPattern


@dataclass(frozen=True)
class Selection:
    """Which weights a V:N:M encoding keeps, in the compressed format's terms.

    columns: (B, G, 4) int64, the kept columns of each V x M block, ascending, as indices into the
             zero-padded width G*M (indices >= C are padding slots).
    slots:   (R, G, 2) int64, for each row and group the two slots (0..3, ascending) it keeps.
    """

    columns: torch.Tensor
    slots: torch.Tensor


def _top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries along the last dim; among equal values the lower index wins.

    Entry i is beaten by j when values[j] > values[i], or when they are equal and j < i; it is kept when
    fewer than k entries beat it. Exact comparisons make the result identical on CPU and CUDA. Each pair
    is compared once: for i, against every j > i at the same time.
    """
    width = values.shape[-1]
    beaten = torch.zeros(values.shape, dtype=torch.int32, device=values.device)
    for i in range(width - 1):
        later_wins = values[..., i + 1 :] > values[..., i : i + 1]  # j > i beats i only if strictly larger
        beaten[..., i] += later_wins.sum(dim=-1, dtype=torch.int32)
        beaten[..., i + 1 :] += ~later_wins
    return beaten < k


def _kept_indices(keep: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) along the last dim of a bool mask that has exactly `count` True per row."""
    return keep.nonzero()[:, -1].view(*keep.shape[:-1], count)


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 2-D tensor (out_features, in_features), got {tuple(scores.shape)}")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"scores must be a real-valued tensor, got {scores.dtype}")
    if scores.is_meta:
        raise ValueError("scores are on the meta device (shapes only); a mask needs their values")
    if scores.is_floating_point() and not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; importance scores must be finite")


def _column_sums(scores: torch.Tensor, V: int) -> torch.Tensor:
    """(B, V, G, M) zero-padded scores -> (B, G, M) float64 column sums of each block.

    float64 holds every float32 / fp16 / bf16 sum of up to 2^29 terms exactly enough that CPU and CUDA agree, and
    int32 scores exactly; float64 scores near its range are first scaled by a power of two (exact), so that a sum
    never overflows to inf (and inf - inf never becomes NaN).
    """
    s = scores.to(torch.float64)
    if scores.dtype == torch.float64:
        exponent = int(torch.frexp(s.abs().max()).exponent)
        if exponent > 1000 - V.bit_length():
            s = torch.ldexp(s, torch.tensor(-exponent, dtype=torch.float64, device=s.device))
    return s.sum(dim=1)


def _pad(x: torch.Tensor, right: int, bottom: int, value: float) -> torch.Tensor:
    """Pad a 2-D tensor on the right and bottom; no copy when nothing is added."""
    if right == 0 and bottom == 0:
        return x
    return torch.nn.functional.pad(x, (0, right, 0, bottom), value=value)


def select(scores: torch.Tensor, pattern: VNMPattern) -> Selection:
    """Apply the V:N:M rule to a score matrix and return the kept columns and slots."""
    _check_scores(scores)
    pattern = VNMPattern.parse(pattern)
    R, C = scores.shape
    V, M = pattern.V, pattern.M
    B, G = pattern.blocks(R, C)
    Rp, Cp = B * V, G * M
    s = scores.detach()  # ranked in its own dtype: a cast to float32 would merge scores that differ

    # Column sums per V x M block, in float64 so that CPU and CUDA see the same sums.
    zero_padded = _pad(s, Cp - C, Rp - R, 0)
    col_sums = _column_sums(zero_padded.view(B, V, G, M), V)  # (B, G, M)
    col_sums.view(B, Cp)[:, C:] = float("-inf")  # padding columns lose to every real one
    local = _kept_indices(_top_k(col_sums, KEPT_COLUMNS), KEPT_COLUMNS)  # (B, G, 4) in 0..M-1
    del zero_padded, col_sums

    # Each row's scores at its block's 4 kept columns, then its 2 best. Padding scores the lowest value of the dtype:
    # a tie with a real score goes to the real column, which has the lower index.
    lowest = float("-inf") if s.is_floating_point() else torch.iinfo(s.dtype).min
    row_padded = _pad(s, Cp - C, 0, lowest).view(R, G, M)
    local_per_row = local.repeat_interleave(V, dim=0)[:R]  # (R, G, 4)
    kept_scores = row_padded.gather(2, local_per_row)
    slots = _kept_indices(_top_k(kept_scores, KEPT_PER_ROW), KEPT_PER_ROW)  # (R, G, 2)

    offsets = torch.arange(G, device=s.device).view(1, G, 1) * M
    return Selection(columns=local + offsets, slots=slots)


def selection_to_mask(selection: Selection, shape: tuple[int, int], pattern: VNMPattern) -> torch.Tensor:
    """The bool (R, C) mask that a selection keeps (padding slots dropped)."""
    R, C = shape
    _, G = pattern.blocks(R, C)
    per_row = selection.columns.repeat_interleave(pattern.V, dim=0)[:R]  # (R, G, 4)
    kept = per_row.gather(2, selection.slots).view(R, 2 * G)  # padded column index of each kept weight
    mask = torch.zeros(R, G * pattern.M, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, True)
    return mask[:, :C]


def vnm_mask(scores: torch.Tensor, pattern: VNMPattern | str) -> torch.Tensor:
    """The V:N:M mask (bool, same shape and device as `scores`) that keeps the most important weights."""
    pattern = VNMPattern.parse(pattern)
    return selection_to_mask(select(scores, pattern), tuple(scores.shape), pattern)


def mask_to_selection(mask: torch.Tensor, pattern: VNMPattern) -> Selection:
    """Encode a V:N:M mask. Blocks using fewer than 4 columns, and rows with fewer than 2 weights, are
    filled with the lowest unused slots (they will hold zeros). Raises if the mask is not V:N:M."""
    check_vnm(mask, pattern)
    R, C = mask.shape
    V, M = pattern.V, pattern.M
    B, G = pattern.blocks(R, C)
    padded = torch.nn.functional.pad(mask, (0, G * M - C, 0, B * V - R)).view(B, V, G, M)
    used = padded.any(dim=1)  # (B, G, M)
    real = (torch.arange(G * M, device=mask.device) < C).view(1, G, M)
    preference = used.to(torch.int8) * 2 + real.to(torch.int8)  # used first, then real, then padding
    local = _kept_indices(_top_k(preference, KEPT_COLUMNS), KEPT_COLUMNS)  # (B, G, 4)
    in_slot = padded.reshape(B * V, G, M)[:R].gather(2, local.repeat_interleave(V, dim=0)[:R])  # (R, G, 4)
    slots = _kept_indices(_top_k(in_slot.to(torch.int8), KEPT_PER_ROW), KEPT_PER_ROW)
    offsets = torch.arange(G, device=mask.device).view(1, G, 1) * M
    return Selection(columns=local + offsets, slots=slots)


def _first_violation(mask: torch.Tensor, pattern: VNMPattern) -> str | None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2 or mask.numel() == 0:
        raise ValueError(f"mask must be a non-empty 2-D tensor, got shape {tuple(mask.shape)}")
    if mask.is_meta:
        raise ValueError("mask is on the meta device (shapes only); checking it needs its values")
    pattern = VNMPattern.parse(pattern)
    m = mask if mask.dtype == torch.bool else mask != 0
    R, C = m.shape
    V, M = pattern.V, pattern.M
    B, G = pattern.blocks(R, C)
    blocks = torch.nn.functional.pad(m, (0, G * M - C, 0, B * V - R)).view(B, V, G, M)
    columns_used = blocks.any(dim=1).sum(dim=-1)  # (B, G)
    bad = (columns_used > KEPT_COLUMNS).nonzero()
    if len(bad):
        b, g = bad[0].tolist()
        return (f"block (rows {b * V}..{min((b + 1) * V, R) - 1}, columns {g * M}..{min((g + 1) * M, C) - 1}) "
                f"uses {int(columns_used[b, g])} columns; V:N:M allows at most {KEPT_COLUMNS}")
    per_row = blocks.sum(dim=-1)  # (B, V, G)
    bad = (per_row > KEPT_PER_ROW).nonzero()
    if len(bad):
        b, v, g = bad[0].tolist()
        return (f"row {b * V + v} keeps {int(per_row[b, v, g])} weights in columns {g * M}..{min((g + 1) * M, C) - 1}; "
                f"V:N:M allows at most {KEPT_PER_ROW}")
    return None


def is_vnm(mask: torch.Tensor, pattern: VNMPattern | str) -> bool:
    """True when the mask fits the pattern: <= 4 columns used per V x M block and <= 2 kept per row in each."""
    return _first_violation(mask, VNMPattern.parse(pattern)) is None


def check_vnm(mask: torch.Tensor, pattern: VNMPattern | str) -> None:
    """Raise ValueError naming the first block or row that breaks the pattern."""
    pattern = VNMPattern.parse(pattern)
    problem = _first_violation(mask, pattern)
    if problem is not None:
        raise ValueError(f"mask is not {pattern}: {problem}")
