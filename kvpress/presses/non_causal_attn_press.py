"""`NonCausalAttnPress`: the attention each token receives from its own chunk of the prompt, in both directions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.zscore import zscore
from kvpress.utils import query_states


def non_causal_chunk_attention(module, hidden_states: torch.Tensor, keys: torch.Tensor, position_embeddings,
                               chunk_size: int, who: str) -> torch.Tensor:  # fmt: skip
    """``(batch, kv_heads, n)`` float32: the attention every key receives from the queries of its chunk of
    ``chunk_size`` tokens (the last one shorter), without the causal mask, summed over the chunk's queries and
    averaged over each kv head's query heads.

    The queries are recomputed from ``hidden_states`` ``(batch, n, hidden)``, one per key of ``keys`` ``(batch,
    kv_heads, n, head_dim)``; ``who`` names the caller in the ``ValueError`` raised when they do not match."""
    b, h_kv, n, d = keys.shape
    if hidden_states.shape[1] != n:
        raise ValueError(
            f"{who} scores each token with the queries of its own chunk of the prompt, so it needs the hidden states "
            f"of every cached token (a one-forward prefill); got {hidden_states.shape[1]} for {n} tokens"
        )
    q = query_states(module, hidden_states, position_embeddings).to(keys.dtype)  # (b, heads, n, d)
    groups = q.shape[1] // h_kv
    q = q.view(b, h_kv, groups, n, d)
    out = keys.new_zeros(b, h_kv, n, dtype=torch.float32)
    # Chunks one at a time: the logits of a chunk take heads * chunk_size² floats, not heads * n * chunk_size.
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = q[:, :, :, start:end] @ keys[:, :, None, start:end].transpose(-1, -2)  # (b, h_kv, g, c, c)
        weights = (logits.float() * module.scaling).softmax(dim=-1)
        out[:, :, start:end] = weights.sum(dim=3).mean(dim=2)
    return out


@dataclass
class NonCausalAttnPress(ScorerPress):
    """Score = the attention a token receives from every query of its chunk of ``chunk_size`` prompt tokens, earlier
    and later ones alike (no causal mask), averaged over its kv head's query heads and z-scored: a query-agnostic
    estimate of how much later text will attend to it (Chari and Van Durme, 2025, "Compactor", arXiv 2507.08143).

    The queries are recomputed from the layer input, so it compresses one-forward prefills only.

    Args:
        chunk_size: tokens per chunk (the last chunk takes the rest).
    """

    chunk_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        check_int(self.chunk_size, "chunk_size", 1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()  # queries of every cached token: one-forward prefills only

    def chunk_refusal(self) -> str:
        return f"{type(self).__name__} needs the queries of every cached token, which a later chunk does not have"

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return zscore(non_causal_chunk_attention(module, hidden_states, keys, kwargs["position_embeddings"],
                                                 self.chunk_size, type(self).__name__))  # fmt: skip
