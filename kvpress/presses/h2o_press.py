"""`H2OPress`: heavy hitters and recent tokens, evicting while generating (H2O as published)."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.attention_eviction_press import AttentionEvictionPress, recent_and_top


@dataclass
class H2OPress(AttentionEvictionPress):
    """Keep the tokens that have received the most attention so far (heavy hitters) and the most recent ones, evicting
    at every generated token (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models", arXiv 2306.14048).

    A token's score is the attention it has received from every query since the press was attached (the question's
    tokens, then each generated one), summed over the forward's queries and averaged over each kv head's query heads.
    Of ``target_size`` kept tokens, the last ``round(recent_ratio * target_size)`` are the most recent, the rest the
    highest scores (the paper splits evenly). For the prefill-time variant (scores from the prompt's own attention),
    see :class:`~kvpress.presses.observed_attention_press.ObservedAttentionPress`.

    Args:
        target_size: tokens per (sequence, kv head) kept in each layer.
        recent_ratio: share of ``target_size`` reserved for the most recent tokens, in [0, 1].
        compression_interval: generated tokens between evictions (1, as published).
    """

    recent_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        r = self.recent_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"recent_ratio must be a number in [0, 1], got {r!r}")

    def observe(self, stats, attention, visible):
        stats["score"] += attention.sum(dim=2)

    def keep(self, stats, lengths):
        return recent_and_top(stats["score"], lengths, self.target_size, round(self.recent_ratio * self.target_size))
