"""`BlockPress`: evict block by block, as a cache of fixed size that the prompt streams through."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.scorer_press import gather_tokens, keep_tokens, top_positions
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress


@dataclass
class BlockPress(ScorerWrapperPress):
    """The prompt's tokens enter the kept set ``block_size`` at a time; whenever the set exceeds the budget ``k``,
    the inner press scores the set (the tokens kept so far plus the block, in order) and the best ``k`` stay: the
    block-wise eviction of KeyDiff (Park et al., 2025, arXiv 2504.15364), where a prompt longer than the memory
    allows streams through a cache of fixed size.

    Every token is scored against the tokens kept when its block arrived, not against the whole prompt. Suited to
    query-free scorers (``KeyDiffPress`` as published, ``KnormPress``): a window scorer would see its window's
    queries paired with the keys of the current set. For the same bound on peak memory during the model's forward,
    use the chunked prefill (``prefill_chunk_size=``), which re-scores after every chunk of the forward itself.

    Args:
        press: the scorer of each block's set (its budget is this press's budget).
        block_size: tokens added between two evictions.
    """

    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_int(self.block_size, "block_size", 1)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, _ = keys.shape
        k = self.press.n_kept(n, module)
        if k >= n:
            return keys, values
        kept = torch.zeros(b, h, 0, dtype=torch.long, device=keys.device)
        for start in range(0, n, self.block_size):
            block = torch.arange(start, min(start + self.block_size, n), device=keys.device).expand(b, h, -1)
            kept = torch.cat([kept, block], dim=-1)
            if kept.shape[-1] > k:
                scores = self.press.score(module, hidden_states, gather_tokens(keys, kept),
                                          gather_tokens(values, kept), None, kwargs)  # fmt: skip
                kept = kept.gather(-1, top_positions(scores, k))
        return keep_tokens(keys, values, kept)
