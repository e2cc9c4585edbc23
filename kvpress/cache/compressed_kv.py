"""`CompressedKV`: what a press asks the cache to keep for one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedKV:
    """One layer's compressed keys and values, as handed from a press to the cache.

    Attributes:
        keys: ``(batch, kv_heads, n_kept, head_dim_kept)`` post-RoPE keys.
        values: ``(batch, kv_heads, n_kept, head_dim)``.
        key_channels: ``(batch, kv_heads, head_dim_kept)`` int64 indices of the key channels that ``keys`` hold, or
            ``None`` when every channel is kept (channel-pruning presses such as ThinK set it).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_channels: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` tokens kept per (sequence, kv-head)."""
        return torch.full(self.keys.shape[:2], self.keys.shape[-2], dtype=torch.long)
