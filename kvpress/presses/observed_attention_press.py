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

    As in the paper, the kept budget is split between the heavy hitters and the most recent tokens: the last
    ``round(recent_ratio * k)`` of the ``k`` kept tokens are kept whole (``+inf`` scores), the rest go to the highest
    accumulated attention.

    Args:
        recent_ratio: share of the kept tokens reserved for the most recent ones, in [0, 1]; the paper's default
            splits the budget evenly (0.5). 0 gives pure accumulated-attention ranking.
    """

    recent_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if (
            isinstance(self.recent_ratio, bool)
            or not isinstance(self.recent_ratio, (int, float))
            or not 0 <= self.recent_ratio <= 1
        ):
            raise ValueError(
                f"recent_ratio must be a number in [0, 1] (share of the kept tokens that are the most recent), "
                f"got {self.recent_ratio!r}"
            )

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
        scores = group_reduce(received, num_heads(module)[1])
        n = scores.shape[-1]
        recent = round(self.recent_ratio * self.n_kept(n, module))
        if recent:
            scores[..., n - recent :] = float("inf")
        return scores
