"""`LagKVPress`: score each partition of the context against the partition that follows it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.scorer_press import ScorerPress


@dataclass
class LagKVPress(ScorerPress):
    """Attention-free scores from the keys and values alone, each partition read relative to the next one (Liang
    et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important", arXiv
    2504.04704).

    After the first ``n_sink`` tokens, the context is cut into partitions of ``lag_size`` tokens. Partition ``p`` is
    min-max normalised channel by channel with the minimum and maximum of partition ``p + 1`` (its lag reference);
    a token's score is ``softmax(std(k̄)) + softmax(std(v̄))``, the standard deviation over the channels of its
    normalised key and value, the softmax over the tokens of its partition. The sinks, the last full partition (which
    has no reference) and the tokens after it are kept first: sinks, then the most recent.

    The per-partition softmaxes give every partition the same score mass, and the kept tokens are the top scores of
    the whole (sequence, kv head), so partitions share the budget by how peaked their scores are; the paper keeps
    the same share of every partition.

    Args:
        n_sink: leading tokens always kept.
        lag_size: tokens per partition (and in the reference of each).
    """

    n_sink: int = 4
    lag_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_int(self.n_sink, "n_sink", 0)
        check_int(self.lag_size, "lag_size", 2)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, d = keys.shape
        n_parts = max(n - self.n_sink, 0) // self.lag_size
        scored = max(n_parts - 1, 0) * self.lag_size  # tokens with a lag reference
        # Protected tokens rank above every score (at most 2): sinks first, then the most recent.
        position = torch.arange(n, device=keys.device, dtype=torch.float32)
        scores = torch.where(position < self.n_sink, 4.0, 2.0 + (position + 1) / n).expand(b, h, n).clone()
        if scored:
            start = self.n_sink
            total = 0.0
            for x in (keys, values):
                parts = x[:, :, start : start + n_parts * self.lag_size].float()
                parts = parts.reshape(b, h, n_parts, self.lag_size, x.shape[-1])
                ref = parts[:, :, 1:]
                low, high = ref.amin(dim=3, keepdim=True), ref.amax(dim=3, keepdim=True)
                normed = (parts[:, :, :-1] - low) / (high - low).clamp_min(1e-6)
                total = total + normed.std(dim=-1).softmax(dim=-1)  # (b, h, n_parts - 1, lag_size)
            scores[:, :, start : start + scored] = total.reshape(b, h, scored)
        return scores
