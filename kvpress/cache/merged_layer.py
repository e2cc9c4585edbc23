"""`MergedLayer`: one layer of a cross-layer merged pair (MiniCache): shared directions, own magnitudes, exact tail."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from kvpress_kernels import merged_attention


@dataclass
class MergedPair:
    """Storage the two layers of a pair share: unit directions ``(batch, kv_heads, n_merged, head_dim)`` of their keys
    and of their values, one per merged token."""

    dir_k: torch.Tensor
    dir_v: torch.Tensor

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dir_k, self.dir_v))


class MergedLayer(DynamicLayer):
    """A layer whose context is a :class:`MergedPair` scaled by this layer's own norms, plus exact tokens.

    - ``pair``: the shared directions; ``mag_k, mag_v`` ``(batch, kv_heads, n_merged)``: this layer's key and value
      norms of those tokens (its key ``j`` is ``mag_k[..., j] * pair.dir_k[..., j, :]``);
    - ``tail_k, tail_v`` ``(batch, kv_heads, t, head_dim)``: tokens stored exactly: those retained at merge time, then
      every token added afterwards (questions, decoding).

    Attention reads the shared directions through :func:`kvpress_kernels.merged_attention` (``"kvpress"`` attention
    function); no dense copy of the layer is built. The first layer of a pair (``owns_pair``) counts the shared
    storage in :meth:`memory_bytes`, so a cache's total counts it once. Tails grow by concatenation (new tensors),
    so a snapshot of the layer's attributes is enough to restore it.
    """

    def __init__(self, pair: MergedPair, mag_k, mag_v, tail_k, tail_v, owns_pair: bool):
        super().__init__()
        self.pair, self.mag_k, self.mag_v = pair, mag_k, mag_v
        self.tail_k, self.tail_v = tail_k, tail_v
        self.owns_pair = owns_pair
        self.dtype, self.device = tail_k.dtype, tail_k.device
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if kwargs.get("new_token_lengths") is not None:
            raise ValueError("a merged layer takes unpadded new tokens (one sequence at a time)")
        self.tail_k = torch.cat([self.tail_k, key_states.to(self.tail_k.dtype)], dim=2)
        self.tail_v = torch.cat([self.tail_v, value_states.to(self.tail_v.dtype)], dim=2)
        view = MergedView(self)
        return view, view

    def dense_keys_values(self):
        return None, None  # already compressed: presses leave it alone

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as dense ``(batch, kv_heads, n_merged + t, head_dim)`` (merged first), e.g. for
        tests and inspection; attention never builds them."""
        keys = self.pair.dir_k * self.mag_k[..., None].to(self.pair.dir_k.dtype)
        values = self.pair.dir_v * self.mag_v[..., None].to(self.pair.dir_v.dtype)
        return torch.cat([keys, self.tail_k], dim=2), torch.cat([values, self.tail_v], dim=2)

    def get_seq_length(self) -> int:
        return self.mag_k.shape[-1] + self.tail_k.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def memory_bytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.mag_k, self.mag_v, self.tail_k, self.tail_v))
        return own + (self.pair.memory_bytes() if self.owns_pair else 0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove >= 0 or -tokens_to_remove > self.tail_k.shape[2]:
            raise ValueError(
                f"crop takes a negative count of at most {self.tail_k.shape[2]} exactly stored tokens, got "
                f"{tokens_to_remove}"
            )
        self.tail_k, self.tail_v = self.tail_k[:, :, :tokens_to_remove], self.tail_v[:, :, :tokens_to_remove]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("merged layers hold one prompt's pair storage; select sequences before merging")


class MergedView:
    """What :meth:`MergedLayer.update` hands to the attention function."""

    def __init__(self, layer: MergedLayer):
        self.layer = layer

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.layer.tail_k.shape
        return (b, h, self.layer.get_seq_length(), d)

    def attend(self, query: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None):
        """``query`` ``(batch, heads, q_len, head_dim)`` -> ``(batch, q_len, heads, head_dim)``."""
        if sliding_window:
            raise ValueError("merged layers hold full-attention layers only; sliding-window layers stay dense")
        layer = self.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        t = layer.tail_k.shape[2]
        lens = torch.full((query.shape[0],), t, dtype=torch.int32, device=query.device)
        out = merged_attention(
            query, layer.pair.dir_k, layer.pair.dir_v, layer.mag_k, layer.mag_v, layer.tail_k, layer.tail_v, lens,
            scale, check=False,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous()


@dataclass
class MergedKV:
    """A merged layer pair as a press computes it (layer ``a`` the earlier, ``b`` the later of the two).

    ``dir_k, dir_v`` ``(batch, kv_heads, n_merged, head_dim)``: shared unit directions; ``mag_k_a, mag_k_b, mag_v_a,
    mag_v_b`` ``(batch, kv_heads, n_merged)``: each layer's norms; ``keys_a, values_a, keys_b, values_b``
    ``(batch, kv_heads, n_retained, head_dim)``: the tokens kept exactly in each layer.
    """

    dir_k: torch.Tensor
    dir_v: torch.Tensor
    mag_k_a: torch.Tensor
    mag_k_b: torch.Tensor
    mag_v_a: torch.Tensor
    mag_v_b: torch.Tensor
    keys_a: torch.Tensor
    values_a: torch.Tensor
    keys_b: torch.Tensor
    values_b: torch.Tensor

    def layers(self) -> tuple[MergedLayer, MergedLayer]:
        """The two cache layers, sharing one :class:`MergedPair`."""
        pair = MergedPair(self.dir_k, self.dir_v)
        return (
            MergedLayer(pair, self.mag_k_a, self.mag_v_a, self.keys_a, self.values_a, owns_pair=True),
            MergedLayer(pair, self.mag_k_b, self.mag_v_b, self.keys_b, self.values_b, owns_pair=False),
        )
