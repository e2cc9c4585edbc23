"""MInference's dynamic sparse prefill: per-head patterns (:class:`SparsePrefillConfig`, found offline by
:func:`search_patterns` or ``python -m kvpress.sparse_prefill``) run by a block-sparse Triton kernel inside
:func:`sparse_prefill`. It speeds the prefill up and composes with any press."""

from kvpress.sparse_prefill.attention import SparsePrefillReport, sparse_prefill
from kvpress.sparse_prefill.patterns import HeadPattern, SparsePrefillConfig

__all__ = ["HeadPattern", "SparsePrefillConfig", "SparsePrefillReport", "sparse_prefill"]
