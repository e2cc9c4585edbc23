"""`CompressionReport`: what one ``with press(model):`` call actually kept, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressionReport:
    """Per-layer outcome of the prefill compressions done inside one ``with press(model) as report:`` block.

    Attributes:
        n_layers: number of attention layers the press was attached to.
        original_lengths: ``{layer_idx: tokens before compression}``.
        kept_lengths: ``{layer_idx: (batch, kv_heads) int64 tensor of tokens kept}`` (on CPU).
    """

    n_layers: int
    original_lengths: dict[int, int] = field(default_factory=dict)
    kept_lengths: dict[int, torch.Tensor] = field(default_factory=dict)
    n_records: int = field(default=0, repr=False)  # layer compressions so far, repeated prefills included

    def record(self, layer_idx: int, n_tokens: int, lengths: torch.Tensor) -> None:
        """Store the outcome of one layer: ``n_tokens`` prefilled, ``lengths`` ``(batch, kv_heads)`` kept."""
        self.n_records += 1
        self.original_lengths[layer_idx] = n_tokens
        self.kept_lengths[layer_idx] = lengths.detach().to("cpu", torch.long)

    @property
    def compressed_layers(self) -> list[int]:
        """Indices of the layers that were compressed, in order."""
        return sorted(self.kept_lengths)

    def mean_kept(self, layer_idx: int) -> float:
        """Mean number of tokens kept per (sequence, kv-head) in ``layer_idx``."""
        return self.kept_lengths[layer_idx].double().mean().item()

    @property
    def compression_ratio(self) -> float:
        """Achieved fraction of removed tokens over all compressed layers, heads and sequences."""
        if not self.kept_lengths:
            return 0.0
        kept = sum(v.double().mean().item() for v in self.kept_lengths.values())
        total = sum(self.original_lengths[i] for i in self.kept_lengths)
        return 1.0 - kept / total
