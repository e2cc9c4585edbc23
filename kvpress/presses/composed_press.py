"""`ComposedPress`: several presses applied one after the other to each layer."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET, ChunkBudget
from kvpress.presses.scorer_press import ScorerPress


@dataclass
class ComposedPress(BasePress):
    """Apply ``presses`` in turn to every layer: each press compresses the keys and values the previous one kept.

    Every press receives the layer's input ``hidden_states`` and ``kwargs`` of the full context (``n`` tokens), so
    presses that recompute queries (SnapKV's observation window) still score with the queries of the last context
    tokens; since cached keys carry their RoPE rotation, query-key products stay exact on any subset of keys. A press
    sees the previous press's output as its context; scorer presses keep tokens in their original order, so a later
    press's "last tokens" are the most recent tokens the previous press kept.
    Attention weights describe the full token set only: once a press has removed tokens, later presses receive
    ``attentions=None``. Hence the accepted orders:

    - a press that needs attention weights must be the first;
    - a press that prunes key channels or keeps a different number of tokens per head must be the last (later presses
      expect dense, full-width keys);
    - a press that re-rotates positions cannot be composed (the original positions of a subset are lost between
      presses); wrap a single scorer in it instead.

    Args:
        presses: the presses, applied first to last; all of the same phase.
    """

    presses: list[BasePress]

    def __post_init__(self):
        if not isinstance(self.presses, (list, tuple)) or not self.presses:
            raise ValueError(f"presses must be a non-empty list of presses (BasePress), got {self.presses!r}")
        last = len(self.presses) - 1
        for i, press in enumerate(self.presses):
            if not isinstance(press, BasePress):
                raise ValueError(f"presses[{i}] must be a press (BasePress), got {type(press).__name__}")
            caps = press.capabilities
            name = type(press).__name__
            if caps.needs_attention_weights and i > 0:
                raise ValueError(
                    f"presses[{i}] ({name}) needs attention weights, which only the first press receives; "
                    "accepted: such a press at position 0"
                )
            if (caps.prunes_channels or caps.head_variable) and i < last:
                raise ValueError(
                    f"presses[{i}] ({name}) prunes key channels or keeps per-head lengths, which later presses cannot "
                    f"read; accepted: such a press at the last position ({last})"
                )
            if caps.merges_layers and last > 0:
                raise ValueError(
                    f"presses[{i}] ({name}) merges layer pairs, which other presses cannot read or feed; "
                    "accepted: a layer-merging press on its own"
                )
            if caps.rerotates_positions and last > 0:
                raise ValueError(
                    f"presses[{i}] ({name}) re-rotates positions and cannot be composed with other presses; "
                    "accepted: a re-rotating press on its own"
                )
        _ = self.capabilities  # merging raises when the presses act in different phases

    @property
    def capabilities(self) -> Capabilities:
        merged = functools.reduce(Capabilities.merge, (press.capabilities for press in self.presses))
        # Chunk by chunk, each press after the first brings the layer to its budget of what the previous one keeps:
        # that count is known for presses that score tokens (ScorerPress.n_kept).
        # Head-variable layers are left out: an earlier press would cut every head to the shortest one.
        chunked = (merged.chunked_prefill and not merged.head_variable
                   and all(isinstance(press, ScorerPress) for press in self.presses[:-1]))  # fmt: skip
        return dataclasses.replace(merged, chunked_prefill=chunked)

    def chunk_refusal(self) -> str | None:
        if self.capabilities.chunked_prefill:
            return None
        for i, press in enumerate(self.presses):
            reason = press.chunk_refusal()
            if reason is not None:
                return f"presses[{i}]: {reason}"
            name = type(press).__name__
            if press.capabilities.head_variable:
                return (f"presses[{i}] ({name}) keeps per-head lengths, which the next chunk's first press would cut "
                        "to the shortest head")  # fmt: skip
            if i < len(self.presses) - 1 and not isinstance(press, ScorerPress):
                return (f"presses[{i}] ({name}) does not say how many tokens it keeps (ScorerPress.n_kept), which "
                        "sets the next press's budget")  # fmt: skip
        return None

    @property
    def compression_ratio(self) -> float:
        """Fraction of tokens removed overall, ``1 - prod(1 - r_i)`` over the presses' ``compression_ratio``.

        Presses without a ``compression_ratio`` count as 0 (budgets given as ``target_size`` are not reflected).
        """
        return 1.0 - math.prod(1.0 - getattr(press, "compression_ratio", 0.0) for press in self.presses)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        for press in self.presses:
            press.validate(model)

    def check_length(self, n_tokens: int) -> None:
        # Later presses see fewer tokens; they are checked on what they receive, in `compress`.
        self.presses[0].check_length(n_tokens)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """The last press's output; its ``indices`` are positions in the original prefill, and its ``scores`` the
        first press's (the only ones that cover every prefilled token)."""
        n = keys.shape[-2]
        last = len(self.presses) - 1
        positions = torch.arange(n, device=keys.device).expand(*keys.shape[:2], n)  # original position of each token
        scores = None
        chunk = kwargs.get(CHUNK_BUDGET)
        for i, press in enumerate(self.presses):
            if i > 0:
                press.check_length(keys.shape[-2])
            kv = press.compress(module, hidden_states, keys, values, attentions, kwargs)
            if chunk is not None:
                # The next press keeps its budget of the tokens this one keeps of the prompt seen so far.
                seen = press.n_kept(chunk.seen, module) if i < last else chunk.seen
                chunk = ChunkBudget(min(seen, chunk.seen), None, chunk.last)
                kwargs = {**kwargs, CHUNK_BUDGET: chunk}
                if kv is None:  # this press dropped nothing
                    if i == last:
                        unchanged = keys.shape[-2] == n
                        return None if unchanged else CompressedKV(keys, values, indices=positions, scores=scores)
                    continue
            kv = kv if isinstance(kv, CompressedKV) else CompressedKV(*kv)
            scores = kv.scores if i == 0 else scores
            if positions is not None:
                if kv.indices is not None:
                    positions = positions.gather(-1, kv.indices)
                elif kv.values.shape[-2] != positions.shape[-1]:
                    positions = None  # a press that removed tokens without saying which
            if i == last:
                kv.indices, kv.scores = positions, scores
                return kv
            # Validation keeps channel-pruning presses last, so an intermediate CompressedKV holds full-width keys.
            keys, values = kv.keys, kv.values
            if keys.shape[-2] != n:
                attentions = None
