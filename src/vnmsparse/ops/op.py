"""The `vnmsparse::linear` op (registered once with the dispatcher, with a fake impl) and its wrapper `linear`.

    torch.ops.vnmsparse.linear(x, a_vals, a_meta, cols, bias, R, C, V, window=0, inputs=None) -> y   (packed parts,
        pack.py; `inputs`: the x columns a 2:4 copy reads, gathered inside the op)
    vnmsparse.ops.linear(x, tensor: VNMTensor, bias=None, two_four_copy=False) -> y   (packs once, caches per device)

y = x @ W^T + bias with nn.Linear semantics and any leading dims of x, fp32 accumulation. On CUDA the
compiled kernels run (chosen by `dispatch.choose`); on CPU, or a GPU where no kernel can run, the plain-torch
reference runs instead and that is logged once. In plain eager calls (`_runs_eagerly`: no tracing, modes,
subclasses, autograd or profiler) `linear` calls the CUDA implementation directly: the dispatcher would add
~20 us a call. `window` is the pack's `PackedVNM.window` (0 makes every kernel gather x by column; at 32 the
sm_90 window kernel may run; a value the pack did not compute gives wrong results, never an out-of-bounds read).
"""

# The schema is declared as a string below; no `from __future__ import annotations` needed or used.
import functools
import logging
from typing import Optional

import torch

from ..format import VNMTensor
from ..reference import check_input, dense_linear, vnm_linear
from . import build, dispatch, tuned
from .config import config
from .limits import TORCH_DTYPES, check_packable
from .pack import PackedVNM, copy_inputs, packed_layout, unpack_dense

log = logging.getLogger("vnmsparse.ops")
_logged: set = set()


def log_once(level: int, message: str) -> None:
    """Log `message` the first time it occurs in this process (not while torch.compile traces: it would break)."""
    if message not in _logged and not torch.compiler.is_compiling():
        _logged.add(message)
        log.log(level, message)


def _reference_from_packed(x, a_vals, a_meta, cols, bias, R: int, C: int, V: int) -> torch.Tensor:
    return dense_linear(x, unpack_dense(a_vals, a_meta, cols, R, C, V), bias)


# Registered once, at import, with the dispatcher directly (torch.library.Library): a call costs about half of what
# the torch.library.custom_op wrapper adds, which matters for decode, where the kernel takes only microseconds.
_LIB = torch.library.Library("vnmsparse", "DEF")
_LIB.define(
    "linear(Tensor x, Tensor a_vals, Tensor a_meta, Tensor cols, Tensor? bias, int R, int C, int V, int window=0,"
    " Tensor? inputs=None) -> Tensor"
)


def _check_width(x: torch.Tensor, C: int, inputs: Optional[torch.Tensor]) -> None:
    """x must have the weight's C columns, or, with `inputs` (a 2:4 copy's), inputs must name C of x's columns."""
    if inputs is None and x.shape[-1] != C:
        raise ValueError(f"vnmsparse::linear: x's last dim must be in_features={C}, got {tuple(x.shape)}")
    if inputs is not None and tuple(inputs.shape) != (C,):
        raise ValueError(f"vnmsparse::linear: inputs must name the weight's C={C} x columns, got shape {tuple(inputs.shape)}")


def _linear_reference(x, a_vals, a_meta, cols, bias, R: int, C: int, V: int, window: int = 0, inputs=None):
    # Devices without a kernel (CPU, ...): the reference, computed from the packed parts.
    log_once(logging.INFO, f"vnmsparse::linear: no kernel for device type {x.device.type!r}; using the plain-torch reference")
    _check_width(x, C, inputs)
    x = x if inputs is None else copy_inputs(x, inputs)
    return _reference_from_packed(x, a_vals, a_meta, cols, bias, R, C, V)


def _linear_fake(x, a_vals, a_meta, cols, bias, R, C, V, window=0, inputs=None):
    _check_width(x, C, inputs)
    return x.new_empty((*x.shape[:-1], R))


@functools.lru_cache(maxsize=None)
def _device_info(index: int):
    """(compiled module or None, why not, SM count, compute capability, GPU slug for the measured dispatch table)
    for CUDA device `index`: looked up once."""
    device = torch.device("cuda", index)
    ext = build.extension(device)
    props = torch.cuda.get_device_properties(index)
    return ext, build.unavailable_reason(device), props.multi_processor_count, (props.major, props.minor), tuned.gpu_slug(props.name)


_DTYPE_TAGS = TORCH_DTYPES


def _linear_cuda(x, a_vals, a_meta, cols, bias, R, C, V, window=0, inputs=None):
    # Also the eager fast path of `linear`: every Python-level step here costs microseconds per layer in decode,
    # so the binding flattens x's leading dims (and gathers a copy's inputs) itself and one cached lookup picks the kernel.
    _check_width(x, C, inputs)
    ext, why, sms, arch, gpu = _device_info(x.get_device())
    if ext is None or x.dtype not in _DTYPE_TAGS:
        log_once(logging.WARNING, f"vnmsparse::linear: {why or f'x dtype {x.dtype} has no kernel'}; using the plain-torch reference")
        x = x if inputs is None else copy_inputs(x, inputs)
        return _reference_from_packed(x, a_vals, a_meta, cols, bias, R, C, V)
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    N = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel, ksplit = dispatch.plan(N, R, V, a_vals.shape[1], _DTYPE_TAGS[x.dtype], sms, arch, window, gpu)
    return ext.run(x, a_vals, a_meta, cols, bias, R, C, V, kernel, ksplit, None, window, config().pdl, inputs)


def _runs_eagerly(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """True when calling the CUDA implementation directly gives exactly what the dispatcher would, minus its
    ~20 us per call (measured on the H100; docs/kernels.md): nothing tracing (torch.compile, export, make_fx) or
    intercepting (torch function or dispatch modes, fake or other tensor subclasses), no autograd graph to record,
    no profiler running (its traces attribute kernels to the ops that launch them: they should show the op)."""
    if torch.compiler.is_compiling():  # first: dynamo folds it, and never traces the private calls below
        return False
    if type(x) is not torch.Tensor or (bias is not None and type(bias) not in (torch.Tensor, torch.nn.Parameter)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
                or torch.autograd._profiler_enabled())


_LIB.impl("linear", _linear_reference, "CPU")
_LIB.impl("linear", _linear_cuda, "CUDA")
torch.library.register_fake("vnmsparse::linear", _linear_fake, lib=_LIB)


def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype, tensor) -> Optional[str]:
    """None if the CUDA kernels can run `tensor` on `device` for activations of `dtype`, else why not."""
    return _unavailable(device, dtype, tensor.pattern.V, tensor.pattern.M, tensor.dtype)


@functools.lru_cache(maxsize=1024)
def _unavailable(device: torch.device, dtype: torch.dtype, V: int, M: int, weight_dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"no kernel for device type {device.type!r}"
    try:
        check_packable(V, M, weight_dtype)
    except ValueError as error:
        return str(error)
    if dtype != weight_dtype:
        return f"x dtype {dtype} differs from the weight dtype {weight_dtype} (the kernels take one dtype)"
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())[1]


def _wants_two_four_copy(x: torch.Tensor, R: int, C: int, V: int, M: int, window: int) -> bool:
    """Whether this CUDA call runs on the weight's 2:4 copy (`dispatch.uses_two_four_copy`); concrete N only."""
    N = x.numel() // C
    if not isinstance(N, int):  # symbolic under torch.compile's dynamic shapes: keep the V:2:M layout
        return False
    return _copy_taken(N, R, C, V, M, window, _DTYPE_TAGS[x.dtype], x.get_device())


@torch.compiler.assume_constant_result
def _copy_taken(N: int, R: int, C: int, V: int, M: int, window: int, dtype: str, device_index: int) -> bool:
    """`dispatch.uses_two_four_copy` for this device. A constant to torch.compile, which calls it while tracing:
    it reads device properties and the measured table, which dynamo cannot trace (each layer would break the graph,
    and the model's per-layer recompiles would hit dynamo's limit), and its inputs are sizes the graph is specialized to."""
    _, _, sms, arch, gpu = _device_info(device_index)
    return dispatch.uses_two_four_copy(N, R, C, V, M, window, dtype, sms, arch, gpu)


def two_four_copy_pays(packed: PackedVNM) -> bool:
    """Whether a 2:4 copy of this packed weight would ever run (a large call on its device would take it): a
    `VNMLinear` asked for one builds it only then, when it packs, never inside a forward."""
    if packed.device.type != "cuda" or packed.dtype not in _DTYPE_TAGS:
        return False
    arch = _device_info(packed.device.index if packed.device.index is not None else torch.cuda.current_device())[3]
    R, C = packed.shape
    return tuple(arch) == (9, 0) and dispatch.two_four_copy_runs(R, C, packed.V, packed.M, packed.window)


def check_two_four_copy(flag: object, weight: VNMTensor | PackedVNM) -> None:
    """TypeError unless `flag` is a bool; ValueError when it asks for a 2:4 copy of a `VNMTensor` or `PackedVNM` whose
    pattern can have none (`dispatch.two_four_copy_refusal`)."""
    if not isinstance(flag, bool):
        raise TypeError(f"two_four_copy must be a bool, got {flag!r}")
    if not flag:
        return
    V, M = (weight.V, weight.M) if isinstance(weight, PackedVNM) else (weight.pattern.V, weight.pattern.M)
    why = dispatch.two_four_copy_refusal(V, M)
    if why is not None:
        raise ValueError(f"two_four_copy needs {why}")


def linear(x: torch.Tensor, tensor, bias: Optional[torch.Tensor] = None, *, two_four_copy: bool = False) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a `VNMTensor` W: the CUDA kernels where they can run, else `vnm_linear`.

    The kernel layout is built on the first call on a device and cached on `tensor` (`pack.packed_layout`), beside the
    canonical tensors; `VNMLinear` instead keeps only its packed layout on a GPU and calls `linear_packed`.
    two_four_copy: calls on sm_90 that `dispatch.uses_two_four_copy` gives the copy (serving batches, prefill) run on the
    weight's 2:4 copy (built on the first such call, cached beside the layout: more memory); a weight that can have none is refused (`check_two_four_copy`).
    """
    if not isinstance(tensor, VNMTensor):
        raise TypeError(f"tensor must be a VNMTensor, got {type(tensor).__name__}")
    R, C = tensor.shape
    check_input(x, bias, R, C)
    V, M = tensor.pattern.V, tensor.pattern.M
    check_two_four_copy(two_four_copy, tensor)
    reason = _unavailable(x.device, x.dtype, V, M, tensor.dtype)
    if reason is not None:
        level = logging.INFO if x.device.type == "cpu" else logging.WARNING
        log_once(level, f"vnmsparse.ops.linear: {reason}; using the plain-torch reference vnm_linear")
        return vnm_linear(x, tensor, bias)
    packed = packed_layout(tensor, x.device)
    if two_four_copy and _wants_two_four_copy(x, R, C, V, M, packed.window):
        packed = packed_layout(tensor, x.device, two_four=True)  # V:2:4 over its own input columns; window = 32
    return _run_packed(x, packed, bias)


def linear_packed(x: torch.Tensor, packed: PackedVNM, bias: Optional[torch.Tensor] = None,
                  two_four: Optional[PackedVNM] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a weight already in its kernel layout (`pack_for_device`), with its optional 2:4
    copy: what `VNMLinear` calls on a GPU. x must be on the pack's device; the kernels run where they can (x in
    the weight's dtype), else the reference computed from the packed parts."""
    R, C = packed.shape
    check_input(x, bias, R, C)
    if x.device != packed.a_vals.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {packed.a_vals.device}: move one of them")
    reason = _unavailable(x.device, x.dtype, packed.V, packed.M, packed.a_vals.dtype)
    if reason is not None:
        log_once(logging.WARNING, f"vnmsparse.ops.linear_packed: {reason}; using the plain-torch reference")
        return _reference_from_packed(x, packed.a_vals, packed.a_meta, packed.cols, bias, R, C, packed.V)
    if two_four is not None and _wants_two_four_copy(x, R, C, packed.V, packed.M, packed.window):
        packed = two_four
    return _run_packed(x, packed, bias)


def _run_packed(x: torch.Tensor, packed: PackedVNM, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y for a pack whose caller checked x against the layer's in_features; a 2:4 copy laid out over other columns
    than x's reads them gathered (`PackedVNM.inputs`), inside the op."""
    R, C = packed.shape
    args = (x, packed.a_vals, packed.a_meta, packed.cols, bias, R, C, packed.V, packed.window, packed.inputs)
    if _runs_eagerly(x, bias):  # same kernels and result as the op below, without the dispatcher's cost
        return _linear_cuda(*args)
    return torch.ops.vnmsparse.linear.default(*args)
