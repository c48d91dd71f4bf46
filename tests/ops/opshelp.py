"""Helpers shared by the ops tests: random V:N:M weights in awkward shapes, a float64 reference."""

from __future__ import annotations

import torch

import vnmsparse as vs


def random_vnm(R: int, C: int, pattern: str, dtype=torch.bfloat16, device="cpu", permute: bool = False, seed: int = 0):
    """A compressed random (never zero) weight; with permute, an input permutation folded into its columns."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(R, C, generator=g) + 0.1).to(dtype)
    t = vs.compress(W, pattern)
    if permute:
        t = vs.fold_input_permutation(t, torch.randperm(C, generator=g))
    return t.to(device=device)


def fp64_reference(x: torch.Tensor, t, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) in float64 from the canonical tensor."""
    W = t.to_dense().to(device=x.device, dtype=torch.float64)
    y = x.to(torch.float64) @ W.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.to(torch.float64) - ref).norm() / ref.norm().clamp_min(1e-30))
