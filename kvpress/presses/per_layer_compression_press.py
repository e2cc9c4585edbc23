"""`PerLayerCompressionPress`: a compression ratio per layer, tokens ranked by an inner scorer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kvpress.presses.budget import check_ratio, n_kept
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET
from kvpress.presses.scorer_press import keep_chunk_budget, keep_tokens
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.utils import attention_layers


@dataclass
class PerLayerCompressionPress(ScorerWrapperPress):
    """Rank tokens with ``press.score`` and keep ``round(n * (1 - compression_ratios[layer]))`` of them in each layer.

    The inner press's own budget (``compression_ratio``/``target_size``) is not used, and the inner press is not
    modified. Ratios of sliding-window layers are accepted but unused (those layers are never compressed).

    Args:
        press: the scorer ranking the tokens.
        compression_ratios: fraction of tokens removed in each attention layer, in ``[0, 1)``; one per layer of the
            model (checked by :meth:`validate`).
    """

    compression_ratios: list[float]

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.compression_ratios, (list, tuple)) or not self.compression_ratios:
            raise ValueError(
                f"compression_ratios must be a non-empty list of floats in [0, 1), got {self.compression_ratios!r}"
            )
        for i, ratio in enumerate(self.compression_ratios):
            check_ratio(ratio, f"compression_ratios[{i}]")

    @property
    def compression_ratio(self) -> float:
        """Mean of the per-layer ratios."""
        return sum(self.compression_ratios) / len(self.compression_ratios)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        n_layers = len(attention_layers(model))
        if len(self.compression_ratios) != n_layers:
            raise ValueError(
                f"compression_ratios has {len(self.compression_ratios)} entries but the model has {n_layers} attention "
                f"layers; accepted: exactly {n_layers} ratios, one per layer"
            )

    @property
    def capabilities(self) -> Capabilities:
        return self.press.capabilities  # a budget per layer, chunk by chunk as the inner scorer allows

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        ratio = self.compression_ratios[module.layer_idx]
        chunk = kwargs.get(CHUNK_BUDGET)
        if chunk is not None:
            budget = n_kept(chunk.seen, ratio)
            return keep_chunk_budget(self.press, module, hidden_states, keys, values, kwargs, chunk, budget)
        n = keys.shape[-2]
        k = n_kept(n, ratio)
        if k >= n:
            return keys, values
        return keep_tokens(keys, values, *self.top_indices(module, hidden_states, keys, values, attentions, kwargs, k))
