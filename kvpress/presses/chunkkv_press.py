"""`ChunkKVPress`: keep whole chunks of consecutive tokens, the same ones in every head of a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.scorer_press import keep_tokens, top_positions
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress


@dataclass
class ChunkKVPress(ScorerWrapperPress):
    """Semantic chunks instead of single tokens (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression
    for Efficient Long-Context LLM Inference", arXiv 2502.00299): the context is cut into chunks of
    ``chunk_length`` consecutive tokens; a chunk's score is the sum of its tokens' inner scores, averaged over the
    layer's kv heads, and the best chunks are kept whole, the same in every head, so a kept phrase stays intact. The
    budget of ``k`` tokens takes whole chunks in order of their score; the next chunk fills what remains with its
    best tokens. Tokens the inner press keeps whole (``+inf``, e.g. SnapKV's window) are kept first.

    Args:
        press: the scorer of the tokens (SnapKV as published); its budget is this press's budget.
        chunk_length: tokens per chunk (the last one may be shorter).
    """

    chunk_length: int = 20

    def __post_init__(self):
        super().__post_init__()
        check_int(self.chunk_length, "chunk_length", 1)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, _ = keys.shape
        k = self.press.n_kept(n, module)
        if k >= n:
            return keys, values
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs).float()
        whole = scores.isposinf().any(dim=1)  # (b, n): kept whole in some head
        token = torch.where(scores.isfinite(), scores, 0.0).mean(dim=1)  # (b, n)
        chunk = torch.arange(n, device=keys.device) // self.chunk_length
        n_chunks = int(chunk[-1]) + 1
        chunk_score = token.new_zeros(b, n_chunks).index_add_(1, chunk, token)  # (b, n_chunks)
        # Rank: kept-whole tokens, then chunks by score, tokens by score inside a chunk (chunk ranks dominate).
        order = chunk_score.argsort(dim=-1).argsort(dim=-1).double()  # 0 = worst chunk
        within = token.double().argsort(dim=-1).argsort(dim=-1) / n  # in [0, 1)
        rank = order.gather(1, chunk.expand(b, n)) + within
        rank = torch.where(whole, torch.inf, rank)[:, None].expand(b, h, n)
        return keep_tokens(keys, values, top_positions(rank, k), scores)
