"""Pictures of what a press keeps: attention maps, kept-token maps, token scores and per-head budgets.

Everything here reads a :class:`~kvpress.presses.report.CompressionReport` recorded with ``record_kept=True`` (see
:func:`record_compression`), so it serves every press. Plotting needs matplotlib (``pip install matplotlib``, or the
``notebooks`` extra); the core library never imports this package.
"""

from kvpress.visualization.attention_map import attention_maps, plot_attention_map
from kvpress.visualization.head_budgets import plot_head_budgets
from kvpress.visualization.kept_tokens import plot_kept_tokens, span_kept_share
from kvpress.visualization.recording import record_compression
from kvpress.visualization.scores import plot_scores
from kvpress.visualization.spans import token_spans

__all__ = [
    "attention_maps",
    "plot_attention_map",
    "plot_head_budgets",
    "plot_kept_tokens",
    "plot_scores",
    "record_compression",
    "span_kept_share",
    "token_spans",
]
