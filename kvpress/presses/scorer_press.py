"""`ScorerPress`: keep the top-scored tokens of every (sequence, kv-head)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_budget, n_kept
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET, ChunkBudget


@dataclass
class ScorerPress(BasePress):
    """Score every cached token and keep the highest-scored ones, the same number for every head.

    Args:
        compression_ratio: fraction of the prefilled tokens to remove, in ``[0, 1)``; each layer keeps
            ``round(n * (1 - compression_ratio))`` tokens per (sequence, kv-head).
        target_size: absolute number of tokens to keep per (sequence, kv-head) in each layer, used instead of
            ``compression_ratio`` (which must then stay 0). Contexts shorter than it are kept whole.
    """

    compression_ratio: float = 0.0
    target_size: int | None = None

    def __post_init__(self):
        check_budget(self.compression_ratio, self.target_size)

    @abstractmethod
    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Importance of every cached token: ``(batch, kv_heads, n)``; higher is kept first."""

    def n_kept(self, n_tokens: int, module: nn.Module | None = None) -> int:
        """Tokens kept per (sequence, kv-head) for a prefill of ``n_tokens`` (``module`` allows per-layer budgets)."""
        return n_kept(n_tokens, self.compression_ratio, self.target_size)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(chunked_prefill=True)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        chunk = kwargs.get(CHUNK_BUDGET)
        if chunk is not None:
            return self.compress_chunk(module, hidden_states, keys, values, kwargs, chunk)
        n = keys.shape[-2]
        k = self.n_kept(n, module)
        if k >= n:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        return keep_tokens(keys, values, self.select(scores, k, module), scores)

    def compress_chunk(self, module, hidden_states, keys, values, kwargs, chunk: ChunkBudget):
        """One chunk of a chunked prefill: every head keeps the budget of ``chunk.seen`` tokens (all it holds if
        fewer), scored over its own tokens (:func:`score_ragged`)."""
        return keep_chunk_budget(self, module, hidden_states, keys, values, kwargs, chunk,
                                 self.n_kept(chunk.seen, module))  # fmt: skip

    def select(self, scores: torch.Tensor, k: int, module: nn.Module) -> torch.Tensor:
        """Positions ``(batch, kv_heads, k)`` to keep, increasing, given the ``(batch, kv_heads, n)`` scores: the top
        ``k`` (:func:`top_positions`). Presses that pick otherwise (sampling) override this."""
        return top_positions(scores, k)


def keep_chunk_budget(scorer: ScorerPress, module, hidden, keys, values, kwargs, chunk: ChunkBudget, budget: int):
    """The ``budget`` best tokens per head (all a head holds if fewer) of a layer during a chunked prefill, ranked
    by ``scorer`` over each head's own tokens (:func:`score_ragged`); ``None`` when nothing is to be dropped."""
    valid = chunk.valid(keys)
    k = min(budget, int(valid.min()))
    if k >= int(valid.max()):
        return None
    scores = score_ragged(scorer, module, hidden, keys, values, chunk.lengths, kwargs)
    return keep_tokens(keys, values, scorer.select(scores, k, module), scores)


def score_ragged(scorer: ScorerPress, module, hidden, keys, values, lengths: torch.Tensor | None, kwargs: dict):
    """``scorer``'s scores ``(batch, kv_heads, n)`` of ``keys, values`` holding ``lengths`` ``(batch, kv_heads)``
    tokens per head from position 0 (``None``: all ``n``), ``-inf`` past each head's tokens.

    A head is scored over its own tokens only: the scorer runs once per distinct length, on the first ``m``
    positions (exact for the heads of length ``m``), so windows of recent tokens, softmaxes and positions are the
    head's own. Without attention weights (``attentions=None``).
    """
    n = keys.shape[2]
    if lengths is None or bool((lengths == n).all()):
        return scorer.score(module, hidden, keys, values, None, kwargs).float()
    lengths = lengths.to(keys.device)
    scores = torch.full(keys.shape[:3], float("-inf"), device=keys.device)
    for m in torch.unique(lengths).tolist():
        if m == 0:
            continue
        part = scorer.score(module, hidden, keys[:, :, :m], values[:, :, :m], None, kwargs).float()
        scores[..., :m] = torch.where((lengths == m)[..., None], part, scores[..., :m])
    return scores


def rank_key(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(..., n)`` as float64 ranking keys in which tied ``+inf`` scores order by position, latest first.

    Presses mark the tokens they keep whole (observation windows, recent tokens) with ``+inf``. When the budget is
    smaller than that span, the most recent of its tokens are the ones kept, never an arbitrary pick among ties.
    Finite scores keep their order (float32 and float64 scores convert exactly).
    """
    n = scores.shape[-1]
    # Above any finite score a press returns (all are far below 1e300) and distinct for every position.
    recency = 1e300 * (1 + torch.arange(n, device=scores.device, dtype=torch.float64) / n)
    return torch.where(scores.isposinf(), recency, scores.double())


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``(..., k)`` of the ``k`` highest of ``scores`` ``(..., n)``, in increasing order.

    Kept tokens stay in their original order, so later presses (windows, recent tokens) see a true suffix. Ties among
    ``+inf`` scores go to the latest positions (:func:`rank_key`).
    """
    return rank_key(scores).topk(k, dim=-1).indices.sort(dim=-1).values


def keep_tokens(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor | None = None
) -> CompressedKV:
    """The tokens at ``indices`` ``(batch, kv_heads, k)`` of ``keys`` and ``values``, with the positions (and the
    ``(batch, kv_heads, n)`` scores that chose them) for the report, which copies them only when recording."""
    return CompressedKV(gather_tokens(keys, indices), gather_tokens(values, indices), indices=indices, scores=scores)


def keep_per_head(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor
) -> CompressedKV:
    """Head ``h`` of sequence ``b`` keeps its ``lengths[b, h]`` best-scored tokens (``lengths`` ``(batch, kv_heads)``).

    Tokens are stored in each head's ranking order up to the longest head; the cache keeps each head's prefix.
    """
    order = rank_key(scores).topk(int(lengths.max()), dim=-1).indices
    kv = keep_tokens(keys, values, order, scores)
    kv.head_lengths = lengths.cpu()
    return kv


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select tokens: ``x`` ``(batch, heads, n, d)``, ``indices`` ``(batch, heads, k)`` -> ``(batch, heads, k, d)``."""
    return x.gather(2, indices.unsqueeze(-1).expand(*indices.shape, x.shape[-1]))
