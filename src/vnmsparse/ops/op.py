"""The `vnmsparse::linear` custom op (registered once, with a fake impl) and its public wrapper `linear`.

    torch.ops.vnmsparse.linear(x, a_vals, a_meta, cols, bias, R, C, V) -> y     (packed parts, see pack.py)
    vnmsparse.ops.linear(x, tensor: VNMTensor, bias=None) -> y                   (packs once, caches per device)

y = x @ W^T + bias with nn.Linear semantics and any leading dims of x, fp32 accumulation. On CUDA the
compiled kernels run (chosen by `dispatch.choose`); on CPU, or a GPU where no kernel can run, the plain-torch
reference runs instead and that is logged once.
"""

# No `from __future__ import annotations`: torch.library reads the real type hints to infer the schema.
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from . import build, dispatch
from .pack import SUPPORTED_DTYPES, check_packable, unpack_dense

log = logging.getLogger("vnmsparse.ops")
_logged: set = set()


def log_once(level: int, message: str) -> None:
    """Log `message` the first time it occurs in this process."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _reference_from_packed(x, a_vals, a_meta, cols, bias, R: int, C: int, V: int) -> torch.Tensor:
    weight = unpack_dense(a_vals, a_meta, cols, R, C, V).to(device=x.device, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("vnmsparse::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    a_vals: torch.Tensor,
    a_meta: torch.Tensor,
    cols: torch.Tensor,
    bias: Optional[torch.Tensor],
    R: int,
    C: int,
    V: int,
) -> torch.Tensor:
    # Devices without a registered kernel (CPU, ...): the reference, computed from the packed parts.
    log_once(logging.INFO, f"vnmsparse::linear: no kernel for device type {x.device.type!r}; using the plain-torch reference")
    return _reference_from_packed(x, a_vals, a_meta, cols, bias, R, C, V)


@_linear_op.register_fake
def _linear_fake(x, a_vals, a_meta, cols, bias, R, C, V):
    if x.shape[-1] != C:
        raise ValueError(f"vnmsparse::linear: x's last dim must be in_features={C}, got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], R))


@_linear_op.register_kernel("cuda")
def _linear_cuda(x, a_vals, a_meta, cols, bias, R, C, V):
    if x.shape[-1] != C:
        raise ValueError(f"vnmsparse::linear: x's last dim must be in_features={C}, got {tuple(x.shape)}")
    ext = build.extension(x.device)
    if ext is None or x.dtype not in SUPPORTED_DTYPES:
        why = build.unavailable_reason(x.device) or f"x dtype {x.dtype} has no kernel"
        log_once(logging.WARNING, f"vnmsparse::linear: {why}; using the plain-torch reference")
        return _reference_from_packed(x, a_vals, a_meta, cols, bias, R, C, V)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < C):
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    N = x2.shape[0]
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    kernel = dispatch.choose(N, R, V, dispatch.dtype_tag(x.dtype), sms)
    ksplit = dispatch.decode_ksplit(kernel, R, a_vals.shape[1], sms)
    y = ext.run(x2, a_vals, a_meta, cols, None if bias is None else bias.contiguous(), R, C, V, kernel.index, ksplit)
    return y.view(*lead, R)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def kernel_unavailable_reason(device: torch.device, dtype: torch.dtype, tensor) -> Optional[str]:
    """None if the CUDA kernels can run `tensor` on `device` for activations of `dtype`, else why not."""
    if device.type != "cuda":
        return f"no kernel for device type {device.type!r}"
    try:
        check_packable(tensor.pattern.V, tensor.pattern.M, tensor.dtype)
    except ValueError as error:
        return str(error)
    if dtype != tensor.dtype:
        return f"x dtype {dtype} differs from the weight dtype {tensor.dtype} (the kernels take one dtype)"
    return build.unavailable_reason(device)


def linear(x: torch.Tensor, tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a `VNMTensor` W: the CUDA kernels where they can run, else `vnm_linear`."""
    from ..format import VNMTensor
    from ..reference import vnm_linear

    if not isinstance(tensor, VNMTensor):
        raise TypeError(f"tensor must be a VNMTensor, got {type(tensor).__name__}")
    R, C = tensor.shape
    if x.shape[-1] != C:
        raise ValueError(f"x's last dim must be in_features={C}, got shape {tuple(x.shape)}")
    reason = kernel_unavailable_reason(x.device, x.dtype, tensor)
    if reason is not None:
        level = logging.INFO if x.device.type == "cpu" else logging.WARNING
        log_once(level, f"vnmsparse.ops.linear: {reason}; using the plain-torch reference vnm_linear")
        return vnm_linear(x, tensor, bias)
    packed = tensor.pack(x.device)
    return torch.ops.vnmsparse.linear(x, packed.a_vals, packed.a_meta, packed.cols, bias, R, C, tensor.pattern.V)
