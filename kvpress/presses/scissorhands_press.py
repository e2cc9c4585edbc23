"""`ScissorhandsPress`: a fixed budget kept by the persistence of importance over a history window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.attention_eviction_press import AttentionEvictionPress, recent_and_top
from kvpress.presses.budget import check_int


@dataclass
class ScissorhandsPress(AttentionEvictionPress):
    """Keep the cache at ``target_size`` tokens while generating, dropping the tokens that were least important over
    the last ``history_window`` steps (Liu et al., 2023, "Scissorhands: Exploiting the Persistence of Importance
    Hypothesis for LLM KV Cache Compression at Test Time", arXiv 2305.17118).

    At every new query a token counts as unimportant when its attention (averaged over a kv head's query heads) is
    below the average, ``1 / n`` for ``n`` visible tokens. Every ``compression_interval`` steps, a layer over budget
    keeps its first ``n_sink`` and last ``recent_size`` tokens and, of the others, those with the fewest unimportant
    counts over the last ``history_window`` queries (tokens pivotal in the recent past tend to stay pivotal).

    Args:
        target_size: tokens per (sequence, kv head) kept in each layer.
        history_window: queries over which the counts are taken (an exact sliding window).
        recent_size: most recent tokens always kept.
        n_sink: first tokens always kept.
        compression_interval: generated tokens between evictions.
    """

    compression_interval: int = 16
    history_window: int = 64
    recent_size: int = 16
    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        for name, minimum in (("history_window", 1), ("recent_size", 0), ("n_sink", 0)):
            check_int(getattr(self, name), name, minimum)
        if self.recent_size + self.n_sink > self.target_size:
            raise ValueError(
                f"recent_size + n_sink = {self.recent_size + self.n_sink} must fit in target_size={self.target_size}"
            )

    def initial_stats(self, keys):
        b, h, n = keys.shape[:3]
        return {
            "low": keys.new_zeros((b, h, n), dtype=torch.int32),  # unimportant counts within the window
            "events": keys.new_zeros((self.history_window, b, h, n), dtype=torch.bool),  # one row per query
            "row": 0,  # queries seen: the next row of the ring is row % history_window
        }

    def observe(self, stats, attention, visible):
        b, h, n_q, n = attention.shape
        low = attention < (1.0 / visible)[..., None]
        low &= torch.arange(n, device=attention.device) < visible[..., None]  # not the hidden ones or padding
        for i in range(n_q):  # ring of the last history_window queries
            row = stats["row"] % self.history_window
            stats["low"] += low[:, :, i].int() - stats["events"][row].int()
            stats["events"][row] = low[:, :, i]
            stats["row"] += 1

    def keep(self, stats, lengths):
        return recent_and_top(-stats["low"].float(), lengths, self.target_size, self.recent_size, self.n_sink)
