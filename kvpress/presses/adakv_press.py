"""`AdaKVPress`: head-adaptive budgets: a layer's tokens go to the heads whose scores need them most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET
from kvpress.presses.scorer_press import ScorerPress, keep_per_head, rank_key, score_ragged


@dataclass
class AdaKVPress(BasePress):
    """Wrap a :class:`ScorerPress` so each layer keeps its top scores across all heads jointly.

    The layer keeps ``kv_heads * k`` tokens per sequence (``k`` = the wrapped press's per-head budget), chosen as the
    largest scores over every head of the layer (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by
    Adaptive Budget Allocation", arXiv 2407.11550). Tokens the scorer keeps whole (``+inf`` scores: SnapKV's
    observation window, H2O's recent tokens) stay in every head on top of its share, as in the paper, where the
    window is added to the budget ``B' = k - window`` that heads compete for. Each head is guaranteed its own top
    ``floor(alpha_safeguard * B')`` ranked tokens. Heads then hold different lengths, which a
    :class:`~kvpress.cache.VarlenCache` stores exactly.

    Args:
        press: the scorer whose scores rank tokens (its ``compression_ratio``/``target_size`` set the budget).
        alpha_safeguard: fraction of the uniform per-head share of ranked tokens (the budget beyond the kept-whole
            tokens) each head keeps regardless of the others, in [0, 1]. The paper's default is 0.2.
    """

    press: ScorerPress
    alpha_safeguard: float = 0.20

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            raise ValueError(f"AdaKVPress wraps a ScorerPress, got {type(self.press).__name__}")
        if (
            isinstance(self.alpha_safeguard, bool)
            or not isinstance(self.alpha_safeguard, (int, float))
            or not (0 <= self.alpha_safeguard <= 1)
        ):
            raise ValueError(f"alpha_safeguard must be a number in [0, 1], got {self.alpha_safeguard!r}")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(head_variable=True, chunked_prefill=True).merge(self.press.capabilities)

    def validate(self, model) -> None:
        self.press.validate(model)

    def check_length(self, n_tokens: int) -> None:
        self.press.check_length(n_tokens)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        chunk = kwargs.get(CHUNK_BUDGET)
        if chunk is None:
            n = keys.shape[-2]
            k = self.press.n_kept(n, module)
            if k >= n:
                return keys, values
            scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs).float()
        else:
            # The layer keeps heads * k tokens for the chunk's seen tokens, from each head's own (ragged) tokens.
            k = self.press.n_kept(chunk.seen, module)
            if k * keys.shape[1] >= int(chunk.valid(keys).sum(1).min()):
                return None  # nothing to drop
            scores = score_ragged(self.press, module, hidden_states, keys, values, chunk.lengths, kwargs)
        return keep_per_head(keys, values, scores, head_budgets(scores, k, self.alpha_safeguard))


def head_budgets(scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Per-head kept counts ``(batch, heads)`` summing to ``heads * k`` per sequence.

    ``scores``: ``(batch, heads, n)``. A head's ``+inf`` scores (``p`` tokens kept whole, at most ``k``) come first;
    each head then reserves its top ``floor(alpha * (k - p))`` finite scores, and the rest of the layer budget goes to
    the largest remaining scores of any head.
    """
    b, h, n = scores.shape
    ranked = rank_key(scores).sort(dim=-1, descending=True).values
    protected = scores.isposinf().sum(-1).clamp(max=k)  # (b, h)
    reserved = protected + (alpha * (k - protected)).floor().long()
    reserved_mask = torch.arange(n, device=scores.device) < reserved.unsqueeze(-1)
    # Reserved slots rank above everything else, the most recent kept-whole tokens first.
    boosted = torch.where(reserved_mask, ranked + 1e301, ranked)
    top = boosted.flatten(1).topk(h * k, dim=-1).indices  # (b, h*k) positions in the flattened (head, rank) grid
    return torch.zeros(b, h, dtype=torch.long, device=scores.device).scatter_add_(
        1, top // n, torch.ones_like(top, dtype=torch.long)
    )
