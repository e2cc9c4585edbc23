"""`KnormPress`: keep the keys of smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import attention_layers


@dataclass
class KnormPress(ScorerPress):
    """Score = −‖k‖₂ of each post-RoPE key: low-norm keys tend to receive high attention.

    Query-free and the cheapest press (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", arXiv 2406.11430).

    Args:
        skip_layers: attention layers (indices) left uncompressed. The paper's runs skip layers 0 and 1, where
            attention is spread more evenly and key norms say less about it; pass ``skip_layers=(0, 1)`` to follow
            them. The default skips none, so the cache really holds the requested ``compression_ratio``: skipped
            layers keep every token and add their full size to the cache.
    """

    skip_layers: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.skip_layers, (tuple, list)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.skip_layers
        ):
            raise ValueError(
                f"skip_layers must be a tuple of non-negative layer indices, e.g. (0, 1), got {self.skip_layers!r}"
            )
        self.skip_layers = tuple(self.skip_layers)

    def validate(self, model) -> None:
        super().validate(model)
        n_layers = len(attention_layers(model))
        if any(i >= n_layers for i in self.skip_layers):
            raise ValueError(
                f"skip_layers={self.skip_layers} names layers the model does not have; accepted: indices in "
                f"[0, {n_layers - 1}]"
            )

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if module.layer_idx in self.skip_layers:
            return keys, values
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return -keys.float().norm(dim=-1)
