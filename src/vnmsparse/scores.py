"""Importance scores: which weights matter. Higher is more important; masks keep the highest.

`magnitude_scores` needs only the weight. `ria_scores` (Relative Importance and Activation, Zhang et al.
ICLR 2024) also needs the per-input-channel mean of x_j^2 over calibration tokens, the statistic that
RIA's and Wanda's reference code collect.
"""

from __future__ import annotations

import torch


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32 (same shape and device as W)."""
    _check_weight(weight)
    return weight.detach().abs().float()


def ria_scores(weight: torch.Tensor, act_sq_mean: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (sqrt(act_sq_mean_j)) ** a.

    The first term is |W| relative to its input column, the second relative to its output row; an all-zero
    row or column contributes 0 rather than NaN. `act_sq_mean` has shape (in_features,).
    """
    _check_weight(weight)
    if not isinstance(act_sq_mean, torch.Tensor):
        raise TypeError(f"act_sq_mean must be a torch.Tensor, got {type(act_sq_mean).__name__}")
    cols = weight.shape[1]
    if act_sq_mean.shape != (cols,):
        raise ValueError(f"act_sq_mean must have shape (in_features,) = ({cols},), got {tuple(act_sq_mean.shape)}")
    act = act_sq_mean.detach().to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(act).all() or (act < 0).any():
        raise ValueError("act_sq_mean must be finite and non-negative (it is a mean of squares)")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < float("inf"):
        raise ValueError(f"a must be a finite number >= 0 (the activation exponent), got {a!r}")
    w = weight.detach().abs().float()
    col_sum = w.sum(dim=0, keepdim=True)  # (1, C): sum over output rows, per input column
    row_sum = w.sum(dim=1, keepdim=True)  # (R, 1): sum over input columns, per output row
    relative = torch.where(col_sum > 0, w / col_sum, 0.0) + torch.where(row_sum > 0, w / row_sum, 0.0)
    return relative * act.sqrt().pow(a)
