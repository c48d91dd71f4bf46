"""Perplexity of a causal LM over fixed-length token chunks (the wikitext-style protocol)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 8, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over (n, seq_len) chunks, each scored independently."""
    if chunks.dim() != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be (n, seq_len >= 2) token ids, got {tuple(chunks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = chunks[start : start + batch_size].to(device)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
