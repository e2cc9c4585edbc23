"""The offline pattern search: for every query head, the MInference pattern that covers the most of its attention.

MInference assigns each head the pattern (A-shape, vertical-slash or block-sparse) that, at a comparable cost,
recovers the most attention mass on a sample prompt. :func:`search_patterns` runs the model once over ``input_ids``
with a capturing attention function: each layer's output is the dense one, and on the side it measures, for sampled
query rows, the share of every head's softmax that each pattern's blocks hold (at ``budget_blocks`` key blocks per
query block), then keeps the best pattern per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

from kvpress.cache.attention import suffix_attention
from kvpress.sparse_prefill.attention import head_block_mask
from kvpress.sparse_prefill.patterns import HeadPattern, SparsePrefillConfig
from kvpress.utils import attention_layers, is_sliding_layer

KINDS = ("a_shape", "vertical_slash", "block_sparse")
_SEARCH_NAME = "kvpress_pattern_search"
_SEARCH = "_kvpress_pattern_search"


def sample_rows(n: int, last_q: int, rows: int, device=None) -> torch.Tensor:
    """Query rows the coverage is measured on: the last ``last_q`` and ``rows`` spread over the prompt."""
    spread = torch.linspace(0, n - 1, min(rows, n), device=device).round().long()
    return torch.unique(torch.cat([spread, torch.arange(max(0, n - last_q), n, device=device)]))


def pattern_coverage(query: torch.Tensor, key: torch.Tensor, scale: float, patterns: list[HeadPattern],
                     config: SparsePrefillConfig, rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``(len(patterns), Hq)``: for each pattern (the same for every head), the mean over batch rows and the query
    ``rows`` of each head's causal softmax mass on the keys the pattern reads."""
    B, Hq, n, _ = query.shape
    groups = Hq // key.shape[1]
    bs = config.block_size
    logits = query[:, :, rows].float() @ key.float().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    causal = torch.arange(n, device=query.device)[None, :] <= rows[:, None]  # (R, n)
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, Hq, R, n)
    out = []
    for pattern in patterns:
        blocks = head_block_mask([pattern] * Hq, query, key, scale, config)[:, :, rows // bs]  # (B, Hq, R, n_qb)
        tokens = blocks.repeat_interleave(bs, -1)[..., :n] & causal
        out.append((probs * tokens).sum(-1).mean((0, 2)))
    return torch.stack(out)


@dataclass
class _Search:
    config: SparsePrefillConfig
    patterns: list[HeadPattern]
    rows: int
    coverage: dict


def _search_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      **kwargs):  # fmt: skip
    search: _Search | None = getattr(module, _SEARCH, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if search is not None and not sliding_window and key.shape[2] == query.shape[2]:
        rows = sample_rows(query.shape[2], search.config.last_q, search.rows, query.device)
        search.coverage[module.layer_idx] = pattern_coverage(query, key, scale, search.patterns, search.config, rows)
    return suffix_attention(query, key, value, scale, sliding_window), None


def search_patterns(
    model: nn.Module,
    input_ids: torch.Tensor,
    budget_blocks: int = 8,
    block_size: int = 64,
    last_q: int = 64,
    rows: int = 256,
    min_tokens: int = 1024,
) -> tuple[SparsePrefillConfig, dict]:
    """Assign every query head of every full-attention layer the pattern kind that covers the most of its attention
    over ``input_ids`` ``(batch, n)``, each kind at ``budget_blocks`` key blocks per query block
    (:meth:`HeadPattern.with_budget`). Returns the config and ``{layer_idx: (3, Hq) coverage}`` (rows: :data:`KINDS`).
    """
    if input_ids.shape[1] < 2 * block_size:
        raise ValueError(f"input_ids holds {input_ids.shape[1]} tokens; the search needs at least two blocks "
                         f"(2 * block_size = {2 * block_size})")  # fmt: skip
    settings = {"block_size": block_size, "last_q": last_q, "min_tokens": min_tokens}
    probe = SparsePrefillConfig(layers={}, **settings)
    patterns = [HeadPattern.with_budget(kind, budget_blocks, block_size) for kind in KINDS]
    coverage: dict[int, torch.Tensor] = {}
    layers = attention_layers(model)
    previous = model.config._attn_implementation
    if _SEARCH_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SEARCH_NAME, _search_attention)
    try:
        for module in layers:
            if not is_sliding_layer(module):
                setattr(module, _SEARCH, _Search(probe, patterns, rows, coverage))
        model.set_attn_implementation(_SEARCH_NAME)
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for module in layers:
            if hasattr(module, _SEARCH):
                delattr(module, _SEARCH)
    chosen = {idx: [patterns[k] for k in cov.argmax(0).tolist()] for idx, cov in sorted(coverage.items())}
    return SparsePrefillConfig(layers=chosen, **settings), {idx: cov.cpu() for idx, cov in coverage.items()}
