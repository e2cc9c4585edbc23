"""`RandomPress`: keep a uniformly random subset of tokens (the baseline every method should beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.scorer_press import ScorerPress


@dataclass
class RandomPress(ScorerPress):
    """Score every token with an independent uniform draw from ``[0, 1)``.

    Draws come from a private ``torch.Generator`` created for each layer's compression, so the global RNG is never
    seeded nor advanced.

    Args:
        seed: with an int, layer ``l`` draws from a generator seeded with ``seed + l``: layers differ from each other,
            and a given seed keeps the same tokens for inputs of the same shape. ``None`` seeds each generator from
            fresh system entropy (a different selection on every call).
    """

    seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        generator = torch.Generator(device=keys.device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed + module.layer_idx)
        return torch.rand(keys.shape[:3], generator=generator, device=keys.device)
