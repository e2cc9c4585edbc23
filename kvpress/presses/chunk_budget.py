"""`ChunkBudget`: what a press's ``compress`` is told during a chunked prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The key under which a chunked prefill passes the budget in the ``kwargs`` of ``compress``.
CHUNK_BUDGET = "kvpress_chunk_budget"


@dataclass
class ChunkBudget:
    """A chunk of a chunked prefill: the layer handed to ``compress`` holds the kept tokens of the earlier chunks
    followed by this chunk's, and must come back to the budget of ``seen`` prompt tokens (not of the tokens it holds).

    Attributes:
        seen: prompt tokens prefilled so far, this chunk included.
        lengths: ``(batch, kv_heads)`` tokens each head holds when the layer is head-variable (keys and values are
            then each head's tokens from position 0, zero padded); ``None`` when every head holds them all.
        last: this chunk ends the prompt. Presses that transform the whole context once (ThinK's key channels) act
            then, and return ``None`` (nothing changed) for the earlier chunks.
    """

    seen: int
    lengths: torch.Tensor | None = None
    last: bool = False

    def valid(self, keys: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads)`` tokens each head of ``keys`` ``(batch, kv_heads, n, d)`` holds."""
        if self.lengths is None:
            return torch.full(keys.shape[:2], keys.shape[2], dtype=torch.long, device=keys.device)
        return self.lengths.to(keys.device, torch.long)
