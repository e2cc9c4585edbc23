"""`zscore`: scores standardised per (sequence, kv head), so that presses can blend scores of different scales."""

from __future__ import annotations

import torch


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, n)`` scores minus their mean over the ``n`` tokens, divided by their standard deviation
    (population; a constant row becomes zeros)."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / centred.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
