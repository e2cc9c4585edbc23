"""`VarlenLayer`: one attention layer whose compressed context holds a different length per (sequence, kv-head)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvpress.cache.compressed_kv import CompressedKV
from kvpress_kernels import append_tail, compact_segments, varlen_attention

_MIN_TAIL = 16
_SAVED_TAIL = "_snapshot_tail_rows"  # snapshot key of the tail rows valid when it was taken


class VarlenLayer(DynamicLayer):
    """Head-variable storage of one layer.

    Until a press compresses it, the layer behaves as a dense transformers ``DynamicLayer`` (the prefill runs with
    the model's own attention). :meth:`replace` then moves the kept tokens into ragged storage:

    - ``seg_k, seg_v``: ``(N, head_dim)`` rows, segment ``s = b * kv_heads + h`` at rows ``cu_seqlens[s]:cu_seqlens[s+1]``;
    - ``tail_k, tail_v``: ``(batch, kv_heads, capacity, head_dim)`` tokens added afterwards (questions, decoding),
      the same number for every head of a sequence; ``tail_lens`` ``(batch,)`` int32.

    Appending writes into the tail in place; the tail's capacity doubles when full, so a token costs amortized O(1)
    and the ragged context is never copied. ``update`` then returns a view whose ``attend`` runs the variable-length
    attention kernel (``"kvpress"`` attention function).

    A decode step can be captured in a CUDA graph (:class:`~kvpress.generation.graph_decoder.GraphDecoder`): with the tail
    capacity reserved beforehand, a step allocates nothing new, launches kernels whose grids depend on shapes only,
    and advances ``tail_lens`` in place, so every replay reads the lengths the previous replay wrote. Replays run no
    Python: the host mirror ``tail_len`` is then brought up to date with :meth:`advance_host_tail`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ragged = False

    # ---- compaction ------------------------------------------------------------------------------------------
    def replace(self, kv: CompressedKV) -> None:
        """Store the kept tokens of ``kv`` (``lengths[b, h]`` valid rows per head) as ragged segments."""
        self.adopt(*self.pack_rows(kv))

    def pack_rows(self, kv: CompressedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The kept rows of ``kv`` back to back: ``(seg_k, seg_v, seg_lens, head_dim)`` as :meth:`adopt` takes them."""
        if kv.key_channels is not None:
            raise ValueError("VarlenLayer stores whole keys; channel-pruned keys need a ChannelPrunedLayer")
        keys, values = kv.keys, kv.values
        b, h, k, d = keys.shape
        lengths = kv.lengths.to(keys.device)
        if lengths.shape != (b, h) or bool((lengths < 0).any()) or bool((lengths > k).any()):
            raise ValueError(f"lengths must have shape {(b, h)} with entries in [0, {k}], got {tuple(lengths.shape)}")
        order = torch.arange(k, device=keys.device).expand(b, h, k)
        seg_k, _ = compact_segments(keys, order, lengths)
        seg_v, _ = compact_segments(values, order, lengths)
        return seg_k, seg_v, lengths.to("cpu", torch.long), d

    def adopt(self, seg_k: torch.Tensor, seg_v: torch.Tensor, seg_lens: torch.Tensor, head_dim: int) -> None:
        """Take ragged storage as is: ``seg_k, seg_v`` ``(N, head_dim)`` rows for ``seg_lens`` ``(batch, kv_heads)``."""
        b, h = seg_lens.shape
        if int(seg_lens.sum()) != seg_k.shape[0] or seg_v.shape[0] != seg_k.shape[0]:
            raise ValueError(f"seg_lens sum to {int(seg_lens.sum())} rows but seg_k has {seg_k.shape[0]}")
        self.seg_k, self.seg_v = seg_k, seg_v
        self.seg_lens = seg_lens.to("cpu", torch.long)
        self.cu_seqlens = _prefix_sums(self.seg_lens).to(seg_k.device)
        self.dtype, self.device = seg_k.dtype, seg_k.device
        self.batch_size, self.num_heads, self.head_dim = b, h, head_dim
        self.tail_k = seg_k.new_empty(b, h, 0, head_dim)
        self.tail_v = seg_v.new_empty(b, h, 0, seg_v.shape[-1])
        self.tail_lens = torch.zeros(b, dtype=torch.int32, device=seg_k.device)
        self.tail_len = 0  # host mirror of max(tail_lens): no device sync on the decode path
        self.keys = self.values = None
        self.is_initialized = self.ragged = True

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tail tokens per sequence (one allocation instead of several doublings)."""
        if self.ragged:
            self._grow(self.tail_len + n_tokens)

    def _grow(self, needed: int) -> None:
        capacity = self.tail_k.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, _MIN_TAIL)
        # Zeroed rather than empty: unused slots must never hold NaN bit patterns that a masked matmul could spread.
        grown_k = self.tail_k.new_zeros(*self.tail_k.shape[:2], new_capacity, self.tail_k.shape[-1])
        grown_v = self.tail_v.new_zeros(*self.tail_v.shape[:2], new_capacity, self.tail_v.shape[-1])
        grown_k[:, :, : self.tail_len] = self.tail_k[:, :, : self.tail_len]
        grown_v[:, :, : self.tail_len] = self.tail_v[:, :, : self.tail_len]
        self.tail_k, self.tail_v = grown_k, grown_v

    # ---- transformers layer API -------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.ragged:
            return super().update(key_states, value_states, *args, **kwargs)
        q_lens = kwargs.get("new_token_lengths")
        q = key_states.shape[2]
        self._grow(self.tail_len + q)
        new_lengths = append_tail(
            self.tail_k, self.tail_v, self.tail_lens, key_states, value_states, q_lens, check=False
        )
        # In place, not rebound: a captured CUDA graph keeps reading (and advancing) this very tensor.
        self.tail_lens.copy_(new_lengths)
        self.tail_len += q
        view = VarlenView(self, q_lens)
        return view, view

    def dense_keys_values(self):
        return (self.keys, self.values) if not self.ragged and self.is_initialized else (None, None)

    def padded_keys_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head's tokens (its context, then the tail) from position 0, zeros after, for re-compression:
        ``keys, values`` ``(batch, kv_heads, L, head_dim)`` with ``L`` the longest head, and ``lengths``
        ``(batch, kv_heads)`` long on the device. A copy of the layer's size (bounded by what it holds)."""
        if not self.ragged:
            raise ValueError("padded_keys_values reads a compressed (ragged) layer; this layer is still dense")
        b, h, device = self.batch_size, self.num_heads, self.seg_k.device
        seg_lens = self.seg_lens.to(device)
        tail = self.tail_lens.long()
        lengths = seg_lens + tail[:, None]
        longest = int(lengths.max()) if lengths.numel() else 0
        # Destination (head, slot) of every context row, then of every valid tail row: the same for keys and values.
        owner = torch.repeat_interleave(torch.arange(b * h, device=device), seg_lens.flatten())
        seg_slot = torch.arange(self.seg_k.shape[0], device=device) - self.cu_seqlens.long()[owner]
        t = torch.arange(self.tail_len, device=device)
        valid = (t < tail[:, None]).repeat_interleave(h, 0)  # (b * h, T)
        tail_slot = (seg_lens.reshape(-1, 1) + t)[valid]
        tail_head = torch.arange(b * h, device=device)[:, None].expand_as(valid)[valid]
        padded = []
        for seg, buf in ((self.seg_k, self.tail_k), (self.seg_v, self.tail_v)):
            out = seg.new_zeros(b * h, longest, seg.shape[-1])
            out[owner, seg_slot] = seg
            out[tail_head, tail_slot] = buf[:, :, : self.tail_len].reshape(b * h, self.tail_len, buf.shape[-1])[valid]
            padded.append(out.view(b, h, longest, -1))
        return padded[0], padded[1], lengths

    def advance_host_tail(self, n_tokens: int) -> None:
        """Add ``n_tokens`` (may be negative) to the host mirror ``tail_len`` only; the device tensors are untouched.

        For appends that ran on the device without this layer's Python: ``n`` replays of a captured decode step
        advanced ``tail_lens`` by ``n`` tokens per sequence, and the host mirror must follow.
        """
        if not self.ragged:
            raise ValueError("advance_host_tail needs a compressed (ragged) layer; this layer is still dense")
        new_len = self.tail_len + int(n_tokens)
        if not 0 <= new_len <= self.tail_k.shape[2]:
            raise ValueError(
                f"n_tokens must keep the tail length in [0, {self.tail_k.shape[2]}] (its capacity); "
                f"tail_len is {self.tail_len}, got n_tokens={n_tokens}"
            )
        self.tail_len = new_len

    def get_seq_length(self) -> int:
        if not self.ragged:
            return super().get_seq_length()
        return int(self.seg_lens.max()) + self.tail_len if self.seg_lens.numel() else self.tail_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def memory_bytes(self) -> int:
        """Bytes of storage allocated by the layer (tail capacity and int32 metadata included)."""
        if not self.ragged:
            tensors = [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]
        else:
            tensors = [self.seg_k, self.seg_v, self.cu_seqlens, self.tail_k, self.tail_v, self.tail_lens]
        return sum(t.numel() * t.element_size() for t in tensors)

    def snapshot(self) -> dict:
        state = dict(vars(self))
        if self.ragged:
            state["tail_lens"] = self.tail_lens.clone()  # appended to in place
            # The tail buffer stays shared with the live layer, and appends after a crop overwrite its valid rows in
            # place: keep a private copy of them (the tail only; the ragged context is never written).
            n = self.tail_len
            state[_SAVED_TAIL] = (self.tail_k[:, :, :n].clone(), self.tail_v[:, :, :n].clone())
        return state

    def restore(self, state: dict) -> None:
        vars(self).clear()
        vars(self).update({name: value for name, value in state.items() if name != _SAVED_TAIL})
        if self.ragged:
            self.tail_lens = state["tail_lens"].clone()
            rows_k, rows_v = state[_SAVED_TAIL]
            self.tail_k[:, :, : rows_k.shape[2]] = rows_k  # same buffer, rows as they were at the snapshot
            self.tail_v[:, :, : rows_v.shape[2]] = rows_v

    def crop(self, tokens_to_remove: int) -> None:
        if not self.ragged:
            return super().crop(tokens_to_remove)
        if tokens_to_remove > 0 or -tokens_to_remove > self.tail_len:
            raise ValueError(
                f"crop takes a negative count of at most {self.tail_len} tokens added after compression, "
                f"got {tokens_to_remove}"
            )
        self.tail_lens.copy_((self.tail_lens + tokens_to_remove).clamp_min(0))  # in place, as in update
        self.tail_len += tokens_to_remove

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.ragged:
            return super().batch_select_indices(indices)
        indices = torch.as_tensor(indices, device="cpu", dtype=torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.batch_size):
            raise ValueError(f"batch indices must be in [0, {self.batch_size}), got {indices.tolist()}")
        cu = self.cu_seqlens.to("cpu", torch.long)
        segments = (indices[:, None] * self.num_heads + torch.arange(self.num_heads)).flatten()
        rows = torch.cat(
            [torch.arange(cu[s], cu[s + 1]) for s in segments.tolist()] + [torch.zeros(0, dtype=torch.long)]
        )
        rows = rows.to(self.seg_k.device)
        self.seg_k, self.seg_v = self.seg_k[rows], self.seg_v[rows]
        self.seg_lens = self.seg_lens[indices]
        self.cu_seqlens = _prefix_sums(self.seg_lens).to(self.seg_k.device)
        dev_idx = indices.to(self.tail_k.device)
        self.tail_k, self.tail_v = self.tail_k[dev_idx], self.tail_v[dev_idx]
        self.tail_lens = self.tail_lens[dev_idx]
        self.batch_size = len(indices)


def _prefix_sums(lengths: torch.Tensor) -> torch.Tensor:
    """``(batch, heads)`` lengths -> ``(batch * heads + 1,)`` int32 prefix sums."""
    flat = lengths.reshape(-1).to(torch.long)
    return torch.cat([flat.new_zeros(1), flat.cumsum(0)]).to(torch.int32)


class VarlenView:
    """What :meth:`VarlenLayer.update` hands to the attention function: the layer plus this forward's query lengths."""

    def __init__(self, layer: VarlenLayer, q_lens: torch.Tensor | None):
        self.layer, self.q_lens = layer, q_lens

    @property
    def shape(self) -> tuple[int, int, int, int]:
        layer = self.layer
        return (layer.batch_size, layer.num_heads, layer.get_seq_length(), layer.head_dim)

    def attend(self, query: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None):
        """``query`` ``(batch, heads, q_len, head_dim)`` -> ``(batch, q_len, heads, head_dim)``."""
        if sliding_window:
            raise ValueError("VarlenLayer holds full-attention layers only; sliding-window layers stay dense")
        layer = self.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = varlen_attention(
            query,
            layer.seg_k,
            layer.seg_v,
            layer.cu_seqlens,
            layer.tail_k,
            layer.tail_v,
            layer.tail_lens,
            scale,
            self.q_lens,
            check=False,
        )
        return out.transpose(1, 2).contiguous()
