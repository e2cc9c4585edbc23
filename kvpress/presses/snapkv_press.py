"""`SnapKVPress`: attention from an observation window of the last queries, pooled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kvpress.presses.budget import check_fits_context
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import group_reduce, num_heads, window_attention


@dataclass
class SnapKVPress(ScorerPress):
    """Score past tokens by the attention the last ``window_size`` queries pay them, pooled along the sequence.

    The window itself is always kept. Scores are averaged over each GQA group by default (one selection per kv
    head).
    Queries are recomputed from the layer input, so any attention implementation works (Li et al., 2024,
    "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469). The window must cover the
    question for the method to be query-aware: use the pipeline's ``query_aware=True``.

    Args:
        window_size: number of final prompt tokens whose queries score the past (kept whole). The default, 8, is
            the window of the published runs this library follows; longer windows sum the attention of context
            tokens that look mostly at their neighbours, which drowns the question's signal and, on SmolLM2, drops
            the later digits of a passkey (``notebooks/what_a_press_keeps.ipynb``).
        kernel_size: width of the 1-D pooling applied to the scores (odd; 1 disables pooling).
        pooling: ``"max"`` or ``"avg"`` pooling.
        group_reduction: how the query heads of a GQA group combine their scores: ``"mean"`` or ``"max"`` (a kv head
            then keeps what any of its query heads needs).
    """

    window_size: int = 8
    kernel_size: int = 7
    pooling: Literal["max", "avg"] = "max"
    group_reduction: Literal["mean", "max"] = "mean"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {self.window_size!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size!r}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.group_reduction not in ("mean", "max"):
            raise ValueError(f"group_reduction must be 'mean' or 'max', got {self.group_reduction!r}")

    def check_length(self, n_tokens: int) -> None:
        check_fits_context("window_size", self.window_size, n_tokens)

    def window_scores(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """Pooled window attention to past tokens, ``(batch, kv_heads, n - window)``, float32."""
        w = self.window_size
        attn = window_attention(module, hidden_states, keys, kwargs["position_embeddings"], w)
        past = attn[..., : keys.shape[-2] - w].sum(dim=2)  # (B, H, n - w)
        past = group_reduce(past, num_heads(module)[1], self.group_reduction)
        if self.kernel_size > 1 and past.shape[-1] > 0:
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            b, h, n = past.shape
            past = pool(past.reshape(b * h, 1, n), self.kernel_size, stride=1, padding=self.kernel_size // 2)
            past = past.reshape(b, h, n)
        return past

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        past = self.window_scores(module, hidden_states, keys, kwargs)
        window = past.new_full((*past.shape[:2], self.window_size), float("inf"))
        return torch.cat([past, window], dim=-1)
