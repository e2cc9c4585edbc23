"""`FinchPress`: the question chooses what to keep of the context, chunk by chunk, in a cache of fixed size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_budget, check_int, n_kept
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.received_attention import received_attention
from kvpress.presses.scorer_press import gather_tokens, keep_tokens, top_positions
from kvpress.utils import group_reduce, query_states

_QUESTION = "finch_question_length"


@dataclass
class FinchPress(BasePress):
    """Prompt-guided selection over chunks of the context (Corallo and Papotti, 2024, "FINCH: Prompt-guided
    Key-Value Cache Compression for Large Language Models", TACL, arXiv 2408.00167).

    The prompt is the context followed by the question (the pipeline's ``query_aware=True``). The context enters a
    cache of ``k - q`` tokens per head (``k`` the budget, ``q`` the question's tokens, always kept) ``chunk_length``
    tokens at a time; whenever the cache overflows, the question's queries attend over the cache, the chunk and the
    question (a softmax over those tokens only, as when the chunk and the question follow the cache), a kv head
    scores each token by the attention its query heads give it (summed over the question, averaged over the group),
    and the best ``k - q`` stay. Every token is thus judged against what was kept when its chunk arrived. A budget
    smaller than the question keeps the question's last ``k`` tokens only.

    The question's length comes from the caller: the pipeline with ``query_aware=True`` and
    ``prefill(..., question_length=)`` tell it; ``question_length`` fixes it for other callers (e.g. ``model.generate``
    under the press). Kept tokens stay at their original positions, as with every press of this library; the paper
    re-rotates them to contiguous positions, which is not offered here.

    Args:
        compression_ratio / target_size: the budget, as for every press (question included).
        chunk_length: context tokens added to the cache between two selections.
        question_length: the question's tokens at the end of the prompt, for callers that do not tell it.
    """

    compression_ratio: float = 0.0
    target_size: int | None = None
    chunk_length: int = 512
    question_length: int | None = None

    def __post_init__(self):
        check_budget(self.compression_ratio, self.target_size)
        check_int(self.chunk_length, "chunk_length", 1)
        if self.question_length is not None:
            check_int(self.question_length, "question_length", 1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(needs_question=True)

    def compress_prefill(self, module, cache, hidden_states, keys, values, attentions, kwargs, report) -> None:
        q = self.question_length if self.question_length is not None else report.question_length
        if q is None:
            raise ValueError(
                "FinchPress needs the question's length: use the pipeline with query_aware=True, "
                "prefill(..., question_length=) / CompressedContext.prefill(..., question_length=), or set "
                "FinchPress(question_length=...)"
            )
        if q >= keys.shape[2]:
            raise ValueError(f"question_length={q} leaves no context in a prompt of {keys.shape[2]} tokens")
        super().compress_prefill(module, cache, hidden_states, keys, values, attentions, {**kwargs, _QUESTION: q},
                                 report)  # fmt: skip

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, _ = keys.shape
        q = kwargs[_QUESTION]
        k = n_kept(n, self.compression_ratio, self.target_size)
        if k >= n:
            return keys, values
        budget = max(0, k - q)  # context tokens kept; the question stays whole
        queries = query_states(module, hidden_states[:, -q:], kwargs["position_embeddings"])
        question = torch.arange(n - q, n, device=keys.device).expand(b, h, -1)
        kept = torch.zeros(b, h, 0, dtype=torch.long, device=keys.device)
        context = n - q
        for start in range(0, context, self.chunk_length):
            chunk = torch.arange(start, min(start + self.chunk_length, context), device=keys.device).expand(b, h, -1)
            kept = torch.cat([kept, chunk], dim=-1)
            if kept.shape[-1] <= budget:
                continue
            seen = torch.cat([kept, question], dim=-1)  # in order: the question's queries come last
            weights = received_attention(queries, gather_tokens(keys, seen), module.scaling, "sum")
            scores = group_reduce(weights, h, "mean")[..., : kept.shape[-1]]
            kept = kept.gather(-1, top_positions(scores, budget))
        return keep_tokens(keys, values, torch.cat([kept, question[..., q - min(q, k) :]], dim=-1))
