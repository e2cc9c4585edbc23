"""How a quantized layer encodes, extends, reshapes and attends over its context: one class per storage format.

`KiviStorage` keeps plain KIVI groups (`QuantizedSegments`). `DecomposedStorage` keeps the same groups with the
corrections of KVQuant or GEAR (`DecomposedSegments`). A `QuantizedVarlenLayer` holds one of them and calls it for
everything format-specific, so the layer's bookkeeping (tail, flushes, batches, snapshots) is written once.
"""

from __future__ import annotations

import torch

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress_kernels import (
    DecomposedSegments,
    QuantizedSegments,
    RotaryTable,
    append_decomposed_groups,
    append_segment_groups,
    decompose_segments,
    decomposed_attention,
    quantize_segments,
    quantized_varlen_attention,
)
from kvpress_kernels.decomposed_segments import concat_decomposed, select_decomposed
from kvpress_kernels.quantization import BITS as KIVI_BITS
from kvpress_kernels.quantized_segments import concat_segments, select_segments


class KiviStorage:
    """Uniform asymmetric groups: keys per channel, values per token."""

    needs_positions = False

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def encode(self, seg_k, seg_v, seg_lens, positions=None) -> QuantizedSegments:
        """``seg_k, seg_v`` ``(N, D)`` rows of ``seg_lens`` ``(S,)`` segments -> storage."""
        return quantize_segments(seg_k, seg_v, seg_lens, self.bits, self.group_size)

    def append(self, store, new_k, new_v, positions=None) -> QuantizedSegments:
        """``new_k, new_v`` ``(S, n * G, D)`` whole groups appended to each segment."""
        return append_segment_groups(store, new_k, new_v)

    def attend(self, query, store, tail_k, tail_v, tail_lens, scale, q_lens):
        return quantized_varlen_attention(query, store, tail_k, tail_v, tail_lens, scale, q_lens, check=False)

    @staticmethod
    def codes(store) -> QuantizedSegments:
        return store

    select = staticmethod(select_segments)
    concat = staticmethod(concat_segments)


class DecomposedStorage:
    """KIVI groups with KVQuant's or GEAR's corrections (see :class:`QuantizationConfig`).

    Level tables fitted on the prompt (``levels="prompt"``) are fitted once per call to :meth:`encode` (one layer of
    one prefill) and kept by the storage, so later flushes reuse them.
    """

    def __init__(self, bits: int, group_size: int, config: QuantizationConfig, rope: RotaryTable | None = None):
        self.bits, self.group_size = bits, group_size
        self.outlier_ratio = config.outlier_ratio or 0.0
        self.rank = config.rank or 0
        self.sink_tokens = config.sink_tokens or 0
        self.calibrate = config.levels == "prompt"
        self.rope = rope if config.pre_rope else None
        if config.pre_rope and rope is None:
            raise ValueError(
                "pre_rope=True stores keys before RoPE and needs the model's rotary table: build the cache with "
                "QuantizedCache(config=model.config, quantization=..., rope=kvpress.cache.rotary_table(model)) "
                "(the pipeline does this), or pass pre_rope=False"
            )
        self.needs_positions = self.rope is not None or self.sink_tokens > 0

    def _positions(self, positions):
        return positions if self.rope is not None else None

    def encode(self, seg_k, seg_v, seg_lens, positions=None) -> DecomposedSegments:
        if self.needs_positions and positions is None:
            raise ValueError("this storage needs each token's position (pre-RoPE keys or sink tokens)")
        exact = None if not self.sink_tokens else positions < self.sink_tokens
        levels = {"k_levels": "fit", "v_levels": "fit"} if self.calibrate else {}
        return decompose_segments(
            seg_k, seg_v, seg_lens, self.bits, self.group_size, outlier_ratio=self.outlier_ratio, exact_rows=exact,
            rank=self.rank, positions=self._positions(positions), rope=self.rope, **levels,
        )  # fmt: skip

    def append(self, store, new_k, new_v, positions=None) -> DecomposedSegments:
        return append_decomposed_groups(store, new_k, new_v, outlier_ratio=self.outlier_ratio,
                                        positions=self._positions(positions), rope=self.rope)  # fmt: skip

    def attend(self, query, store, tail_k, tail_v, tail_lens, scale, q_lens):
        return decomposed_attention(query, store, tail_k, tail_v, tail_lens, scale, q_lens, self.rope, check=False)

    @staticmethod
    def codes(store) -> QuantizedSegments:
        return store.segs

    select = staticmethod(select_decomposed)
    concat = staticmethod(concat_decomposed)


def make_storage(config: QuantizationConfig, layer_idx: int, rope: RotaryTable | None = None):
    """The storage of layer ``layer_idx`` under ``config`` (3-bit KIVI groups: the decomposed storage without
    corrections, whose kernel reads codes of any width)."""
    bits = config.bits_for(layer_idx)
    if config.decomposed or bits not in KIVI_BITS:
        return DecomposedStorage(bits, config.group_size, config, rope)
    return KiviStorage(bits, config.group_size)


def positions_of(lengths: torch.Tensor, indices: torch.Tensor | None, n_dense: int) -> torch.Tensor | None:
    """Positions of the rows a layer keeps, flattened in storage order (sequence, head, row): ``indices``
    ``(batch, heads, n)`` restricted to ``lengths`` ``(batch, heads)``, or ``0 .. n - 1`` when every one of the
    ``n_dense`` prefill tokens is kept. None when a press dropped tokens without saying which."""
    b, h = lengths.shape
    if indices is None:
        if bool((lengths == n_dense).all()):
            return torch.arange(n_dense).repeat(b * h)
        return None
    n = indices.shape[-1]
    mask = torch.arange(n, device=indices.device) < lengths.to(indices.device)[..., None]
    return indices[mask].long()
