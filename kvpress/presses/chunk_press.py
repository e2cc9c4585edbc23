"""`ChunkPress`: compress each consecutive chunk of the context on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.scorer_press import keep_tokens
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress


@dataclass
class ChunkPress(ScorerWrapperPress):
    """Split the context into consecutive chunks of ``chunk_length`` tokens (the last may be shorter) and keep the
    inner press's top ``press.n_kept(len_chunk)`` tokens of each chunk (``round(len_chunk * (1 - r))``), so the kept
    tokens are spread over the whole context. Kept tokens stay in their original order.

    The inner press scores each chunk as if it were the whole context: it receives the chunk's keys, values, hidden
    states, attention weights (the chunk's block of rows and columns) and position embeddings. Window-based inner
    presses (SnapKV) therefore score each chunk with the queries of that chunk's last ``window_size`` tokens, keep
    that window whole, and require every chunk, the last one included, to hold at least ``window_size`` tokens.

    Args:
        press: the scorer ranking each chunk's tokens; it must use ``compression_ratio`` (not ``target_size``).
        chunk_length: tokens per chunk, a positive int.
    """

    chunk_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.chunk_length, bool) or not isinstance(self.chunk_length, int) or self.chunk_length < 1:
            raise ValueError(f"chunk_length must be a positive int (tokens per chunk), got {self.chunk_length!r}")
        if self.press.target_size is not None:
            raise ValueError(
                "ChunkPress budgets each chunk by a fraction: the inner press must set compression_ratio, "
                f"not target_size (got target_size={self.press.target_size})"
            )

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        """``(start, end)`` of each chunk of an ``n_tokens`` context."""
        return [(s, min(s + self.chunk_length, n_tokens)) for s in range(0, n_tokens, self.chunk_length)]

    def check_length(self, n_tokens: int) -> None:
        for length in {end - start for start, end in self.chunks(n_tokens)}:
            self.press.check_length(length)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, _ = keys.shape
        pieces = []
        scores = keys.new_full((b, h, n), float("nan"), dtype=torch.float32)  # NaN: a chunk kept or dropped unscored
        for start, end in self.chunks(n):
            length = end - start
            k = self.press.n_kept(length, module)
            if k >= length:
                pieces.append(torch.arange(start, end, device=keys.device).expand(b, h, length))
                continue
            if k == 0:
                continue
            chunk_kwargs = dict(kwargs)
            if "position_embeddings" in kwargs:
                cos, sin = kwargs["position_embeddings"]
                chunk_kwargs["position_embeddings"] = (cos[:, start:end], sin[:, start:end])
            chunk_attentions = attentions[..., start:end, start:end] if attentions is not None else None
            indices, chunk_scores = self.top_indices(
                module,
                hidden_states[:, start:end],
                keys[:, :, start:end],
                values[:, :, start:end],
                chunk_attentions,
                chunk_kwargs,
                k,
            )
            pieces.append(indices + start)
            scores[..., start:end] = chunk_scores.float()
        if not pieces:  # every chunk keeps round(len * (1 - r)) = 0 tokens
            return keep_tokens(keys, values, keys.new_zeros((b, h, 0), dtype=torch.long), scores)
        indices = torch.cat(pieces, dim=-1)
        if indices.shape[-1] == n:
            return keys, values
        return keep_tokens(keys, values, indices, scores)
