"""V:N:M channel permutation: output and input orders that keep more importance, at zero inference cost.

A V:N:M mask keeps, in every block of V rows x M columns, the 4 columns with the largest score sums and
then the 2 best of those 4 in each row. Which rows share a block (the output order) and which columns
share a group (the input order) therefore decide how much score survives. `find_permutation` searches
both orders by alternating linear sum assignments (scipy's `linear_sum_assignment`):

- Input order (rows fixed). Columns sit in G groups of M slots. A step frees slot s of every group and
  gives the freed columns back, one per group, by an assignment whose gain is the exact change of the
  kept score (stage 1 and stage 2) for that column joining that group, the group's other M-1 columns
  fixed: in row block b, column j enters the 4 kept columns iff its block sum beats the 4th best of
  the others (t4); it then displaces that 4th column and each row r keeps p_r + q_r + max(0, S_rj - q_r),
  p_r >= q_r its 2 best among the 3 remaining. The sum over rows of max(0, x - q) is evaluated as
  sum_k width_k * #{r: q_r < t_k < x_r} over `levels` score thresholds t_k, a matrix product, so one
  step costs a few BLAS calls rather than a (columns x groups x rows) loop.
- Output order (columns fixed). Rows sit in B blocks of V slots. A step frees slot v of every block and
  gives the rows back by an assignment whose gain is what row i keeps in block b with the 4 columns per
  group that block b keeps without its slot-v row (exact unless one row changes a block's choice).
A sweep runs every slot once, after a seeded shuffle inside groups/blocks (free: order inside a group
does not matter) so that successive sweeps explore different neighbourhoods. Each step can only raise
its modelled gain; every candidate is also scored with the real mask (`vnm_mask`), and the best order
seen, identity included, is returned, so the result is never worse than no permutation.
`chunk` splits the groups (and blocks) of a step into random chunks solved separately: the blockwise
fast mode for layers too large for full assignments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ..masks import vnm_mask
from ..pattern import KEPT_COLUMNS, VNMPattern

_GATHER_BUDGET = 1 << 24  # elements in the largest temporary of a gain computation


@dataclass(frozen=True)
class PermutationResult:
    """Orders for one weight: W_p = W[perm_out][:, perm_in], and the score its V:N:M mask keeps.

    perm_out: (R,) int64, row i of W_p is row perm_out[i] of W (output channel order).
    perm_in:  (C,) int64, column j of W_p is column perm_in[j] of W (input channel order).
    kept_before / kept_after: fraction of the total score kept by the V:N:M mask of W / of W_p.
    """

    perm_out: torch.Tensor
    perm_in: torch.Tensor
    kept_before: float
    kept_after: float


def kept_fraction(scores: torch.Tensor, pattern: VNMPattern | str) -> float:
    """Fraction of the total score that the V:N:M mask of `scores` keeps (1.0 for an all-zero matrix)."""
    total = float(scores.sum(dtype=torch.float64))
    kept = float(torch.where(vnm_mask(scores, pattern), scores, 0).sum(dtype=torch.float64))
    return 1.0 if total == 0 else kept / total


def find_permutation(
    scores: torch.Tensor,
    pattern: VNMPattern | str,
    iters: int = 2,
    optimize_out: bool = True,
    out_labels: torch.Tensor | None = None,
    chunk: int | None = None,
    levels: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> PermutationResult:
    """Output and input orders of one (R, C) score matrix that make its V:N:M mask keep more score.

    iters: alternations (a sweep over input slots, then one over output slots). optimize_out=False
    keeps the output order (layers whose outputs no consumer can absorb). out_labels: (R,) labels,
    non-decreasing; a row only moves to a position with its own label (e.g. within an attention head).
    chunk: None for full assignments, or the most groups/blocks per assignment (blockwise fast mode).
    levels: thresholds of the row-hinge estimate (more is closer to exact and slower).
    """
    check_score_matrix(scores, "scores")
    return find_joint_permutation([scores], pattern, iters, optimize_out, out_labels, chunk, levels, seed, progress)[0]


def find_joint_permutation(
    scores: Sequence[torch.Tensor],
    pattern: VNMPattern | str,
    iters: int = 2,
    optimize_out: bool = True,
    out_labels: torch.Tensor | None = None,
    chunk: int | None = None,
    levels: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[PermutationResult]:
    """One output order shared by several layers (e.g. LLaMA gate and up), and an input order for each.

    The shared output order maximises the summed kept score; no layer ends below its own identity
    kept fraction. Arguments as in `find_permutation`; all matrices must have the same row count.
    """
    pattern = _check_args(scores, pattern, iters, optimize_out, out_labels, chunk, levels, seed)
    mats = [s.detach().float().cpu() for s in scores]
    labels = None if out_labels is None else out_labels.to(torch.int64).cpu()
    gen = torch.Generator().manual_seed(seed)
    row_slots = _slots(torch.arange(mats[0].shape[0]), pattern.V)
    col_slots = [_slots(torch.arange(m.shape[1]), pattern.M) for m in mats]
    best = _Best(mats, pattern)

    sides = ("in", "out") if optimize_out else ("in",)
    for side in tqdm([s for _ in range(iters) for s in sides], desc="permutation", disable=not progress, leave=False):
        if side == "in":
            perm_out = _order(row_slots)
            col_slots = [_column_sweep(m[perm_out], pattern, cs, chunk, levels, gen) for m, cs in zip(mats, col_slots)]
        else:
            permuted = [m[:, _order(cs)] for m, cs in zip(mats, col_slots)]
            row_slots = _row_sweep(permuted, pattern, row_slots, labels, chunk, gen)
        best.offer(_order(row_slots), [_order(cs) for cs in col_slots])
    return [PermutationResult(best.perm_out, p, b, k) for p, b, k in zip(best.perm_in, best.before, best.kept)]


class _Best:
    """The best orders seen so far, scored with the real mask; starts at identity, so never worse."""

    def __init__(self, mats: list[torch.Tensor], pattern: VNMPattern) -> None:
        self.mats, self.pattern = mats, pattern
        self.totals = [float(m.sum(dtype=torch.float64)) for m in mats]
        self.before = [kept_fraction(m, pattern) for m in mats]
        self.perm_out = torch.arange(mats[0].shape[0])
        self.perm_in = [torch.arange(m.shape[1]) for m in mats]
        self.kept = list(self.before)

    def _total(self, kept: list[float]) -> float:
        return sum(k * t for k, t in zip(kept, self.totals))

    def offer(self, perm_out: torch.Tensor, perm_in: list[torch.Tensor]) -> None:
        """Keep these orders if they keep more in total and leave no matrix below its identity fraction."""
        kept = [kept_fraction(m[perm_out.unsqueeze(1), p], self.pattern) for m, p in zip(self.mats, perm_in)]
        if all(k >= b for k, b in zip(kept, self.before)) and self._total(kept) > self._total(self.kept):
            self.perm_out, self.perm_in, self.kept = perm_out, perm_in, kept


# --- slot tables ------------------------------------------------------------------------------------
def _slots(order: torch.Tensor, width: int) -> torch.Tensor:
    """(ceil(n / width), width) table of an order; -1 marks the padding slots of a short last row."""
    table = torch.full((math.ceil(len(order) / width) * width,), -1, dtype=torch.int64)
    table[: len(order)] = order
    return table.view(-1, width)


def _order(slots: torch.Tensor) -> torch.Tensor:
    """The order a slot table stands for (only the last row holds padding, so dropping it is exact)."""
    flat = slots.flatten()
    return flat[flat >= 0]


def _shuffle_within(slots: torch.Tensor, gen: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Shuffle each row of a slot table; with labels, only among entries of equal label.

    Entries are sorted by (own label, random): a row of the table holds the same labels as the positions
    it covers, and labels are non-decreasing, so each entry stays inside its label's range (padding last).
    """
    key = torch.rand(slots.shape, generator=gen, dtype=torch.float64)
    if labels is not None:
        key += torch.where(slots >= 0, labels[slots.clamp(min=0)], labels.max() + 1)
    return slots.gather(1, key.argsort(dim=1))


def _chunks(items: torch.Tensor, chunk: int | None, gen: torch.Generator) -> list[torch.Tensor]:
    """All items in one piece, or in random pieces of at most `chunk` (the blockwise fast mode); pieces of
    one item are dropped (nothing to trade)."""
    pieces = [items] if chunk is None or len(items) <= chunk else items[torch.randperm(len(items), generator=gen)].split(chunk)
    return [piece for piece in pieces if len(piece) > 1]


def _assign(gain: torch.Tensor) -> torch.Tensor:
    """source[t]: the source (row of `gain`) that a maximum-gain assignment gives to target t (column).

    Row and column means are subtracted first: every full assignment of a square matrix changes by the
    same constant, and scipy's solver runs about twice as fast on these gains once they are centred.
    """
    g = gain.double()
    g = g - g.mean(dim=1, keepdim=True) - g.mean(dim=0, keepdim=True)
    sources, targets = linear_sum_assignment(g.numpy(), maximize=True)
    source = torch.empty(gain.shape[1], dtype=torch.int64)
    source[torch.from_numpy(targets)] = torch.from_numpy(sources)
    return source


# --- input order ----------------------------------------------------------------------------------------
def _column_sweep(S: torch.Tensor, pattern: VNMPattern, slots: torch.Tensor, chunk: int | None,
                  levels: int, gen: torch.Generator) -> torch.Tensor:
    """One pass over the M slots of every column group; S's rows are already in output order."""
    R, C = S.shape
    V, M = pattern.V, pattern.M
    B = math.ceil(R / V)
    blocks = torch.nn.functional.pad(S, (0, 1, 0, B * V - R)).view(B, V, C + 1)  # column C: zero stand-in
    sums = blocks.sum(dim=1)  # (B, C + 1): column sums per row block
    mids, widths = _thresholds(S, levels)
    slots = _shuffle_within(slots, gen)
    pad_column = torch.full((len(slots), 1), C)  # guarantees >= 4 "others" when M == 4
    for s in range(M):
        for part in _chunks((slots[:, s] >= 0).nonzero()[:, 0], chunk, gen):
            table = torch.where(slots[part] < 0, C, slots[part])
            others = torch.cat((table[:, :s], table[:, s + 1 :], pad_column[: len(part)]), dim=1)
            gain = _column_gain(blocks, sums, table[:, s], others, mids, widths)
            slots[part, s] = slots[part, s][_assign(gain)]
    return slots


def _thresholds(S: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints and widths of `levels` intervals between score quantiles (0 to the maximum)."""
    flat = S.flatten()
    sample = flat[:: max(1, len(flat) // (1 << 20))].double()  # quantile() refuses very large inputs
    edges = torch.quantile(sample, torch.linspace(0, 1, levels + 1, dtype=torch.float64))
    edges[0], edges[-1] = 0.0, float(S.max())
    return ((edges[1:] + edges[:-1]) / 2).float(), (edges[1:] - edges[:-1]).float()


def _column_gain(blocks: torch.Tensor, sums: torch.Tensor, candidates: torch.Tensor, others: torch.Tensor,
                 mids: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """gain[j, g]: change of the kept score if candidate column j joins group g (g's others fixed)."""
    B, V, _ = blocks.shape
    P = len(candidates)
    top = sums[:, others].topk(KEPT_COLUMNS, dim=-1)  # (B, P, 4): each group's 4 best others per block
    kept_columns = others.expand(B, -1, -1).gather(2, top.indices).transpose(1, 2)  # (B, 4, P), best first
    at_kept = blocks.gather(2, kept_columns.reshape(B, 1, -1).expand(-1, V, -1)).view(B, V, KEPT_COLUMNS, P)
    p, q = _two_largest(at_kept[:, :, :3].unbind(2))  # (B, V, P) each: a row's best 2 among the 3 best others
    displaced = (p + q - sum(_two_largest(at_kept.unbind(2)))).sum(dim=1)  # (B, P): change if the 4th leaves
    x = blocks[:, :, candidates]  # (B, V, P)
    gain = torch.zeros(P, P)
    step = max(1, _GATHER_BUDGET // (P * max(P, len(mids) * V)))
    for b in range(0, B, step):
        part = slice(b, b + step)
        term = _hinge(x[part], q[part], displaced[part], mids, widths)  # (n, Pj, Pg)
        term.mul_(sums[part, candidates].unsqueeze(2) > top.values[part, :, -1].unsqueeze(1))  # j beats the 4th
        gain += term.sum(dim=0, dtype=torch.float32)
    return gain


def _hinge(x: torch.Tensor, q: torch.Tensor, displaced: torch.Tensor, mids: torch.Tensor,
           widths: torch.Tensor) -> torch.Tensor:
    """(n, Pj, Pg): displaced[:, g] + sum over rows of max(0, x[:, r, j] - q[:, r, g]).

    The hinge sum is sum_k width_k * #{r: q < mid_k < x}, one matrix product per block, in bfloat16
    (0/1 indicators are exact; widths and the result round to 8 bits, which only perturbs costs).
    """
    n, _, P = x.shape
    k = mids.view(1, -1, 1, 1)
    above = (x.unsqueeze(1) > k).flatten(1, 2).to(torch.bfloat16)  # (n, levels * V, Pj)
    below = ((q.unsqueeze(1) < k) * widths.view(1, -1, 1, 1)).flatten(1, 2).to(torch.bfloat16)  # (n, levels * V, Pg)
    ones = torch.ones(n, 1, P, dtype=torch.bfloat16)
    above = torch.cat((above, ones), dim=1)
    below = torch.cat((below, displaced.unsqueeze(1).to(torch.bfloat16)), dim=1)
    return above.transpose(1, 2) @ below


def _two_largest(values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise largest and second largest of a few same-shape tensors (topk is slow on 3-4 entries)."""
    first, second = values[0], torch.full_like(values[0], float("-inf"))
    for x in values[1:]:
        second = torch.maximum(second, torch.minimum(first, x))
        first = torch.maximum(first, x)
    return first, second


# --- output order ---------------------------------------------------------------------------------------
def _row_sweep(mats: list[torch.Tensor], pattern: VNMPattern, slots: torch.Tensor, labels: torch.Tensor | None,
               chunk: int | None, gen: torch.Generator) -> torch.Tensor:
    """One pass over the V slots of every row block; each matrix's columns are already in input order."""
    R, V = mats[0].shape[0], pattern.V
    slots = _shuffle_within(slots, gen, labels)
    padded = [_pad_for_rows(m, pattern) for m in mats]  # row R: zero stand-in for padding slots
    sums = [p[torch.where(slots < 0, R, slots)].sum(dim=1) for p in padded]  # (B, G*M) per matrix
    for v in range(V):
        for part in _row_parts(slots, v, labels, chunk, gen):
            rows = slots[part, v]
            gain = sum(_row_gain(p[rows], s[part] - p[rows], pattern.M) for p, s in zip(padded, sums))
            new = rows[_assign(gain)]
            for p, s in zip(padded, sums):
                s[part] += p[new] - p[rows]
            slots[part, v] = new
    return slots


def _pad_for_rows(S: torch.Tensor, pattern: VNMPattern) -> torch.Tensor:
    """S with columns zero-padded to whole groups and one zero row appended."""
    groups = math.ceil(S.shape[1] / pattern.M)
    return torch.nn.functional.pad(S, (0, groups * pattern.M - S.shape[1], 0, 1))


def _row_parts(slots: torch.Tensor, v: int, labels: torch.Tensor | None, chunk: int | None,
               gen: torch.Generator) -> list[torch.Tensor]:
    """The blocks whose slot v is real, split into sets whose slot-v rows may trade places."""
    blocks = (slots[:, v] >= 0).nonzero()[:, 0]
    if labels is None:
        return _chunks(blocks, chunk, gen)
    label = labels[slots[blocks, v]]  # rows trade only with rows of their own label
    values, counts = label.unique(return_counts=True)
    return [piece for value in values[counts > 1] for piece in _chunks(blocks[label == value], chunk, gen)]


def _row_gain(rows: torch.Tensor, block_sums: torch.Tensor, M: int) -> torch.Tensor:
    """gain[i, b]: what row i keeps in block b, given the 4 columns per group that b keeps without it."""
    P, width = rows.shape
    G = width // M
    keep = block_sums.view(-1, G, M).topk(KEPT_COLUMNS, dim=-1).indices.transpose(1, 2)  # (Pb, 4, G)
    grouped = rows.view(P, G, M).transpose(1, 2).unsqueeze(1)  # (P, 1, M, G)
    gain = torch.empty(P, len(block_sums))
    step = max(1, _GATHER_BUDGET // (len(block_sums) * G * KEPT_COLUMNS))
    for i in range(0, P, step):
        part = grouped[i : i + step].expand(-1, len(block_sums), -1, -1)
        at_kept = part.gather(2, keep.expand(len(part), -1, -1, -1))  # (n, Pb, 4, G)
        gain[i : i + step] = sum(_two_largest(at_kept.unbind(2))).sum(dim=-1)
    return gain


# --- applying orders to a model ---------------------------------------------------------------------------


def check_score_matrix(scores: object, name: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (out_features, in_features) tensor, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"{name} must be finite and non-negative (importance scores); it holds NaN, inf or negatives")


def _check_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_args(scores: Sequence[torch.Tensor], pattern: VNMPattern | str, iters: int, optimize_out: bool,
                out_labels: torch.Tensor | None, chunk: int | None, levels: int, seed: int) -> VNMPattern:
    """Validate the search's arguments (TypeError / ValueError naming the argument); return the pattern."""
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence) or len(scores) == 0:
        raise TypeError("scores must be a non-empty sequence of 2-D tensors sharing their row count")
    for i, s in enumerate(scores):
        check_score_matrix(s, f"scores[{i}]")
    rows = {s.shape[0] for s in scores}
    if len(rows) != 1:
        raise ValueError(f"scores must share one row count (one output order), got {sorted(rows)}")
    pattern = VNMPattern.parse(pattern)
    _check_int(iters, "iters", 0)
    _check_int(levels, "levels", 1)
    _check_int(seed, "seed", 0)
    if chunk is not None:
        _check_int(chunk, "chunk", 2)
    if not isinstance(optimize_out, bool):
        raise TypeError(f"optimize_out must be a bool, got {type(optimize_out).__name__}")
    if out_labels is not None:
        _check_labels(out_labels, rows.pop())
    return pattern


def _check_labels(labels: object, rows: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"out_labels must be an int32/int64 tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (rows,):
        raise ValueError(f"out_labels must have shape ({rows},) (one label per output row), got {tuple(labels.shape)}")
    if (labels[1:] < labels[:-1]).any():
        raise ValueError("out_labels must be non-decreasing (each label marks one contiguous range of rows)")
