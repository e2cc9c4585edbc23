"""`KeyDiffPress`: keep the keys least like the layer's other keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kvpress.presses.scorer_press import ScorerPress


@dataclass
class KeyDiffPress(ScorerPress):
    """Score = −cos(k_i, a): the anchor ``a`` is the mean of the unit-normalised keys of the (sequence, kv head), so
    keys pointing away from the others (distinctive keys, which tend to draw attention) are kept (Park et al., 2025,
    "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
    Environments", arXiv 2504.15364).

    Query-free: no attention and no query is computed, so it runs under any attention implementation. The paper's
    block-wise processing of prompts longer than the memory allows is the chunked prefill (``prefill_chunk_size=``),
    where each chunk's anchor is taken over the tokens kept so far plus the chunk.
    """

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        k = keys.float()
        anchor = F.normalize(k, dim=-1).mean(dim=2, keepdim=True)  # (batch, kv_heads, 1, head_dim)
        return -F.cosine_similarity(k, anchor, dim=-1)
