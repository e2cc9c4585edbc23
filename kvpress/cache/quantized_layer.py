"""`QuantizedVarlenLayer`: a ragged (per-head length) layer whose context is stored as packed low-bit groups."""

from __future__ import annotations

import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_storage import make_storage, positions_of
from kvpress.cache.varlen_layer import VarlenLayer, VarlenView


class QuantizedVarlenLayer(VarlenLayer):
    """Head-variable storage of one layer with the context quantized (KIVI layout: keys per channel, values per token).

    Dense during prefill, as :class:`VarlenLayer`. When a press compresses the layer (:meth:`replace`), or when a
    later forward reaches it still dense, its tokens are encoded by the layer's ``storage``
    (:mod:`kvpress.cache.quantized_storage`): plain KIVI groups (:class:`~kvpress_kernels.QuantizedSegments`,
    ``bits``-bit codes, one scale and zero per group of ``group_size``), or the same groups with KVQuant's or GEAR's
    corrections (:class:`~kvpress_kernels.DecomposedSegments`). A uniform press gives every head the same length; a
    head-variable one (AdaKV) different ones: the layout is the same.

    Tokens added afterwards go to the full-precision tail exactly as in :class:`VarlenLayer` (appended in place). At
    the start of an ``update``, once every sequence's tail holds at least ``residual_length`` tokens, the oldest
    complete groups of the tail are quantized and appended to the segments, and the rest of the tail moves to its
    front. This is skipped while a CUDA graph is captured: replays only grow the tail, the next eager update flushes.

    Extra state (compressed layer): ``store`` (the quantized context and flushed groups; ``segs`` is its code part),
    ``seg_lens`` ``(batch, kv_heads)`` cpu long valid quantized tokens per head, ``tail_spread`` (host int:
    ``tail_len`` minus the shortest sequence's tail, so the flush test needs no device sync), and for storages that
    need positions (pre-RoPE keys, sink tokens) ``tail_start`` ``(batch,)`` cpu long: the position of each
    sequence's first tail token. Positions assume the keys stay where the prefill put them (not re-rotated).
    """

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128, storage=None, **kwargs):
        self.quantization = QuantizationConfig.coerce(
            {"bits": bits, "group_size": group_size, "residual_length": residual_length}, "QuantizedVarlenLayer"
        )
        super().__init__(**kwargs)
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.storage = storage if storage is not None else make_storage(self.quantization, 0)
        if (self.storage.bits, self.storage.group_size) != (bits, group_size):
            raise ValueError(f"storage has bits={self.storage.bits}, group_size={self.storage.group_size}; the layer "
                             f"takes bits={bits}, group_size={group_size}")  # fmt: skip
        self.store = None
        self.tail_start: torch.Tensor | None = None
        self.tail_spread = 0

    @property
    def segs(self):
        """The quantized codes, scales and layout of the context (of ``store``), or None before compression."""
        return None if self.store is None else self.storage.codes(self.store)

    # ---- compaction ------------------------------------------------------------------------------------------
    def replace(self, kv: CompressedKV) -> None:
        """Quantize the kept tokens of ``kv`` (``lengths[b, h]`` valid rows per head) into ragged segments."""
        if kv.key_channels is not None:
            raise ValueError(
                "a quantized cache layer stores whole keys; channel-pruned keys (e.g. ThinKPress) cannot be quantized: "
                "drop the quantization or use a press that keeps every key channel"
            )
        self.quantization.check_head_dim(kv.keys.shape[-1])
        n_dense = self.keys.shape[-2] if self.keys is not None else kv.keys.shape[-2]  # the prefill's length
        positions = None
        if self.storage.needs_positions:
            positions = positions_of(kv.lengths, kv.indices, n_dense)
            if positions is None:
                raise ValueError(
                    "this quantized storage (pre-RoPE keys or sink tokens) needs the positions of the kept tokens, "
                    "and the press did not report them (CompressedKV.indices); use a press that does, or "
                    "pre_rope=False with sink_tokens=0"
                )
        seg_k, seg_v, seg_lens, d = self.pack_rows(kv)
        self.adopt(seg_k, seg_v, seg_lens, d, positions=positions, tail_start=n_dense)

    def adopt(self, seg_k: torch.Tensor, seg_v: torch.Tensor, seg_lens: torch.Tensor, head_dim: int,
              positions: torch.Tensor | None = None, tail_start: int | None = None) -> None:  # fmt: skip
        """Quantize ragged rows: ``seg_k, seg_v`` ``(N, head_dim)`` for ``seg_lens`` ``(batch, kv_heads)``.

        ``positions`` ``(N,)``: each row's position (needed by storages with pre-RoPE keys or sinks; default: each
        segment's rows at ``0, 1, ...``); ``tail_start``: position of the first token appended later (default: the
        longest segment)."""
        if int(seg_lens.sum()) != seg_k.shape[0] or seg_v.shape[0] != seg_k.shape[0]:
            raise ValueError(f"seg_lens sum to {int(seg_lens.sum())} rows but seg_k has {seg_k.shape[0]}")
        self.quantization.check_head_dim(head_dim)
        flat = seg_lens.reshape(-1).to(seg_k.device, torch.long)
        if self.storage.needs_positions and positions is None:
            positions = torch.cat([torch.arange(int(n)) for n in flat.tolist()] + [torch.zeros(0, dtype=torch.long)])
        if positions is not None:
            positions = positions.to(seg_k.device)
        store = self.storage.encode(seg_k, seg_v, flat, positions)
        start = tail_start if tail_start is not None else int(seg_lens.max()) if seg_lens.numel() else 0
        self.adopt_quantized(store, seg_lens, torch.full((seg_lens.shape[0],), start, dtype=torch.long))

    def adopt_quantized(self, store, seg_lens: torch.Tensor, tail_start: torch.Tensor | None = None) -> None:
        """Take quantized storage as is; ``seg_lens`` ``(batch, kv_heads)``: valid tokens of each segment;
        ``tail_start`` ``(batch,)``: position of each sequence's next token (storages that track positions)."""
        b, h = seg_lens.shape
        segs = self.storage.codes(store)
        if segs.cu_groups.shape[0] != b * h + 1:
            raise ValueError(f"segs holds {segs.cu_groups.shape[0] - 1} segments, seg_lens {b * h}")
        if (segs.bits, segs.group_size) != (self.bits, self.group_size):
            raise ValueError(
                f"segs has bits={segs.bits}, group_size={segs.group_size}; this layer takes bits={self.bits}, "
                f"group_size={self.group_size}"
            )
        device, d = segs.k_packed.device, segs.head_dim
        self.store = store
        self.seg_lens = seg_lens.to("cpu", torch.long)
        self.tail_start = None if tail_start is None else tail_start.to("cpu", torch.long)
        self.seg_k = self.seg_v = self.cu_seqlens = None  # full-precision context storage of VarlenLayer: unused
        self.dtype, self.device = segs.dtype, device
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        self.tail_k = torch.zeros(b, h, 0, d, dtype=segs.dtype, device=device)
        self.tail_v = torch.zeros(b, h, 0, d, dtype=segs.dtype, device=device)
        self.tail_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.tail_len = self.tail_spread = 0
        self.keys = self.values = None
        self.is_initialized = self.ragged = True

    # ---- transformers layer API -------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.ragged:
            if not (self.is_initialized and self.keys is not None and self.keys.numel()):
                return super().update(key_states, value_states, *args, **kwargs)  # prefill: dense
            # A forward after an uncompressed prefill: store that context quantized before appending to the tail.
            self.replace(CompressedKV(self.keys, self.values))
        elif not _capturing(self.tail_k):
            self.flush()
        q_lens = kwargs.get("new_token_lengths")
        super().update(key_states, value_states, *args, **kwargs)
        if q_lens is not None:  # right-padded new tokens: sequences' tails now differ
            self.tail_spread = self.tail_len - int(self.tail_lens.min())
        view = QuantizedView(self, q_lens)
        return view, view

    def flush(self) -> int:
        """Quantize the tail's oldest complete groups if every sequence's tail holds ``residual_length`` tokens.

        Returns the tokens moved per sequence (a multiple of ``group_size``; 0 when nothing was due).
        """
        if not self.ragged:
            return 0
        ready = self.tail_len - self.tail_spread  # tail tokens every sequence holds
        if ready < self.residual_length:
            return 0
        n = ready // self.group_size * self.group_size
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        new_k = self.tail_k[:, :, :n].reshape(b * h, n, d)
        new_v = self.tail_v[:, :, :n].reshape(b * h, n, d)
        positions = None
        if self.storage.needs_positions:
            positions = (self.tail_start[:, None] + torch.arange(n)).repeat_interleave(h, 0).to(new_k.device)
            self.tail_start = self.tail_start + n  # a new tensor: snapshots keep the old one
        # A new storage object: snapshots keep referring to the old one, which is never written.
        self.store = self.storage.append(self.store, new_k, new_v, positions)
        rest = self.tail_len - n
        # In place (same buffer): captured graphs and snapshots hold this tensor; clone as the ranges overlap.
        self.tail_k[:, :, :rest] = self.tail_k[:, :, n : self.tail_len].clone()
        self.tail_v[:, :, :rest] = self.tail_v[:, :, n : self.tail_len].clone()
        self.tail_lens.sub_(n)
        self.tail_len = rest
        self.seg_lens = self.seg_lens + n
        return n

    def memory_bytes(self) -> int:
        """Bytes allocated: every tensor of the quantized storage (codes, scales, zeros, int32 metadata and any
        levels, outliers, low-rank factors and positions), tail capacity, tail lengths."""
        if not self.ragged:
            return super().memory_bytes()
        tensors = (self.tail_k, self.tail_v, self.tail_lens)
        return self.store.nbytes() + sum(t.numel() * t.element_size() for t in tensors)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens; only full-precision tail tokens can be removed."""
        if not self.ragged:
            return super().crop(tokens_to_remove)
        if tokens_to_remove > 0 or -tokens_to_remove > self.tail_len:
            raise ValueError(
                f"crop removes tokens of the full-precision tail only: a negative count of at most {self.tail_len} "
                f"(quantized groups cannot be cropped), got {tokens_to_remove}"
            )
        shortest = self.tail_len - self.tail_spread
        super().crop(tokens_to_remove)
        self.tail_spread = self.tail_len - max(shortest + tokens_to_remove, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.ragged:
            return super().batch_select_indices(indices)
        indices = torch.as_tensor(indices, device="cpu", dtype=torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.batch_size):
            raise ValueError(f"batch indices must be in [0, {self.batch_size}), got {indices.tolist()}")
        segments = (indices[:, None] * self.num_heads + torch.arange(self.num_heads)).flatten()
        self.store = self.storage.select(self.store, segments)
        self.seg_lens = self.seg_lens[indices]
        if self.tail_start is not None:
            self.tail_start = self.tail_start[indices]
        dev_idx = indices.to(self.tail_k.device)
        self.tail_k, self.tail_v = self.tail_k[dev_idx], self.tail_v[dev_idx]
        self.tail_lens = self.tail_lens[dev_idx]
        self.batch_size = len(indices)
        self.tail_spread = self.tail_len - int(self.tail_lens.min()) if len(indices) else 0


class QuantizedView(VarlenView):
    """What :meth:`QuantizedVarlenLayer.update` hands to the attention function."""

    def attend(self, query: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None):
        """``query`` ``(batch, heads, q_len, head_dim)`` -> ``(batch, q_len, heads, head_dim)``."""
        if sliding_window:
            raise ValueError("QuantizedVarlenLayer holds full-attention layers only; sliding-window layers stay dense")
        layer = self.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = layer.storage.attend(query, layer.store, layer.tail_k, layer.tail_v, layer.tail_lens, scale, self.q_lens)
        return out.transpose(1, 2).contiguous()


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()
