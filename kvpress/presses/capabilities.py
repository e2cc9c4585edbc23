"""What a press needs and does, declared once so callers never test press types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Capabilities:
    """Declared needs and effects of a press.

    Attributes:
        phase: ``"prefill"`` for presses that compress the context once, ``"decode"`` for presses that act while tokens
            are generated (the prefill stays whole), ``"both"`` for presses that do both.
        needs_attention_weights: the press reads the prefill attention weights (eager attention only).
        needs_question: the press only makes sense when the question is part of the compressed prompt
            (the pipeline then requires ``query_aware=True``).
        rerotates_positions: kept keys are re-rotated to contiguous positions, so new tokens continue from the
            compressed length instead of the original one.
        head_variable: the press keeps a different number of tokens per head (needs a head-variable cache).
        prunes_channels: the press drops key channels rather than (or on top of) tokens.
        merges_layers: the press stores pairs of layers together (shared directions), in a dense cache only.
        decodes_head_variable: the press compresses while decoding in a head-variable cache too (a ``VarlenCache``,
            whose heads hold different numbers of tokens); decode-time presses without it need a dense cache.
        decodes_in_attention: the press's decode-time work runs inside the cache's attention (the layer it lays out
            at the prefill selects what each step reads), with no hook per step: a replayed CUDA graph runs it
            (QuestPress).
        chunked_prefill: the press can compress a prefill chunk by chunk (``prefill(..., chunk_size=)``): after each
            chunk it brings the layer (the kept tokens of earlier chunks plus the chunk) back to the budget of every
            token seen so far, scoring with the chunk's hidden states only.
    """

    phase: Literal["prefill", "decode", "both"] = "prefill"
    needs_attention_weights: bool = False
    needs_question: bool = False
    rerotates_positions: bool = False
    head_variable: bool = False
    prunes_channels: bool = False
    merges_layers: bool = False
    decodes_head_variable: bool = False
    decodes_in_attention: bool = False
    chunked_prefill: bool = False

    @property
    def compresses_prefill(self) -> bool:
        return self.phase in ("prefill", "both")

    @property
    def compresses_decode(self) -> bool:
        return self.phase in ("decode", "both")

    def merge(self, other: "Capabilities") -> "Capabilities":
        """Capabilities of two presses applied together (any need or effect of either)."""
        if self.phase != other.phase:
            raise ValueError(f"cannot combine a {self.phase}-phase press with a {other.phase}-phase press")
        return Capabilities(
            phase=self.phase,
            needs_attention_weights=self.needs_attention_weights or other.needs_attention_weights,
            needs_question=self.needs_question or other.needs_question,
            rerotates_positions=self.rerotates_positions or other.rerotates_positions,
            head_variable=self.head_variable or other.head_variable,
            prunes_channels=self.prunes_channels or other.prunes_channels,
            merges_layers=self.merges_layers or other.merges_layers,
            decodes_head_variable=self.decodes_head_variable or other.decodes_head_variable,
            decodes_in_attention=self.decodes_in_attention or other.decodes_in_attention,
            chunked_prefill=self.chunked_prefill and other.chunked_prefill,  # both must support it
        )
