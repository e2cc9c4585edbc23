"""`ThinKPress`: prune the least important key channels of the context, storing the narrower keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_fits_context, check_ratio
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET
from kvpress.utils import group_reduce, num_heads, query_states


@dataclass
class ThinKPress(BasePress):
    """Drop the key channels that the last queries use least; every token is kept (Xu et al., ICLR 2025, "ThinK:
    Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018).

    Per (sequence, kv-head), channel ``c`` scores ``mean_w(q_c²) · mean_n(k_c²)``: the mean over the last
    ``window_size`` queries (recomputed from the layer input, averaged over the kv head's query group) times the mean
    over every context key. The ``head_dim − floor(head_dim · key_channel_compression_ratio)`` best channels are kept,
    in ascending order. The last ``window_size`` context tokens keep full-width keys, as do all tokens added later;
    values are untouched. The cache really stores the narrower keys (a ``ChannelPrunedLayer``), read by the
    ``"kvpress"`` attention function, which decoding uses after compression.

    Args:
        key_channel_compression_ratio: fraction of key channels removed, in ``[0, 1)``.
        window_size: number of final prompt tokens whose queries score the channels and whose keys stay full-width.
    """

    key_channel_compression_ratio: float = 0.0
    window_size: int = 32

    def __post_init__(self):
        check_ratio(self.key_channel_compression_ratio, "key_channel_compression_ratio")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(
                f"window_size must be a positive int (number of final prompt tokens), got {self.window_size!r}"
            )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(prunes_channels=True, chunked_prefill=True)

    def check_length(self, n_tokens: int) -> None:
        check_fits_context("window_size", self.window_size, n_tokens)

    def n_channels_kept(self, head_dim: int) -> int:
        """Key channels kept out of ``head_dim``: ``head_dim − floor(head_dim · ratio)``."""
        # Rounding first absorbs float error, e.g. 100 * 0.29 = 28.999999999999996 must drop 29 channels.
        return head_dim - math.floor(round(head_dim * self.key_channel_compression_ratio, 9))

    def channel_scores(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """Channel importance ``(batch, kv_heads, head_dim)``, float32.

        Args:
            hidden_states: ``(batch, n_prompt, hidden)`` layer input; its last ``window_size`` rows give the queries.
            keys: ``(batch, kv_heads, n, head_dim)`` post-RoPE context keys.
        """
        queries = query_states(module, hidden_states[:, -self.window_size :], kwargs["position_embeddings"])
        q_energy = group_reduce(queries.float().pow(2).mean(dim=2), num_heads(module)[1])  # (B, Hkv, d)
        k_energy = keys.float().pow(2).mean(dim=2)  # (B, Hkv, d)
        return q_energy * k_energy

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        chunk = kwargs.get(CHUNK_BUDGET)
        if chunk is not None and not chunk.last:
            return None  # chunked prefill: the channels are chosen once, from the whole context, after its last chunk
        b, h, n, d = keys.shape
        d_kept = self.n_channels_kept(d)
        if d_kept == d:
            return keys, values
        scores = self.channel_scores(module, hidden_states, keys, kwargs)
        channels = scores.topk(d_kept, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, d_kept)
        # Keys are kept in their order, so the recent window is the last tokens the press received.
        n_pruned = max(n - self.window_size, 0)
        pruned = keys[:, :, :n_pruned].gather(-1, channels[:, :, None, :].expand(b, h, n_pruned, d_kept))
        return CompressedKV(pruned, values, key_channels=channels, full_width_keys=keys[:, :, n_pruned:])
