"""`CompactorPress`: leverage scores blended with non-causal chunk attention, sinks at both ends kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.leverage_score_press import leverage_scores, sketch_matrix
from kvpress.presses.non_causal_attn_press import non_causal_chunk_attention
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.zscore import zscore
from kvpress.utils import unrotated_keys


@dataclass
class CompactorPress(ScorerPress):
    """Score = ``β · z(leverage) + (1 − β) · z(non-causal attention)`` (Chari and Van Durme, 2025, "Compactor:
    Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores", arXiv 2507.08143): the
    approximate leverage of the pre-RoPE keys (:class:`LeverageScorePress`) finds the geometric outliers, the
    attention from each token's own chunk in both directions (:class:`NonCausalAttnPress`) the tokens text refers
    to. The first ``sink_size_start`` and last ``sink_size_end`` tokens are kept first (the last ones first of all).

    Query-agnostic: the question may come after compression. One-forward prefills only (it reads every key's
    position and query).

    Args:
        sink_size_start: leading tokens always kept.
        sink_size_end: trailing tokens always kept.
        chunk_size: tokens per chunk of the non-causal attention.
        sketch_dimension: columns of the Gaussian sketch of the keys' channels.
        blending: weight ``β`` of the leverage scores in ``[0, 1]``; ``None`` takes ``compression_ratio`` (the
            harder the compression, the more the outliers count), or 0.5 with ``target_size``.
        seed: seed of the sketch.
    """

    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for name, minimum in (("sink_size_start", 0), ("sink_size_end", 0), ("chunk_size", 1),
                              ("sketch_dimension", 1), ("seed", 0)):  # fmt: skip
            check_int(getattr(self, name), name, minimum)
        b = self.blending
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1):
            raise ValueError(f"blending must be a number in [0, 1] or None (compression_ratio), got {b!r}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()  # positions and queries of every key: one-forward prefills only

    def chunk_refusal(self) -> str:
        return f"{type(self).__name__} needs the position and the query of every cached token"

    @property
    def weight(self) -> float:
        """``β``, the weight of the leverage scores."""
        if self.blending is not None:
            return float(self.blending)
        return self.compression_ratio if self.target_size is None else 0.5

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        name, pe = type(self).__name__, kwargs["position_embeddings"]
        sketch = sketch_matrix(keys.shape[-1], self.sketch_dimension, self.seed, keys.device)
        leverage = zscore(leverage_scores(unrotated_keys(keys, pe, name), sketch))
        attention = zscore(non_causal_chunk_attention(module, hidden_states, keys, pe, self.chunk_size, name))
        scores = self.weight * leverage + (1 - self.weight) * attention
        n = keys.shape[2]
        position = torch.arange(n, device=keys.device)
        # Above every blended score (z-scores stay within ±sqrt(n)): the end sinks first, then the start sinks.
        top = scores.abs().amax() + 1
        scores = torch.where(position >= n - self.sink_size_end, top + 2, scores)
        return torch.where(position < self.sink_size_start, top + 1, scores)
