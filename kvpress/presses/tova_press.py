"""`TOVAPress`: keep the tokens the last query attends to most, the same tokens for every head."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import num_heads, window_attention


@dataclass
class TOVAPress(ScorerPress):
    """Score = attention of the last prompt token to every token, averaged over all query heads of the layer.

    Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): one
    layer-wide ranking, so every kv head keeps the same positions. The last token is always kept. Its query is
    recomputed from the layer input, so any attention implementation works.
    """

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        attn = window_attention(module, hidden_states, keys, kwargs["position_embeddings"], window=1)
        scores = attn[:, :, 0].mean(dim=1)  # (batch, n): mean over all query heads
        scores[:, -1] = float("inf")
        b, n = scores.shape
        return scores.unsqueeze(1).expand(b, num_heads(module)[1], n)
