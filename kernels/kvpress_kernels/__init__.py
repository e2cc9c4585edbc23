"""Triton kernels (with plain-torch references) for the head-variable KV cache. Tensors only.

Storage of one attention layer (B sequences, Hkv kv heads, head dim D):

- Compressed context, ragged: segment s = b * Hkv + h holds the tokens kept for (sequence b, kv head h) as rows
  cu_seqlens[s]:cu_seqlens[s + 1] of flat ``seg_k, seg_v: (N, D)``; ``cu_seqlens: (B * Hkv + 1,) int32`` prefix
  sums of the segment lengths (tokens; a length may be 0).
- Tokens generated after compression (question, decode), the same count for every head of a sequence, in a dense
  tail ``tail_k, tail_v: (B, Hkv, T_cap, D)`` with ``tail_lens: (B,) int32`` valid entries per sequence.
- Keys are stored RoPE-rotated.

Public functions run the Triton kernel for CUDA tensors (or on CPU when ``KVPRESS_FORCE_TRITON=1`` together with
``TRITON_INTERPRET=1`` set before import) and the torch reference otherwise, so CPU results are exact.

- ``compact_segments``: dense (B, Hkv, S, D) + kept indices -> flat (N, D) + cu_seqlens.
- ``append_tail``: write (B, Hkv, Q, D) new tokens into the tail in place, O(new tokens).
- ``quantize_segments`` / ``append_segment_groups`` / ``dequantize_segments``: ragged segments stored as packed
  2/4/8-bit groups (``QuantizedSegments``; keys per channel, values per token).
- ``quantized_varlen_attention``: ``varlen_attention`` over ``QuantizedSegments``, dequantized on the fly in-kernel.
- ``decompose_segments`` / ``append_decomposed_groups`` / ``dequantize_decomposed``: quantized segments with
  corrections (``DecomposedSegments``): non-uniform levels (``fit_levels``), sparse exact outliers, low-rank residual
  factors, pre-RoPE keys (``RotaryTable``) - the storage of KVQuant and GEAR.
- ``decomposed_attention``: attention over ``DecomposedSegments``, each tile rebuilt in registers from that storage.
- ``merged_attention``: attention over a cross-layer merged context (shared unit directions, per-layer magnitudes)
  plus the causal tail, without rebuilding the layer's keys (MiniCache).
- ``PagedKV``: every token of a layer plus per-page element-wise key bounds (min, max); ``page_scores`` bounds
  ``q . k`` over each page from them and ``select_pages`` keeps the best pages; ``page_attention`` attends over the
  selected pages only (Quest: the bytes read per decode step follow the page budget, not the context).
- ``block_sparse_attention``: causal prefill attention over listed key blocks per query block (MInference's dynamic
  sparse prefill); ``a_shape_blocks``, ``vertical_slash_blocks`` and ``block_sparse_blocks`` build the lists of its
  three head patterns (``sparse_patterns.py``).
- ``varlen_attention``: queries (B, Hq, Q, D), the newest tail tokens, over segment ++ causal tail; GQA in-kernel,
  split-K for long segments. ``AttentionConfig`` overrides its launch heuristics (tests, tuning).

Each ``reference_*`` function is the plain-torch version of the same call. Arguments are validated with ValueErrors
naming the argument; data-dependent checks (lengths, capacity, index ranges) cost one host sync and can be skipped
with ``check=False`` on the decode hot path (``append_tail``, ``varlen_attention``).
"""

from .append import append_tail, reference_append_tail
from .block_sparse_attention import block_sparse_attention, block_token_mask, reference_block_sparse_attention
from .compaction import compact_segments, reference_compact_segments
from .decomposed_attention import decomposed_attention, reference_decomposed_attention
from .decomposed_segments import (
    DecomposedSegments,
    LowRankFactors,
    RotaryTable,
    SparseOutliers,
    append_decomposed_groups,
    calibrate_levels,
    decompose_segments,
    dequantize_decomposed,
    fit_levels,
)
from .merged_attention import merged_attention, reference_merged_attention
from .page_attention import page_attention, page_token_mask, reference_page_attention
from .page_selection import page_scores, reference_page_scores, reference_select_pages, select_pages
from .paged_kv import PagedKV
from .quantization import (
    QuantizedTensor,
    dequantize,
    quantize_keys,
    quantize_values,
    reference_dequantize,
    reference_quantize_keys,
    reference_quantize_values,
)
from .quantized_attention import quantized_varlen_attention, reference_quantized_varlen_attention
from .quantized_segments import QuantizedSegments, append_segment_groups, dequantize_segments, quantize_segments
from .sparse_patterns import (
    a_shape_blocks,
    a_shape_mask,
    block_sparse_blocks,
    block_sparse_mask,
    mask_to_blocks,
    vertical_slash_blocks,
    vertical_slash_mask,
)
from .varlen_attention import AttentionConfig, reference_varlen_attention, varlen_attention

__all__ = [
    "AttentionConfig",
    "a_shape_blocks",
    "a_shape_mask",
    "block_sparse_attention",
    "block_sparse_blocks",
    "block_sparse_mask",
    "block_token_mask",
    "mask_to_blocks",
    "reference_block_sparse_attention",
    "vertical_slash_blocks",
    "vertical_slash_mask",
    "DecomposedSegments",
    "LowRankFactors",
    "RotaryTable",
    "SparseOutliers",
    "append_decomposed_groups",
    "calibrate_levels",
    "decompose_segments",
    "decomposed_attention",
    "dequantize_decomposed",
    "fit_levels",
    "reference_decomposed_attention",
    "PagedKV",
    "QuantizedSegments",
    "QuantizedTensor",
    "append_segment_groups",
    "append_tail",
    "compact_segments",
    "dequantize",
    "dequantize_segments",
    "merged_attention",
    "page_attention",
    "page_scores",
    "page_token_mask",
    "quantize_keys",
    "quantize_segments",
    "quantize_values",
    "quantized_varlen_attention",
    "reference_append_tail",
    "reference_compact_segments",
    "reference_dequantize",
    "reference_merged_attention",
    "reference_page_attention",
    "reference_page_scores",
    "reference_select_pages",
    "reference_quantize_keys",
    "reference_quantize_values",
    "reference_quantized_varlen_attention",
    "reference_varlen_attention",
    "select_pages",
    "varlen_attention",
]
