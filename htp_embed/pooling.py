"""Readouts: masked mean pooling, last-token, and L2 normalisation."""

from __future__ import annotations

import torch


def masked_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, D] over positions where ``weights`` [B, T] is 1, in float32."""
    weights = weights.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp_min(1.0)


def at_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b]]`` for each row, in float32."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, positions].to(torch.float32)


def l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=-1)
