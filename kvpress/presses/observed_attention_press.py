"""`ObservedAttentionPress`: total attention each token received during the prefill."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.capabilities import Capabilities
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import group_reduce, num_heads


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score = the attention each key received from all prefill queries (column sum of the attention matrix).

    The accumulated attention of H2O's "heavy hitters" (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models", arXiv 2306.14048), computed once at prefill. Early tokens are
    seen by more queries under the causal mask and so score higher; that bias is part of the method. Per-query-head
    sums are averaged over each GQA group. Reads the layer's own attention weights, so the model must run eager
    attention (checked by :meth:`validate` when the press is attached).
    """

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(needs_attention_weights=True)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        if attentions is None:
            raise ValueError(
                f"{type(self).__name__} got no attention weights from layer {module.layer_idx}; "
                "run the model with attn_implementation='eager' (accepted: 'eager')"
            )
        received = attentions.float().sum(dim=2)  # (batch, heads, n): summed over the query rows
        return group_reduce(received, num_heads(module)[1])
