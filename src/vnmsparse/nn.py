"""`VNMLinear`: an nn.Linear whose weight is a V:N:M-compressed `VNMTensor`, run through the vnmsparse op.

One copy of the weight lives on the module's device. Where the CUDA kernels take it (a CUDA device, bf16 / fp16,
a supported V and M), that copy is the kernel layout (`ops.pack_for_device`), built when the module is built,
moved or loaded there, never inside a forward (so a CUDA graph or `torch.compile(mode="reduce-overhead")` warm-up
allocates nothing that lasts); the canonical `VNMTensor` is rebuilt from it (`ops.unpack_tensor`) for
`state_dict`, `weight` and moves elsewhere. Everywhere else the copy is the canonical tensors themselves.

A layer built with `two_four_copy=True` also holds a second layout there, a V:2:4 copy of its V:2:M weight
(`ops.two_four_tensor`), that calls beyond decode on sm_90 multiply with the window kernel where it is faster
(`ops.dispatch.uses_two_four_copy`: serving batches and prefill), for 2.5-3 times the layer's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import ops
from .format import FORMAT_VERSION, VALUE_DTYPES, VNMTensor, compress
from .pattern import VNMPattern

_CANONICAL = ("values", "columns", "positions")  # the VNMTensor, what state_dict holds
_PACKED = ("packed_vals", "packed_meta", "packed_cols", "padding")  # kernel layout + the padding slots it drops
_COPY = ("copy_vals", "copy_meta", "copy_cols", "copy_inputs")  # the optional 2:4 copy (`VNMLinear.two_four_copy`)
_EXTRA_STATE = "_extra_state"


class VNMLinear(nn.Module):
    """y = x W^T + b with W stored V:N:M-compressed: the GPU kernel where there is one, the reference elsewhere.

    `state_dict` holds the canonical tensors (`values`, `columns`, `positions`), the bias, and the pattern and
    logical shape as extra state, wherever the module lives; `load_state_dict` checks all of it before changing
    anything. `weight` is the `VNMTensor` (on a GPU, rebuilt from the packed layout: a temporary copy).
    Value dtypes are those of `VNMTensor` (fp32, fp16, bf16): `.double()` is refused before anything changes.

    two_four_copy: also hold the weight's 2:4 copy wherever it can run (packed on an sm_90 GPU; built on the move
    there), for faster serving batches and prefill at more memory (`holds_two_four_copy`, `held_nbytes`). Only V:2:M
    weights with 5 <= M <= 8 and V <= 64 can have one: others raise ValueError. The flag is saved (extra state), the
    copy never (derived).
    """

    def __init__(self, weight: VNMTensor, bias: torch.Tensor | None = None, two_four_copy: bool = False) -> None:
        super().__init__()
        if not isinstance(weight, VNMTensor):
            raise TypeError(f"weight must be a VNMTensor, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got {getattr(bias, 'shape', bias)!r}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.bias = bias
        for name in _CANONICAL:  # saved; None while the packed layout is held (then rebuilt for state_dict)
            self.register_buffer(name, None)
        for name in (*_PACKED, *_COPY):  # derived on the device, never saved
            self.register_buffer(name, None, persistent=False)
        self.pattern = weight.pattern
        self._weight: VNMTensor | None = None
        self._packed: ops.PackedVNM | None = None
        self._copy: ops.PackedVNM | None = None
        self._two_four_copy = False
        self._hold(weight, two_four_copy)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        pattern: VNMPattern | str,
        scores: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        two_four_copy: bool = False,
    ) -> VNMLinear:
        """Compress an nn.Linear's weight (keeping the highest `scores`, default |W|, or exactly `mask`); two_four_copy
        as in the constructor."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return cls(compress(linear.weight.detach(), pattern, mask=mask, scores=scores), bias, two_four_copy)

    # --- the one copy of the weight -------------------------------------------------------------------------------
    def _hold(self, weight: VNMTensor, two_four_copy: bool) -> None:
        """Keep `weight` as this module's only copy: packed where the kernels take it, else as it is; with its 2:4
        copy if `two_four_copy` asks for one (checked first: a weight that can have none changes nothing)."""
        ops.check_two_four_copy(two_four_copy, weight)
        packed = padding = None
        if self._packs(weight):
            packed, padding = ops.pack_for_device(weight, weight.device), ops.padding_columns(weight)
        for name in (*_CANONICAL, *_PACKED):
            self._buffers[name] = None
        self._weight, self._packed = (weight, None) if packed is None else (None, packed)
        self.pattern = weight.pattern
        if packed is None:
            self.values, self.columns, self.positions = weight.values, weight.columns, weight.positions
        else:
            self.packed_vals, self.packed_meta, self.packed_cols, self.padding = packed.a_vals, packed.a_meta, packed.cols, padding
        self._two_four_copy = two_four_copy
        self._hold_copy(weight)

    def _hold_copy(self, weight: VNMTensor) -> None:
        """Hold the 2:4 copy of `weight` (the weight held) if this layer asks for one and it can run where the layer
        is packed (`ops.two_four_copy_pays`); else none."""
        copy = None
        if self._two_four_copy and self._packed is not None and ops.two_four_copy_pays(self._packed):
            copy = ops.pack_two_four(weight, weight.device)
        self._copy = copy
        parts = (None,) * 4 if copy is None else (copy.a_vals, copy.a_meta, copy.cols, copy.inputs)
        self.copy_vals, self.copy_meta, self.copy_cols, self.copy_inputs = parts

    @property
    def two_four_copy(self) -> bool:
        """Whether this layer asks for a 2:4 copy of its weight (`holds_two_four_copy`: whether it has one now).
        Setting it builds or drops the copy; True on a weight that can have none raises, the layer unchanged."""
        return self._two_four_copy

    @two_four_copy.setter
    def two_four_copy(self, value: bool) -> None:
        weight = self.weight
        ops.check_two_four_copy(value, weight)
        self._two_four_copy = value
        self._hold_copy(weight)

    @property
    def holds_two_four_copy(self) -> bool:
        """Whether the 2:4 copy is held now: asked for, and packed on a GPU where it runs (sm_90)."""
        return self._copy is not None

    @property
    def two_four_copy_nbytes(self) -> int:
        """Bytes of the 2:4 copy wherever the layer holds it (sm_90 GPUs, `ops.dispatch.two_four_copy_runs`), held now
        or not, counted as `VNMTensor.nbytes` counts (the V:2:4 form of the weight, every group's columns laid out: a
        permuted weight's copy may be narrower), with the x column of each where it gathers them; 0 without
        `two_four_copy` or where no call would run the copy (one that gathers, on fewer rows than
        `ops.dispatch.GATHERED_COPY_MIN_R`)."""
        if not self._two_four_copy:
            return 0
        if self._packed is not None:
            window = self._packed.window
        else:  # a skeleton on the meta device counts as unpermuted
            window = 8 * self.pattern.M if self._weight.columns.is_meta else ops.pack_window(self._weight)
        if not ops.dispatch.two_four_copy_runs(self.out_features, self.in_features, self.pattern.V, self.pattern.M, window):
            return 0
        width = ops.two_four_width(self.in_features, self.pattern.M, permuted=window == 0)
        copy = VNMTensor.zeros((self.out_features, width), VNMPattern(V=self.pattern.V, M=4), self._held().dtype, "meta")
        gathered = ops.two_four_gathers(self.in_features, self.pattern.M, permuted=window == 0)  # x columns kept too
        return copy.nbytes + (8 * width if gathered else 0)

    @staticmethod
    def _packs(weight: VNMTensor) -> bool:
        """Whether a module holding `weight` keeps it packed: the CUDA kernels can run it where it is."""
        return weight.device.type == "cuda" and ops.kernel_unavailable_reason(weight.device, weight.dtype, weight) is None

    def _buffer_layout(self, prefix: str, source: ops.PackedVNM) -> ops.PackedVNM:
        """`source` over this module's own buffers (what torch.compile must see, so that they stay static)."""
        vals, meta, cols = (getattr(self, f"{prefix}_{part}") for part in ("vals", "meta", "cols"))
        inputs = getattr(self, f"{prefix}_inputs", None)
        return ops.PackedVNM(vals, meta, cols, source.shape, source.V, source.M, source.window, inputs)

    @property
    def weight(self) -> VNMTensor:
        """The compressed weight: the buffers themselves, or on a GPU rebuilt from the packed layout (a copy)."""
        if self._packed is None:
            return self._weight
        return ops.unpack_tensor(self._packed, self.padding)

    def rebuild(self) -> None:
        """Check and take up canonical buffers assigned directly (as transformers' loader does), packing them on a
        GPU. Raises ValueError / TypeError naming what is wrong."""
        if self._packed is not None:
            raise ValueError("this VNMLinear holds its packed layout; load canonical tensors with load_state_dict")
        weight = VNMTensor(self.values, self.columns, self.positions, self.pattern, (self.out_features, self.in_features))
        self._hold(weight, self._two_four_copy)

    @property
    def held_nbytes(self) -> int:
        """Bytes of the weight as held now (packed layout and its 2:4 copy if held, or the canonical tensors)."""
        held = [t for name in (*_CANONICAL, *_PACKED, *_COPY) if (t := self._buffers[name]) is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def to_linear(self) -> nn.Linear:
        """An ordinary nn.Linear with the decompressed weight (pruned entries zero), same dtype and device."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.to_dense())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return ops.linear(x, self._weight, self.bias)
        if torch.compiler.is_compiling():  # read the buffers, which compile treats as static, not cached objects
            copy = None if self._copy is None else self._buffer_layout("copy", self._copy)
            return ops.linear_packed(x, self._buffer_layout("packed", self._packed), self.bias, copy)
        return ops.linear_packed(x, self._packed, self.bias, self._copy)

    # --- moves and conversions ----------------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        """`.to()`, `.cuda()`, `.half()`, `.to_empty()`: the weight in canonical form through `fn`, then held anew
        (packed if it lands on a GPU). A dtype a `VNMTensor` cannot hold is refused before anything changes;
        `to_empty` from the meta device gives an all-zero weight in a valid layout, ready for `load_state_dict`."""
        held = self._held()
        probe = fn(torch.empty(0, dtype=held.dtype, device=held.device))  # where and in what fn puts values
        if probe.dtype not in VALUE_DTYPES:
            raise TypeError(f"VNMLinear values must be one of {VALUE_DTYPES}, not {probe.dtype}; the layer is unchanged "
                            "(convert the rest of the model around it, or use to_linear())")
        if self._packed is not None and (probe.device, probe.dtype) == (held.device, held.dtype):
            kept = {name: self._buffers[name] for name in (*_PACKED, *_COPY)}  # already there: no unpack and repack
            self._buffers.update(dict.fromkeys(kept))
            super()._apply(fn, recurse)  # the bias
            self._buffers.update(kept)
            return self
        weight = self.weight
        shape = (self.out_features, self.in_features)
        if weight.values.is_meta and not probe.is_meta:
            moved = VNMTensor.zeros(shape, weight.pattern, probe.dtype, probe.device)
        else:
            moved = VNMTensor(fn(weight.values), fn(weight.columns), fn(weight.positions), weight.pattern, shape)
        for name in (*_CANONICAL, *_PACKED, *_COPY):
            self._buffers[name] = None
        super()._apply(fn, recurse)  # the bias
        self._hold(moved, self._two_four_copy)
        return self

    # --- state_dict -------------------------------------------------------------------------------------------------
    extra_state_as_tensor = False  # True while transformers' loader fills this layer: it handles only tensors

    def get_extra_state(self) -> dict[str, Any] | torch.Tensor:
        """The record state_dict keeps beside the tensors: a dict (a uint8 JSON tensor if extra_state_as_tensor)."""
        state = {"pattern": str(self.pattern), "shape": [self.out_features, self.in_features], "version": FORMAT_VERSION,
                 "two_four_copy": self._two_four_copy}
        return extra_state_tensor(state) if self.extra_state_as_tensor else state

    def set_extra_state(self, state: Any) -> None:
        """Check a saved record (a dict, or a uint8 tensor of its JSON as `extra_state_tensor` writes for files that
        hold only tensors) against this layer and take up its `two_four_copy`: transformers' loader calls this, then
        `rebuild`, which checks that flag against the loaded weight. Changes nothing else."""
        _, two_four_copy = self._check_extra(_extra_from_tensor(state) if isinstance(state, torch.Tensor) else state)
        self.two_four_copy = two_four_copy

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self._packed is not None:  # the canonical buffers are None: the canonical form rebuilt from the pack
            for name, tensor in self.weight.state_tensors().items():
                destination[prefix + name] = tensor if keep_vars else tensor.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # canonical buffers if held, bias, extra state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Build and check the whole weight from `state_dict` first; only then touch the module (a caller who
        catches the error keeps the layer as it was)."""
        keys = [prefix + name for name in (*_CANONICAL, _EXTRA_STATE)]
        present = {key: state_dict.pop(key) for key in keys if key in state_dict}
        weight = two_four_copy = None
        if len(present) == len(keys):
            assign = local_metadata.get("assign_to_params_buffers", False)
            weight, two_four_copy = self._weight_from_state(*present.values(), like=None if assign else self._held())
        errors, missing = len(error_msgs), len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # the bias (the keys above were taken out: its misses are ours)
        missing_keys[missing:] = [key for key in missing_keys[missing:] if key not in keys]
        if strict:
            missing_keys.extend(key for key in keys if key not in present)
        if weight is not None and len(error_msgs) == errors:
            self._hold(weight, two_four_copy)

    def _held(self) -> torch.Tensor:
        """The tensor of values held now (canonical or packed): its device and dtype are the module's."""
        return self.values if self._packed is None else self.packed_vals

    def _weight_from_state(self, values: Any, columns: Any, positions: Any, extra: Any,
                           like: torch.Tensor | None) -> tuple[VNMTensor, bool]:
        """The checked `VNMTensor` a state dict holds for this layer (same shape and pattern), copied to the device
        and dtype of `like` (None: the state's own tensors, as `load_state_dict(assign=True)` asks), and its
        `two_four_copy` flag, checked against it."""
        pattern, two_four_copy = self._check_extra(extra)
        shape = [self.out_features, self.in_features]
        tensors = []
        for name, tensor in zip(_CANONICAL, (values, columns, positions)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"VNMLinear state {name!r} must be a tensor, got {type(tensor).__name__}")
            if like is not None:  # copied, as load_state_dict copies into a module's own tensors
                dtype = like.dtype if name == "values" and tensor.is_floating_point() else None
                tensor = tensor.to(device=like.device, dtype=dtype, copy=True)
            tensors.append(tensor)
        weight = VNMTensor(*tensors, pattern, tuple(shape))  # checks every invariant
        ops.check_two_four_copy(two_four_copy, weight)
        return weight, two_four_copy

    def _check_extra(self, extra: Any) -> tuple[VNMPattern, bool]:
        """This layer's pattern and the record's `two_four_copy` (False in records written before it), if `extra` is a
        record of this layer's version, shape and pattern; else ValueError."""
        if not isinstance(extra, Mapping) or extra.get("version") != FORMAT_VERSION:
            raise ValueError(f"VNMLinear extra state must be a dict with version {FORMAT_VERSION!r}, got {extra!r}")
        shape = [self.out_features, self.in_features]
        if list(extra.get("shape", ())) != shape:
            raise ValueError(f"VNMLinear state has shape {extra.get('shape')}; this layer is {shape}")
        pattern = VNMPattern.parse(extra.get("pattern"))
        if pattern != self.pattern:
            raise ValueError(f"VNMLinear state is {pattern}, whose buffers have other shapes than this {self.pattern} "
                             "layer's; load it into a layer of its pattern")
        two_four_copy = extra.get("two_four_copy", False)
        if not isinstance(two_four_copy, bool):
            raise ValueError(f"VNMLinear state two_four_copy must be true or false, got {two_four_copy!r}")
        return pattern, two_four_copy

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}, two_four_copy={self._two_four_copy}")


def extra_state_tensor(state: Mapping[str, Any]) -> torch.Tensor:
    """A VNMLinear extra-state record as a uint8 tensor of its JSON, for files that hold only tensors (safetensors)."""
    return torch.frombuffer(bytearray(json.dumps(dict(state), sort_keys=True).encode()), dtype=torch.uint8)


def _extra_from_tensor(tensor: torch.Tensor) -> Any:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"VNMLinear extra state as a tensor must be 1-D uint8 JSON, got {tensor.dtype} {tuple(tensor.shape)}")
    try:
        return json.loads(bytes(tensor.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"VNMLinear extra state tensor is not a JSON record: {error}") from None
