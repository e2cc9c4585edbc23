"""`KnormPress`: keep the keys of smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.scorer_press import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Score = −‖k‖₂ of each post-RoPE key: low-norm keys tend to receive high attention.

    Query-free and the cheapest press (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", arXiv 2406.11430).
    """

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return -keys.float().norm(dim=-1)
