"""`ScorerWrapperPress`: base of presses that reuse an inner `ScorerPress`'s scores with their own selection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.scorer_press import ScorerPress, top_positions


@dataclass
class ScorerWrapperPress(BasePress):
    """A press that asks an inner :class:`ScorerPress` for scores and decides itself how many and which tokens to keep.

    The inner press is never modified (it may be shared with other wrappers or used on its own): wrappers only call
    its ``score``, ``n_kept``, ``check_length`` and ``validate``. Its needs (attention weights, question) are the
    wrapper's needs.

    Args:
        press: the scorer whose ``score`` ranks the tokens.
    """

    press: ScorerPress

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            raise ValueError(
                f"press must be a ScorerPress (a press that scores tokens, e.g. KnormPress or SnapKVPress), "
                f"got {type(self.press).__name__}"
            )

    @property
    def capabilities(self) -> Capabilities:
        # A wrapper decides the kept tokens itself: a chunked prefill needs its own support (ChunkBudget).
        return dataclasses.replace(self.press.capabilities, chunked_prefill=False)

    def chunk_refusal(self) -> str | None:
        if self.capabilities.chunked_prefill:
            return None
        inner = self.press.chunk_refusal()
        if inner is not None:
            return f"its press: {inner}"
        return f"{type(self).__name__} decides the kept tokens itself, from the whole prompt"

    @property
    def compression_ratio(self) -> float:
        """Fraction of the prefilled tokens removed (the inner press's)."""
        return self.press.compression_ratio

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        self.press.validate(model)

    def check_length(self, n_tokens: int) -> None:
        self.press.check_length(n_tokens)

    def top_indices(
        self, module, hidden_states, keys, values, attentions, kwargs, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(batch, kv_heads, k)`` of the ``k`` best-scored tokens of every (sequence, kv-head), and the
        ``(batch, kv_heads, n)`` scores that ranked them.

        Positions are sorted in increasing order, so the kept tokens stay in their original order (see
        :func:`~kvpress.presses.scorer_press.top_positions`).
        """
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        return top_positions(scores, k), scores
