"""`StreamingLLMPress`: keep the attention sinks and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_n_sink, check_sink_budget
from kvpress.presses.scorer_press import ScorerPress


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens and the most recent ones; the selection depends on positions only.

    The first tokens collect a large share of attention whatever their content ("attention sinks"), so removing
    them degrades the model, while recent tokens carry the local context (Xiao et al., 2024, "Efficient Streaming
    Language Models with Attention Sinks", arXiv 2309.17453). Of a budget of ``k`` tokens, ``n_sink`` go to the sinks
    and ``k - n_sink`` to the most recent tokens. This is the one-shot prefill variant: the kept keys keep their
    original positions (no re-rotation).

    Args:
        n_sink: number of leading tokens always kept. A compressed layer must keep at least ``n_sink`` tokens:
            a smaller budget raises ``ValueError`` before the layer is touched (see :meth:`check_length`).
    """

    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_n_sink(self.n_sink)

    def check_length(self, n_tokens: int) -> None:
        check_sink_budget(self.n_sink, n_tokens, self.n_kept(n_tokens))

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n = keys.shape[:3]
        # Recency is the position itself; sinks are lifted above every other position.
        position = torch.arange(n, device=keys.device, dtype=torch.float32)
        scores = torch.where(position < self.n_sink, position + n, position)
        return scores.expand(b, h, n)
