"""`VNMTensor`: the canonical, device-independent compressed V:N:M weight, and its safetensors file.

For a logical (R, C) weight with G = ceil(C/M) column groups and B = ceil(R/V) row blocks:

- `values`    (R, 2G), the weight's dtype: row r's two kept weights of group g at [r, 2g] and [r, 2g+1].
- `columns`   (B, G, 4) int32: the 4 kept columns ("slots") of block (b, g), as global indices into the
              zero-padded input of width G*M. Indices >= C are padding slots and hold zeros. Because they
              are global, an input permutation folds into them at no cost (`permute_columns`).
- `positions` (R, ceil(G/2)) uint8: two 4-bit nibbles per byte; the nibble of (r, g) is p0 | p1 << 2,
              p0 < p1, the slots of values[r, 2g] and values[r, 2g+1]: the 2:4 metadata Sparse Tensor
              Cores read.

So W[r, columns[r // V, g, p_k]] = values[r, 2g + k]; every other weight is zero. Kernels derive their own
tiled layouts from this (`pack`); this is what is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .masks import Selection, check_vnm, mask_to_selection, select
from .pattern import KEPT_COLUMNS, VNMPattern
from .scores import magnitude_scores

FORMAT_NAME = "vnmsparse.VNMTensor"
FORMAT_VERSION = "1"
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_NAMES = ("values", "columns", "positions")


def nibbles_from_slots(slots: torch.Tensor) -> torch.Tensor:
    """(R, G, 2) ascending slots -> (R, ceil(G/2)) uint8, two groups per byte, low nibble first."""
    R, G, _ = slots.shape
    nibble = (slots[..., 0] | (slots[..., 1] << 2)).to(torch.uint8)  # (R, G)
    if G % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    pairs = nibble.view(R, -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def slots_from_nibbles(positions: torch.Tensor, groups: int) -> torch.Tensor:
    """(R, ceil(G/2)) uint8 -> (R, G, 2) int64 slots, the inverse of the packing above."""
    p = positions.to(torch.int64)
    nibble = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(1)[:, :groups]  # (R, G)
    return torch.stack((nibble & 0x3, nibble >> 2), dim=-1)


@dataclass(eq=False)
class VNMTensor:
    """A V:N:M-compressed weight. Build with `compress`; `to_dense()` gives back exactly W * mask.

    On the meta device only shapes and dtypes are checked (there are no values to check): a skeleton that a
    loader fills in. Two tensors are `==` when pattern, shape, dtype and every stored tensor are equal.
    """

    values: torch.Tensor
    columns: torch.Tensor
    positions: torch.Tensor
    pattern: VNMPattern
    shape: tuple[int, int]
    layouts: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # kernel layouts by device:
    # a cache that `vnmsparse.ops.pack.packed_layout` fills; nothing in this module reads it

    def __post_init__(self) -> None:
        self.pattern = VNMPattern.parse(self.pattern)
        self.shape = _check_shape(self.shape)
        _validate(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VNMTensor):
            return NotImplemented
        if (self.pattern, self.shape, self.dtype) != (other.pattern, other.shape, other.dtype):
            return False
        return all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.state_tensors().values(), other.state_tensors().values()))

    __hash__ = None  # mutable tensors: equal by value, so not hashable

    @classmethod
    def zeros(cls, shape: tuple[int, int], pattern: VNMPattern | str, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> VNMTensor:
        """An all-zero weight in a valid layout (each block keeps its group's first 4 columns): the placeholder a
        module holds before its weights are loaded."""
        pattern = VNMPattern.parse(pattern)
        R, C = _check_shape(shape)
        B, G = pattern.blocks(R, C)
        first = torch.arange(G, dtype=torch.int32, device=device).view(1, G, 1) * pattern.M
        columns = (first + torch.arange(KEPT_COLUMNS, dtype=torch.int32, device=device)).expand(B, G, KEPT_COLUMNS)
        slots = torch.tensor([0, 1], device=device).expand(R, G, 2)
        return cls(torch.zeros(R, 2 * G, dtype=dtype, device=device), columns.contiguous(),
                   nibbles_from_slots(slots).contiguous(), pattern, (R, C))

    # --- geometry -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def groups(self) -> int:
        return self.pattern.blocks(*self.shape)[1]

    # --- decompression ------------------------------------------------------------------------------
    def slots(self) -> torch.Tensor:
        """(R, G, 2) int64: which of its block's 4 slots each kept value sits in."""
        return slots_from_nibbles(self.positions, self.groups)

    def kept_columns(self) -> torch.Tensor:
        """(R, 2G) int64: the padded-input column of every stored value."""
        R = self.shape[0]
        per_row = self.columns.to(torch.int64).repeat_interleave(self.pattern.V, dim=0)[:R]  # (R, G, 4)
        return per_row.gather(2, self.slots()).view(R, -1)

    def to_dense(self) -> torch.Tensor:
        """The dense (R, C) weight, same dtype and device: exactly W * mask."""
        R, C = self.shape
        dense = torch.zeros(R, self.groups * self.pattern.M, dtype=self.dtype, device=self.device)
        dense.scatter_(1, self.kept_columns(), self.values)
        return dense[:, :C].contiguous()

    def mask(self) -> torch.Tensor:
        """The bool (R, C) pattern of stored positions (stored zeros included)."""
        R, C = self.shape
        mask = torch.zeros(R, self.groups * self.pattern.M, dtype=torch.bool, device=self.device)
        mask.scatter_(1, self.kept_columns(), True)
        return mask[:, :C]

    # --- storage accounting -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the compressed tensors (values + column indices + positions)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.positions))

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over compressed bytes, for the same dtype."""
        return self.dense_nbytes / self.nbytes

    # --- transformations -----------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VNMTensor:
        """A copy on another device and/or with values in another float dtype (indices unchanged)."""
        if dtype is not None and dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype must be one of {VALUE_DTYPES}, got {dtype}")
        return VNMTensor(
            values=self.values.to(device=device, dtype=dtype),
            columns=self.columns.to(device=device),
            positions=self.positions.to(device=device),
            pattern=self.pattern,
            shape=self.shape,
        )

    # --- files ----------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """What a file needs beside the tensors: format, version, pattern, shape, dtype, and a checksum."""
        described = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": str(self.pattern),
            "shape": json.dumps(list(self.shape)),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return {**described, "sha256": _checksum(self.state_tensors(), described)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in _TENSOR_NAMES}

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: the three tensors, with pattern, shape and version in its metadata."""
        from safetensors.torch import save_file

        _check_path(path)
        save_file({k: v.cpu() for k, v in self.state_tensors().items()}, os.fspath(path), metadata=self.metadata())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> VNMTensor:
        """Rebuild from saved tensors and metadata, validating everything (raises ValueError if wrong)."""
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} record (metadata format={metadata.get('format')!r})")
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported {FORMAT_NAME} version {metadata.get('version')!r}; this build reads {FORMAT_VERSION}")
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing:
            raise ValueError(f"{FORMAT_NAME} record lacks tensors {missing}")
        try:
            shape = tuple(json.loads(metadata["shape"]))
            pattern = VNMPattern.parse(metadata["pattern"])
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{FORMAT_NAME} metadata is damaged: {error}") from error
        if str(tensors["values"].dtype).removeprefix("torch.") != metadata.get("dtype"):
            raise ValueError(f"values dtype {tensors['values'].dtype} does not match metadata dtype {metadata.get('dtype')!r}")
        if _checksum(tensors, metadata) != metadata.get("sha256"):
            raise ValueError(f"{FORMAT_NAME} record fails its sha256 check: the file was altered or damaged")
        return cls(**{n: tensors[n] for n in _TENSOR_NAMES}, pattern=pattern, shape=shape)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> VNMTensor:
        """Read a file written by `save`. A truncated, tampered or mismatched file raises ValueError."""
        from safetensors import SafetensorError, safe_open

        _check_path(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no VNMTensor file at {os.fspath(path)!r}")
        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"cannot read {os.fspath(path)!r} as a safetensors file: {error}") from error
        return cls.from_state(tensors, metadata)


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"path must be a str or os.PathLike naming a file, got {type(path).__name__}")


def _check_shape(shape: Any) -> tuple[int, int]:
    """The logical (rows, columns): exactly two positive ints."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"VNMTensor.shape must be (out_features, in_features), two ints, got {shape!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) for n in shape):
        raise TypeError(f"VNMTensor.shape must hold ints, got {tuple(type(n).__name__ for n in shape)}")
    return int(shape[0]), int(shape[1])


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata fields and the tensors' raw bytes: a tampered record cannot load silently."""
    digest = hashlib.sha256()
    for key in ("format", "version", "pattern", "shape", "dtype"):
        digest.update(f"{key}={metadata.get(key)};".encode())
    for name in _TENSOR_NAMES:
        digest.update(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def _validate(t: VNMTensor) -> None:
    """Check every invariant of the format; a damaged record must never decompress to a wrong weight."""
    R, C = t.shape
    if R < 1 or C < 1:
        raise ValueError(f"shape must be positive, got {t.shape}")
    B, G = t.pattern.blocks(R, C)
    expected = {"values": (R, 2 * G), "columns": (B, G, KEPT_COLUMNS), "positions": (R, (G + 1) // 2)}
    for name, shape in expected.items():
        tensor = getattr(t, name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"VNMTensor.{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"VNMTensor.{name} has shape {tuple(tensor.shape)}; {t.pattern} on {t.shape} needs {shape}")
    if t.values.dtype not in VALUE_DTYPES:
        raise TypeError(f"VNMTensor.values must be one of {VALUE_DTYPES}, got {t.values.dtype}")
    if t.columns.dtype != torch.int32:
        raise TypeError(f"VNMTensor.columns must be int32, got {t.columns.dtype}")
    if t.positions.dtype != torch.uint8:
        raise TypeError(f"VNMTensor.positions must be uint8, got {t.positions.dtype}")
    if not (t.values.device == t.columns.device == t.positions.device):
        raise ValueError("VNMTensor tensors must be on one device")
    if t.values.is_meta:  # a skeleton: no data to check yet
        return
    width = G * t.pattern.M
    cols = t.columns.to(torch.int64)
    if cols.numel() and (cols.min() < 0 or cols.max() >= width):
        raise ValueError(f"VNMTensor.columns must lie in [0, {width}) (the padded input width)")
    # Each input column belongs to one group, so a row block's kept columns are all distinct.
    ordered = cols.view(B, -1).sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("VNMTensor.columns repeats a column within a row block")
    nibble_slots = slots_from_nibbles(t.positions, G)
    if not (nibble_slots[..., 0] < nibble_slots[..., 1]).all():
        raise ValueError("VNMTensor.positions must hold two distinct ascending slots per row and group")
    if G % 2 and (t.positions[:, -1] >> 4).any():
        raise ValueError("VNMTensor.positions has bits set past the last group")
    pad_slot = (t.columns >= C).repeat_interleave(t.pattern.V, dim=0)[:R].gather(2, nibble_slots)
    if t.values.masked_select(pad_slot.view(R, -1)).ne(0).any():
        raise ValueError("VNMTensor.values holds a nonzero in a padding slot")


def compress(
    weight: torch.Tensor,
    pattern: VNMPattern | str,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> VNMTensor:
    """Compress W to V:N:M. Give a V:N:M `mask`, or `scores` to build one from (default: |W|)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D torch.Tensor (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    if weight.dtype not in VALUE_DTYPES:
        raise TypeError(f"weight dtype must be one of {VALUE_DTYPES}, got {weight.dtype}")
    pattern = VNMPattern.parse(pattern)
    for name, value in (("mask", mask), ("scores", scores)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if mask is not None and scores is not None:
        raise ValueError("give either mask or scores, not both")
    if mask is not None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
        check_vnm(mask, pattern)
        selection = mask_to_selection(mask.to(device=weight.device, dtype=torch.bool), pattern)
        keep = mask.to(device=weight.device, dtype=torch.bool)
    else:
        if scores is None:
            scores = magnitude_scores(weight)
        elif tuple(scores.shape) != tuple(weight.shape):
            raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
        selection = select(scores.to(weight.device), pattern)
        keep = None
    return _encode(weight.detach(), pattern, selection, keep)


def _encode(weight: torch.Tensor, pattern: VNMPattern, selection: Selection, keep: torch.Tensor | None) -> VNMTensor:
    R, C = weight.shape
    _, G = pattern.blocks(R, C)
    # Filler slots of a sparse mask hold zeros (where, not *: a pruned inf or NaN must not leave inf * 0 = NaN behind).
    kept_weight = weight if keep is None else torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    padded = torch.nn.functional.pad(kept_weight, (0, G * pattern.M - C))
    per_row = selection.columns.repeat_interleave(pattern.V, dim=0)[:R]
    kept_columns = per_row.gather(2, selection.slots).view(R, 2 * G)
    return VNMTensor(
        values=padded.gather(1, kept_columns).contiguous(),
        columns=selection.columns.to(torch.int32).contiguous(),
        positions=nibbles_from_slots(selection.slots).contiguous(),
        pattern=pattern,
        shape=(R, C),
    )


def fold_input_permutation(tensor: VNMTensor, perm: torch.Tensor) -> VNMTensor:
    """Serve inputs in their original order from a tensor compressed on column-permuted weights.

    If `tensor` compresses W[:, perm] (column j of it is original input channel perm[j]), the result
    computes the same y from the *original* x: each stored column index j becomes perm[j]. Padding
    slots (index >= C) stay as they are.
    """
    R, C = tensor.shape
    perm = torch.as_tensor(perm, device=tensor.device)
    if perm.dtype not in (torch.int32, torch.int64) or perm.shape != (C,):
        raise ValueError(f"perm must be an integer tensor of shape ({C},), got {perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(perm.sort().values.cpu(), torch.arange(C)):
        raise ValueError("perm must be a permutation of range(in_features)")
    cols = tensor.columns.to(torch.int64)
    real = cols < C
    mapped = torch.where(real, perm.to(torch.int64)[cols.clamp(max=C - 1)], cols)
    return VNMTensor(tensor.values, mapped.to(torch.int32), tensor.positions, tensor.pattern, tensor.shape)
