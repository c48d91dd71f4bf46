"""Distributed helpers for sparse training: full views of (possibly FSDP-sharded) tensors, and rank agreement.

Every helper is a no-op on a single process, so training code calls them unconditionally. FSDP means FSDP2
(`torch.distributed.fsdp.fully_shard`), whose parameters are DTensors between steps.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: gathered from the ranks when it is a sharded DTensor (collective)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def assign_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole-tensor `value` into `param`; a sharded DTensor keeps only its own shard (no communication)."""
    if isinstance(param, DTensor):
        replicated = DTensor.from_local(value.to(param.dtype), param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                                        run_check=False)
        param.to_local().copy_(replicated.redistribute(param.device_mesh, param.placements).to_local())
    else:
        param.copy_(value)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s copy (bool tensors travel as uint8)."""
    if not is_distributed():
        return tensor
    if tensor.dtype == torch.bool:
        carrier = tensor.to(torch.uint8)
        dist.broadcast(carrier, src)
        tensor.copy_(carrier.bool())
    else:
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over the ranks in place (each rank's statistic weighs the same)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on any rank: a stop decision all ranks take together."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and raw bytes, in name order: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather_digests(value: str) -> list[str]:
    """Every rank's string, in rank order (a one-element list on a single process)."""
    if not is_distributed():
        return [value]
    out: list[str] = [""] * world_size()
    dist.all_gather_object(out, value)
    return out
