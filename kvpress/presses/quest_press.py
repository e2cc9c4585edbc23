"""`QuestPress`: query-aware page selection at every decode step (Quest); every token is kept."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kvpress.cache.forward_keyword import find_cache
from kvpress.cache.layer_access import replace_dense_layer
from kvpress.cache.quest_layer import QuestLayer
from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.report import CompressionReport
from kvpress.utils import is_sliding_layer


@dataclass
class QuestPress(BasePress):
    """At each generated token, attend only to the pages of ``page_size`` tokens whose keys can score highest for
    the current query (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
    arXiv 2406.10774).

    The cache keeps every token: each full-attention layer moves into a :class:`~kvpress.cache.quest_layer.QuestLayer`
    (the tokens plus the element-wise min and max key of each page) after the first forward that fills it. At a
    decode step, a page's score is the upper bound ``sum_c max(q_c min_c, q_c max_c)`` of ``q . k`` over its keys
    (the largest over the query heads that share a kv head); the ``token_budget // page_size`` best pages per
    (sequence, kv head), the newest ``recent_pages`` always among them, are read by a Triton sparse attention.

    Memory is not reduced (the bounds add ``2 / page_size`` of the keys); the bytes read per generated token are:
    ``kvpress.cache.layer_access.decode_bytes_read(cache)`` gives them for the cache's current length.

    Args:
        page_size: tokens per page (a power of two; 16 as published).
        token_budget: tokens read per (sequence, kv head) at each decode step, recent pages included.
        recent_pages: newest pages always read (the current token's page among them).
        dense_layers: the first layers keep full attention (2 as published: their attention is too spread out for
            page selection).
    """

    page_size: int = 16
    token_budget: int = 4096
    recent_pages: int = 1
    dense_layers: int = 2

    def __post_init__(self):
        check_int(self.page_size, "page_size", 1)
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two (16 as published), got {self.page_size}")
        check_int(self.token_budget, "token_budget", 1)
        check_int(self.recent_pages, "recent_pages", 0)
        check_int(self.dense_layers, "dense_layers", 0)
        if self.token_budget // self.page_size <= self.recent_pages:
            raise ValueError(
                f"token_budget={self.token_budget} holds {self.token_budget // self.page_size} page(s) of "
                f"{self.page_size} tokens, leaving none to select after recent_pages={self.recent_pages}; accepted: "
                f"token_budget >= {(self.recent_pages + 1) * self.page_size}"
            )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(phase="decode", decodes_in_attention=True)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if self.dense_layers >= n_layers:
            raise ValueError(
                f"dense_layers={self.dense_layers} leaves none of {type(model).__name__}'s {n_layers} layers to Quest; "
                f"accepted: 0 <= dense_layers < {n_layers}"
            )

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """Quest selects at read time and evicts nothing: the layer's tokens, unchanged."""
        return keys, values

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output, report: CompressionReport):
        cache = find_cache(kwargs)
        if cache is None or is_sliding_layer(module) or module.layer_idx < self.dense_layers:
            return output
        if replace_dense_layer(cache, module.layer_idx, QuestLayer, self._paged_layer):
            report.state.setdefault("quest_layers", []).append(module.layer_idx)
        return output

    def _paged_layer(self, keys, values) -> QuestLayer:
        return QuestLayer.from_dense(keys, values, self.page_size, self.token_budget, self.recent_pages)
