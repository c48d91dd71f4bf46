"""Packing: the canonical `VNMTensor` -> the layout the CUDA kernels read (and back, for tests and CPU).

With R x C logical, G = ceil(C/M) groups, Rt = ceil(R/16) row tiles, Kc = ceil(G/8) chunks of 8 groups
(one mma.sp k=32 step: 8 groups x 4 kept columns), Gp = 8*Kc, Bn = ceil(R/V):

- `a_vals` (Rt, Kc, 32, 8), the weight dtype: the mma.sp A fragment of each 16-row x 8-group record, lane
  l = 4*gid + t holding 4 registers of 2 values: (row gid, group t), (row gid+8, group t),
  (row gid, group t+4), (row gid+8, group t+4); the first value (lower slot) in the low half. A lane reads
  its 16 bytes with one load; a warp reads one 512-byte record.
- `a_meta` (Rt, Kc, 16) int32 (bit pattern of uint32): word 2*gid + h is the metadata of lanes 4*gid + h
  (sparsity selector 0): groups 4h..4h+3 of row gid in bits 0-15 and of row gid+8 in bits 16-31, one
  nibble p0 | p1 << 2 per group (exactly the canonical `positions` nibble).
- `cols` (Bn, Gp, 4) int32: the canonical kept columns, with padding slots (index >= C) remapped to
  column C-1 and padding groups (g >= G) to the first column of their chunk, so a kernel never reads x
  out of bounds. Values there are zero, so what is read does not matter.
- `window`: 8*M when every group's kept columns lie in the group's own M input columns, in ascending order
  (true unless an input permutation was folded in), else 0. Chunk kc then reads only x columns
  [kc*8M, (kc+1)*8M): the decode kernel loads that window with coalesced 16-byte copies, issued with the
  weights, instead of a gather that waits for the column indices; for M = 4 on sm_90 the window
  tensor-core kernel (vnm_wgmma_window.cuh) multiplies x's tiles directly (the records are 2:4 over them).

Padding rows and groups hold zero values and the valid metadata nibble 0b0100 (slots 0 and 1).

`two_four_tensor` re-expresses a V:2:M weight (5 <= M <= 8, permuted or not) as V:2:4 over its input columns laid out
in whole quads (`two_four_slots`), whose pack has window = 32: the optional 2:4 copy the window kernel multiplies
beyond decode (`VNMLinear(two_four_copy=True)`, or per call `ops.linear(..., two_four_copy=True)`). Where that layout
is not x's own column order (M not a multiple of 4, a folded input permutation), the pack's `inputs` say which x
column each of its input columns reads, and a call gathers them first.

The same arrays feed the sm_90a sparse-wgmma kernel (vnm_wgmma.cuh) unchanged: a 16-row record is exactly the
register fragment warp w of a warpgroup supplies to `wgmma.mma_async.sp.m64nNk32` for rows 16w..16w+15 of an
m64 tile (A from registers; metadata with sparsity selector 0), so record 4*tile + w is what warp w loads. One
packed copy of the weights serves the decode, mma.sp and wgmma kernels (tests/ops/test_wgmma_layout.py checks
this against the ISA's layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..format import VNMTensor, compress, nibbles_from_slots, slots_from_nibbles
from ..pattern import VNMPattern
from .limits import check_packable

_PAD_NIBBLE = 0b0100  # p0 = 0, p1 = 1: a valid ordered 2:4 index pair


@dataclass(frozen=True)
class PackedVNM:
    """Kernel layout of one V:N:M weight on one device. Build with `pack_for_device`."""

    a_vals: torch.Tensor  # (Rt, Kc, 32, 8) weight dtype
    a_meta: torch.Tensor  # (Rt, Kc, 16) int32
    cols: torch.Tensor  # (Bn, Gp, 4) int32
    shape: tuple[int, int]  # logical (R, C)
    V: int
    M: int
    window: int = 0  # 8*M if every group's kept columns lie in its own M input columns (ascending), else 0
    inputs: torch.Tensor | None = None  # (C,) int64 x column of each input column (a 2:4 copy's layout); None: x's own

    @property
    def dtype(self) -> torch.dtype:
        return self.a_vals.dtype

    @property
    def device(self) -> torch.device:
        return self.a_vals.device

    @property
    def nbytes(self) -> int:
        parts = (self.a_vals, self.a_meta, self.cols) if self.inputs is None else (self.a_vals, self.a_meta, self.cols, self.inputs)
        return sum(t.numel() * t.element_size() for t in parts)


class TwoFourCopy(NamedTuple):
    """A weight re-expressed as V:2:4 (`two_four_tensor`): y = x[..., inputs] @ tensor^T, or x @ tensor^T without inputs."""

    tensor: VNMTensor  # V:2:4, R x (its input columns)
    inputs: torch.Tensor | None  # (its input columns,) int64: the x column each reads; None: x's own columns, in order


def two_four_slots(counts: list[int]) -> tuple[list[int], list[int]]:
    """Where the 2:4 copy puts each group's input columns, for groups of `counts[g]` columns: (head, tail).

    A row stores at most 2 weights per group, so a quad of columns holds at most 2 stored weights of every row when
    its columns all come from one group, or when it holds one column of each of two groups. So group g's first
    4 * (counts[g] // 4) columns fill whole quads from slot head[g], and the rest (its tail) go from slot tail[g]:
    a tail of one column shares a quad with the next such tail, a tail of 2 or 3 has a quad of its own, the other
    slots padding. At M = 8 the slots are the columns themselves; at M = 5, 12 slots hold two groups' 10 columns."""
    head, tail, width, shared = [], [], 0, None
    for count in counts:
        head.append(width)
        width += 4 * (count // 4)
        rest = count % 4
        if rest == 1 and shared is not None:
            tail.append(shared + 1)
            shared = None
            continue
        tail.append(width)
        if rest == 1:
            shared = width
        width += 4 if rest else 0
    return head, tail


def two_four_width(C: int, M: int, permuted: bool = False) -> int:
    """Input columns of the 2:4 copy of an R x C V:2:M weight whose every group keeps all its columns somewhere (as
    unpermuted weights and almost every permuted one with more than one row block do; `permuted`: an input
    permutation is folded in, so the layout is never x's own order): what dispatch matches measured cases by."""
    used, identity = _whole_group_layout(C, M, permuted)
    return _copy_width(used, identity)


def two_four_gathers(C: int, M: int, permuted: bool = False) -> bool:
    """Whether such a weight's 2:4 copy reads other columns than x's own, in order, so that each call gathers x
    first (`PackedVNM.inputs`): M = 5-7 (unless one group spans C), or a folded input permutation."""
    return not _whole_group_layout(C, M, permuted)[1]


def _whole_group_layout(C: int, M: int, permuted: bool) -> tuple[int, bool]:
    """(slots used, whether they are x's own columns in order) of the copy of a weight whose groups keep all M."""
    columns = torch.arange(C)
    _, used, identity = _member_slots(columns, columns // M, C)
    return used, identity and not permuted


def _member_slots(columns: torch.Tensor, groups: torch.Tensor, C: int) -> tuple[torch.Tensor, int, bool]:
    """Where the copy puts each of its member columns (`two_four_slots`), with the slots used and whether every
    column sits in its own slot (x's own columns, in order). Members come sorted by group, then column; `groups`
    says each one's group, `columns` its column of x."""
    counts = torch.bincount(groups)
    head, tail = (torch.tensor(v, dtype=torch.int64, device=groups.device) for v in two_four_slots(counts.tolist()))
    rank = torch.arange(groups.numel(), device=groups.device) - (torch.cumsum(counts, 0) - counts)[groups]
    whole = 4 * (counts[groups] // 4)
    slots = torch.where(rank < whole, head[groups] + rank, tail[groups] + rank - whole)
    used = int(slots.max()) + 1
    return slots, used, used == C and bool((slots == columns).all())


def _copy_width(used: int, identity: bool) -> int:
    """The copy's input columns from the slots it uses: as many where it reads x's own columns, else padded to a
    multiple of 64, so that every row of the gathered x starts a 128-byte line: the window kernel's TMA boxes are
    64 columns wide, and rows that straddle lines cost it about half its speed."""
    return used if identity else -(-used // 64) * 64


def two_four_tensor(tensor: VNMTensor) -> TwoFourCopy:
    """The same weight as a V:2:4 `VNMTensor` over its input columns laid out in whole quads (`two_four_slots`; a group's
    columns are those any row block keeps, and all M of an unpermuted weight's), with the x column each reads: what
    the sm_90 window kernel multiplies with TMA tiles of x, no gather per row block. Every V:2:M weight has one; it
    stores half a value per input column of the layout: C/2 per row at M = 8, 0.6 C at M = 5, 0.57 C at M = 7,
    0.67 C at M = 6 (the V:2:M form: 2C/M). `inputs` is None where the layout is x's own columns in order
    (unpermuted, M a multiple of 4)."""
    if not isinstance(tensor, VNMTensor):
        raise TypeError(f"tensor must be a VNMTensor, got {type(tensor).__name__}")
    R, C = tensor.shape
    V, G = tensor.pattern.V, tensor.groups
    cols = tensor.columns.to(torch.int64)  # (Bn, G, 4); >= C: a padding slot (its values are zero)
    real = cols < C
    kept = (torch.arange(G, device=cols.device).view(1, G, 1) * C + cols)[real]  # (group, column) as one sortable key
    members, member_slot, width, identity = _copy_layout(tensor, kept)
    inputs = torch.zeros(width, dtype=torch.int64, device=cols.device)  # padding slots read column 0 (zero weights)
    inputs[member_slot] = members % C
    # The copy's column of every (row block, group, kept slot) of the canonical form; padding slots stay -1 (dropped).
    slot = torch.full_like(cols, -1)
    slot[real] = member_slot[torch.searchsorted(members, kept)]
    dense = torch.zeros(R, width, dtype=tensor.dtype, device=cols.device)
    stored = torch.zeros(R, width, dtype=torch.bool, device=cols.device)
    values = tensor.values.view(R, G, 2)
    rows_per_step = max(V, (1 << 22) // max(G, 1) // V * V)  # bound the (rows, G, 4) temporaries
    for r0 in range(0, R, rows_per_step):
        r1 = min(R, r0 + rows_per_step)
        block_slots = slot[r0 // V: -(-r1 // V)].repeat_interleave(V, dim=0)[: r1 - r0]
        where = block_slots.gather(2, slots_from_nibbles(tensor.positions[r0:r1], G))  # (rows, G, 2)
        keep = where >= 0
        row = torch.arange(r0, r1, device=cols.device).view(-1, 1, 1).expand_as(where)
        dense[row[keep], where[keep]] = values[r0:r1][keep]
        stored[row[keep], where[keep]] = True
    copy = compress(dense, VNMPattern(V=V, M=4), mask=stored)
    return TwoFourCopy(copy, None if identity else inputs)


def _copy_layout(tensor: VNMTensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """The 2:4 copy's input columns: (members, slots, width, identity). `kept` are the keys g * C + column of the
    columns its row blocks keep; `members`, sorted, every group's columns as keys: those kept anywhere, and all M of
    an unpermuted weight's; `slots` where the copy puts each (`two_four_slots`); `width` its input columns;
    `identity` whether they are x's own, in order."""
    C = tensor.shape[1]
    M, G = tensor.pattern.M, tensor.groups
    device = kept.device
    members = kept
    if pack_window(tensor):
        own = torch.arange(G * M, device=device)
        members = torch.cat((members, ((own // M) * C + own)[own < C]))
    members = torch.unique(members)
    slots, used, identity = _member_slots(members % C, members // C, C)
    return members, slots, _copy_width(used, identity), identity


def packed_layout(tensor: VNMTensor, device: torch.device | str, two_four: bool = False) -> PackedVNM:
    """The kernel layout of `tensor` on `device`, built once (`pack_for_device`) and cached on the tensor
    (`VNMTensor.layouts`). two_four: the layout of its 2:4 copy (`pack_two_four`), a separate entry. Called per matmul by `ops.linear`: the common case is one dict lookup."""
    key = (device, "2:4") if two_four else device
    packed = tensor.layouts.get(key)
    if packed is None:
        device = torch.device(device)
        key = (device, "2:4") if two_four else device
        if key not in tensor.layouts:
            tensor.layouts[key] = pack_two_four(tensor, device) if two_four else pack_for_device(tensor, device)
        packed = tensor.layouts[key]
    return packed


def copy_inputs(x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """x's columns in the order a 2:4 copy's layout reads them (`PackedVNM.inputs`): x[..., inputs], contiguous."""
    return x.index_select(-1, inputs)


def pack_two_four(tensor: VNMTensor, device: torch.device | str) -> PackedVNM:
    """The kernel layout of `tensor`'s 2:4 copy (`two_four_tensor`) on `device`, with the x columns it reads."""
    copy = two_four_tensor(tensor)
    packed = pack_for_device(copy.tensor, device)
    return packed if copy.inputs is None else replace(packed, inputs=copy.inputs.to(packed.device))


def packed_chunks(C: int, M: int) -> int:
    """Kc: the packed layout's chunks (k = 32 steps of 8 groups of M columns) over C input columns."""
    return -(-(-(-C // M)) // 8)


def pack_for_device(tensor: VNMTensor, device: torch.device | str) -> PackedVNM:
    """Build the kernel layout of a `VNMTensor` on `device` (`packed_layout` caches it on the tensor)."""
    V, M = tensor.pattern.V, tensor.pattern.M
    check_packable(V, M, tensor.values.dtype)
    device = torch.device(device)
    R, C = tensor.shape
    G = tensor.groups
    Rt, Kc = -(-R // 16), packed_chunks(C, M)
    Gp = 8 * Kc
    Bn = -(-R // V)

    values = tensor.values.to(device)
    positions = tensor.positions.to(device)
    columns = tensor.columns.to(device)

    # Values: (R, G, 2) -> zero-padded (Rt*16, Gp, 2) -> fragment order.
    vals = torch.zeros(Rt * 16, Gp, 2, dtype=values.dtype, device=device)
    vals[:R, :G] = values.view(R, G, 2)
    # (Rt, hi, gid, Kc, gh, t, k) -> (Rt, Kc, gid, t, gh, hi, k): lane = 4*gid + t, register = 2*gh + hi.
    a_vals = vals.view(Rt, 2, 8, Kc, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6).reshape(Rt, Kc, 32, 8).contiguous()

    # Metadata nibbles (R, G) from the canonical positions, padded with a valid pair.
    p = positions.to(torch.int64)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(1)[:, :G]
    nibbles = torch.full((Rt * 16, Gp), _PAD_NIBBLE, dtype=torch.int64, device=device)
    nibbles[:R, :G] = nib
    # (Rt, hi, gid, Kc, h, j) -> word(Rt, Kc, gid, h) = sum_j,hi nibble << (16*hi + 4*j).
    nb = nibbles.view(Rt, 2, 8, Kc, 2, 4)
    shifts = (16 * torch.arange(2, device=device).view(1, 2, 1, 1, 1, 1) + 4 * torch.arange(4, device=device))
    words = (nb << shifts).sum(dim=(1, 5))  # (Rt, gid, Kc, h)
    words = torch.where(words >= 2**31, words - 2**32, words)  # uint32 bit pattern in int32
    a_meta = words.permute(0, 2, 1, 3).reshape(Rt, Kc, 16).to(torch.int32).contiguous()

    # Column indices: padding slots -> C-1 (in the last group's columns), padding groups -> their chunk's first
    # column (< C: a chunk holds at least one real group).
    chunk_start = (torch.arange(Gp, device=device, dtype=torch.int32) // 8 * (8 * M)).view(1, Gp, 1)
    cols = chunk_start.expand(Bn, Gp, 4).contiguous()
    cols[:, :G] = torch.where(columns >= C, torch.full_like(columns, C - 1), columns)
    return PackedVNM(a_vals=a_vals, a_meta=a_meta, cols=cols, shape=(R, C), V=V, M=M, window=pack_window(tensor))


def pack_window(tensor: VNMTensor) -> int:
    """The `PackedVNM.window` of `tensor`'s pack, read from its canonical columns without packing: 8*M when every
    kept column (padding slots too) lies inside its own group's M columns, in ascending order; else 0."""
    M, G, columns = tensor.pattern.M, tensor.groups, tensor.columns
    group_start = (torch.arange(G, device=columns.device, dtype=torch.int32) * M).view(1, G, 1)
    local = bool(((columns >= group_start) & (columns < group_start + M)).all() and (columns[..., 1:] > columns[..., :-1]).all())
    return 8 * M if local else 0


def padding_columns(tensor: VNMTensor) -> torch.Tensor:
    """(K, 2) int64 rows [flat index into `tensor.columns`, column] of its padding slots (column >= C): the only
    part of the canonical form a pack does not keep (it maps them to C-1), for `unpack_tensor`."""
    flat = tensor.columns.reshape(-1)
    where = (flat >= tensor.shape[1]).nonzero()[:, 0]
    return torch.stack((where, flat[where].to(torch.int64)), dim=1)


def _fragment_values(a_vals: torch.Tensor) -> torch.Tensor:
    """(Rt, Kc, 32, 8) fragments -> (Rt*16, Gp, 2) values per row and group, the inverse of the pack's order."""
    Rt, Kc = a_vals.shape[:2]
    return a_vals.view(Rt, Kc, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6).reshape(Rt * 16, 8 * Kc, 2)


def _meta_nibbles(a_meta: torch.Tensor) -> torch.Tensor:
    """(Rt, Kc, 16) metadata words -> (Rt*16, Gp) int64 nibbles p0 | p1 << 2 per row and group."""
    Rt, Kc = a_meta.shape[:2]
    words = a_meta.to(torch.int64) & 0xFFFFFFFF  # (Rt, Kc, 16), word 2*gid + h
    w = words.view(Rt, Kc, 8, 2).permute(0, 2, 1, 3)  # (Rt, gid, Kc, h)
    shifts = 16 * torch.arange(2, device=a_meta.device).view(2, 1) + 4 * torch.arange(4, device=a_meta.device)
    nib = (w[..., None, None] >> shifts) & 0xF  # (Rt, gid, Kc, h, hi, j)
    return nib.permute(0, 4, 1, 2, 3, 5).reshape(Rt * 16, 8 * Kc)  # row hi*8 + gid, group 4*h + j


def unpack_tensor(packed: PackedVNM, padding: torch.Tensor) -> VNMTensor:
    """The canonical `VNMTensor` a pack was built from, exactly, on the pack's device: `padding` is
    `padding_columns` of that tensor. What `VNMLinear` saves and moves to the CPU while a GPU holds only the pack."""
    R, C = packed.shape
    pattern = VNMPattern(V=packed.V, M=packed.M)
    _, G = pattern.blocks(R, C)
    values = _fragment_values(packed.a_vals)[:R, :G].reshape(R, 2 * G)
    nib = _meta_nibbles(packed.a_meta)[:R, :G]
    positions = nibbles_from_slots(torch.stack((nib & 0x3, nib >> 2), dim=-1))
    columns = packed.cols[:, :G].clone()
    columns.view(-1)[padding[:, 0]] = padding[:, 1].to(torch.int32)
    return VNMTensor(values.contiguous(), columns, positions.contiguous(), pattern, (R, C))


def unpack_dense(a_vals: torch.Tensor, a_meta: torch.Tensor, cols: torch.Tensor, R: int, C: int, V: int) -> torch.Tensor:
    """The dense (R, C) weight a packed layout encodes, in a_vals' dtype: the inverse of `pack_for_device`.

    Reads only the packed tensors (not the canonical form), so it checks the layout independently and
    serves as the CPU implementation of the custom op.
    """
    Gp = 8 * a_vals.shape[1]
    vals = _fragment_values(a_vals)
    nib = _meta_nibbles(a_meta)
    slots = torch.stack((nib & 0x3, nib >> 2), dim=-1)[:R]  # (R, Gp, 2)
    block_cols = cols.to(torch.int64).repeat_interleave(V, dim=0)[:R]  # (R, Gp, 4)
    kept = block_cols.gather(2, slots).view(R, 2 * Gp)
    dense = torch.zeros(R, C, dtype=torch.float32, device=a_vals.device)
    dense.scatter_add_(1, kept, vals[:R].reshape(R, 2 * Gp).float())
    return dense.to(a_vals.dtype)
