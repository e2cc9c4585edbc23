"""`ChannelPrunedLayer`: a cache layer that really stores context keys with some channels removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from kvpress.cache.attention import causal_suffix_mask
from kvpress.cache.compressed_kv import CompressedKV


@dataclass(frozen=True)
class ChannelPrunedView:
    """The tensors of a :class:`ChannelPrunedLayer` after an ``update``, handed to the ``"kvpress"`` attention function.

    Attributes:
        pruned_keys: ``(batch, kv_heads, n_ctx, d_kept)`` context keys, kept channels only.
        key_channels: ``(batch, kv_heads, d_kept)`` int64 channel indices of ``pruned_keys``.
        keys: ``(batch, kv_heads, t, head_dim)`` full-width keys that follow the context.
        values: ``(batch, kv_heads, n_ctx + t, head_dim)``.
    """

    pruned_keys: torch.Tensor
    key_channels: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    def attend(self, query: torch.Tensor, scaling: float | None, sliding_window: int | None = None) -> torch.Tensor:
        """Attention of ``query`` ``(batch, heads, q_len, head_dim)`` over the layer: ``(batch, q_len, heads, head_dim)``.

        The ``q_len`` queries are the last ``q_len`` cached tokens: causal among themselves, every earlier token
        visible (within ``sliding_window`` if given). Query head ``h`` reads kv head ``h // group``. Logits against the
        pruned context use only the query's channels that the kv head kept, which equals a dense product with the
        dropped channels of the keys set to zero. Logits are softmaxed once over both parts, in float32.
        """
        b, n_q, q_len, d = query.shape
        n_kv = self.values.shape[1]
        if n_q % n_kv:
            raise ValueError(f"query heads ({n_q}) must be a multiple of the cached kv heads ({n_kv})")
        if scaling is None:
            scaling = d**-0.5
        group = n_q // n_kv
        # Fold each kv head's group of query heads into the rows, so every key tensor is read once per kv head.
        q = query.reshape(b, n_kv, group * q_len, d)
        d_kept = self.key_channels.shape[-1]
        q_kept = q.gather(-1, self.key_channels[:, :, None, :].expand(b, n_kv, group * q_len, d_kept))
        logits = torch.cat([q_kept @ self.pruned_keys.transpose(-1, -2), q @ self.keys.transpose(-1, -2)], dim=-1)
        # At least float32 for the softmax (half-precision caches), never less precise than the inputs.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).mul_(scaling)
        logits = logits.view(b, n_kv, group, q_len, -1)
        mask = causal_suffix_mask(q_len, logits.shape[-1], query.device, sliding_window)
        if mask is not None:
            logits.masked_fill_(~mask, float("-inf"))
        probs = logits.softmax(dim=-1).to(self.values.dtype).view(b, n_kv, group * q_len, -1)
        out = (probs @ self.values).view(b, n_q, q_len, d)
        return out.transpose(1, 2).contiguous()

    def __getattr__(self, name: str):
        # Only reached for attributes the view lacks: attention functions that expect dense key tensors.
        raise AttributeError(
            f"channel-pruned cache layers have no dense {name!r}; they are read through the 'kvpress' attention "
            "function: run the model inside kvpress.cache.attention.compressed_attention(model)"
        )


class ChannelPrunedLayer(DynamicLayer):
    """A full-attention cache layer whose context keys keep only some channels per (sequence, kv-head).

    Storage (all tensors batch-first, ``n_ctx`` context tokens stored pruned, ``t`` tokens stored full-width):

    - ``pruned_keys``: ``(batch, kv_heads, n_ctx, d_kept)`` post-RoPE context keys, kept channels only;
    - ``key_channels``: ``(batch, kv_heads, d_kept)`` int64 indices of those channels;
    - ``keys``: ``(batch, kv_heads, t, head_dim)`` full-width keys of the recent window and of every token added by
      :meth:`update` (grows by concatenation);
    - ``values``: ``(batch, kv_heads, n_ctx + t, head_dim)``.

    :meth:`update` returns a :class:`ChannelPrunedView` (as key and value) that the ``"kvpress"`` attention function
    reads through its ``attend`` method.
    """

    def __init__(
        self,
        pruned_keys: torch.Tensor,
        key_channels: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ):
        super().__init__()
        b, h, n_ctx, d_kept = pruned_keys.shape
        d = values.shape[-1]
        if key_channels.shape != (b, h, d_kept):
            raise ValueError(f"key_channels must have shape {(b, h, d_kept)}, got {tuple(key_channels.shape)}")
        if keys.shape[:2] != (b, h) or keys.shape[-1] != d:
            raise ValueError(f"keys must have shape {(b, h, 't', d)}, got {tuple(keys.shape)}")
        if values.shape != (b, h, n_ctx + keys.shape[-2], d):
            raise ValueError(
                f"values must have shape {(b, h, n_ctx + keys.shape[-2], d)} (context + full-width tokens), "
                f"got {tuple(values.shape)}"
            )
        # Own copies: slices of the prefill tensors would otherwise keep the whole dense prefill alive.
        self.pruned_keys = pruned_keys.clone()
        self.key_channels = key_channels.to(torch.long).clone()
        self.keys = keys.clone()
        self.values = values.contiguous()
        self.dtype, self.device = values.dtype, values.device
        self.is_initialized = True

    @classmethod
    def from_compressed(cls, kv: CompressedKV) -> ChannelPrunedLayer:
        """Build the layer from a press's hand-off (``kv.key_channels`` set; ``kv.full_width_keys`` optional)."""
        if kv.key_channels is None:
            raise ValueError("a ChannelPrunedLayer needs CompressedKV.key_channels (the kept key channels)")
        full = kv.full_width_keys
        if full is None:
            full = kv.values.new_empty(*kv.values.shape[:2], 0, kv.values.shape[-1])
        return cls(kv.keys, kv.key_channels, full.to(kv.values.dtype), kv.values)

    # ---- growth and attention -----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(batch, kv_heads, q_len, head_dim)`` keys/values full-width; returns ``(view, view)``."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        view = self.view()
        return view, view

    def view(self) -> ChannelPrunedView:
        """The current tensors, for :meth:`ChannelPrunedView.attend`."""
        return ChannelPrunedView(self.pruned_keys, self.key_channels, self.keys, self.values)

    # ---- lengths --------------------------------------------------------------------------------------------------
    @property
    def n_pruned(self) -> int:
        """Number of tokens stored with pruned keys."""
        return self.pruned_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.values.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    # ---- inspection -----------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of every tensor the layer holds (pruned keys, channel indices, full-width keys, values)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def dense_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(batch, kv_heads, n_ctx + t, head_dim)`` keys (dropped channels are zero) and the values."""
        b, h, n_ctx, d_kept = self.pruned_keys.shape
        dense = self.pruned_keys.new_zeros(b, h, n_ctx, self.values.shape[-1])
        dense.scatter_(-1, self.key_channels[:, :, None, :].expand(b, h, n_ctx, d_kept), self.pruned_keys)
        return torch.cat([dense, self.keys], dim=-2), self.values

    # ---- state ----------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "pruned_keys": self.pruned_keys,
            "key_channels": self.key_channels,
            "keys": self.keys,
            "values": self.values,
        }

    def _map(self, fn) -> None:
        """Apply ``fn`` to every stored tensor (all are batch-first)."""
        for name, tensor in self._tensors().items():
            setattr(self, name, fn(tensor))

    def snapshot(self) -> dict[str, torch.Tensor]:
        """References to the current tensors (they are replaced, never written in place, so sharing is safe)."""
        return self._tensors()

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Return to a state captured by :meth:`snapshot`."""
        for name, tensor in state.items():
            setattr(self, name, tensor)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as for dense layers)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove from the end, got {tokens_to_remove}")
        seq = self.get_seq_length()
        remove = min(-tokens_to_remove, seq)
        if remove == 0:
            return
        # The newest tokens are the full-width ones; only what is left to remove comes out of the pruned context.
        from_full = min(remove, self.keys.shape[-2])
        self.keys = self.keys[..., : self.keys.shape[-2] - from_full, :]
        self.pruned_keys = self.pruned_keys[..., : self.n_pruned - (remove - from_full), :]
        self.values = self.values[..., : seq - remove, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        """Drop every token (the layer then holds an empty context)."""
        self.crop(-self.get_seq_length())

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Built from compressed tensors, so always initialized; nothing is deferred.
        return None
