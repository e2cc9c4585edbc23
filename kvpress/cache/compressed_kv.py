"""`CompressedKV`: what a press asks the cache to keep for one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedKV:
    """One layer's compressed keys and values, as handed from a press to the cache.

    Attributes:
        keys: ``(batch, kv_heads, n_kept, head_dim_kept)`` post-RoPE keys.
        values: ``(batch, kv_heads, n_kept + n_full_width, head_dim)``.
        key_channels: ``(batch, kv_heads, head_dim_kept)`` int64 indices of the key channels that ``keys`` hold, or
            ``None`` when every channel is kept (channel-pruning presses such as ThinK set it).
        full_width_keys: ``(batch, kv_heads, n_full_width, head_dim)`` post-RoPE keys of tokens that follow the ones in
            ``keys`` and keep every channel (a channel-pruning press's recent window), or ``None``. Only meaningful
            with ``key_channels``.
        head_lengths: ``(batch, kv_heads)`` int64 number of valid tokens per (sequence, kv-head) when heads keep
            different counts (head-variable presses): only ``keys[b, h, :head_lengths[b, h]]`` is kept. ``None``
            when every head keeps all ``n_kept`` tokens.
        indices: ``(batch, kv_heads, n_kept + n_full_width)`` int64 position in the prefill of each token ``values``
            holds, in storage order (of a head-variable press, only the first ``head_lengths[b, h]`` are meaningful),
            or ``None`` when the press did not say. Diagnostic only: the cache ignores it, and a
            :class:`~kvpress.presses.report.CompressionReport` records it when asked (``record_kept=True``).
        scores: ``(batch, kv_heads, n)`` score each prefilled token received from the press that ranked them (higher
            is kept first), or ``None``. Diagnostic only, like ``indices`` (the report stores them as float32).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_channels: torch.Tensor | None = None
    full_width_keys: torch.Tensor | None = None
    head_lengths: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    def __post_init__(self):
        if self.full_width_keys is not None and self.key_channels is None:
            raise ValueError("full_width_keys is only accepted together with key_channels (channel-pruned keys)")

    @property
    def lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` tokens kept per (sequence, kv-head)."""
        if self.head_lengths is not None:
            return self.head_lengths
        return torch.full(self.values.shape[:2], self.values.shape[-2], dtype=torch.long)
