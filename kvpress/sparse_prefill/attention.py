"""MInference's dynamic sparse prefill as a transformers attention function, switched on by :func:`sparse_prefill`.

Each query head of a configured layer reads only the key blocks of its pattern (:class:`HeadPattern`), built from the
forward's own queries and keys (vertical-slash from the last queries' softmax, block-sparse from mean-pooled blocks)
and run by the :func:`kvpress_kernels.block_sparse_attention` kernel. It only speeds the prefill up: the cache receives
every key and value, so any press compresses afterwards exactly as it would (presses that read the attention weights
excepted: they need the eager implementation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from kvpress.cache.attention import suffix_attention
from kvpress.sparse_prefill.patterns import HeadPattern, SparsePrefillConfig
from kvpress.utils import attention_layers, is_sliding_layer
from kvpress_kernels import a_shape_mask, block_sparse_attention, block_sparse_mask, mask_to_blocks, vertical_slash_mask

SPARSE_PREFILL_NAME = "kvpress_sparse_prefill"
_STATE = "_kvpress_sparse_prefill"


@dataclass
class SparsePrefillReport:
    """What a :func:`sparse_prefill` block did.

    Attributes:
        sparse_calls: layer forwards run sparse.
        dense_calls: ``{reason: count}`` of layer forwards run dense (short prompts, later chunks, masks, ...).
        blocks_read: key blocks read over all sparse calls; ``blocks_causal``: those a dense causal prefill reads.
    """

    sparse_calls: int = 0
    dense_calls: dict[str, int] = field(default_factory=dict)
    blocks_read: int = 0
    blocks_causal: int = 0

    @property
    def density(self) -> float:
        """Fraction of the causal key blocks the sparse calls read (1.0 before any)."""
        return self.blocks_read / self.blocks_causal if self.blocks_causal else 1.0


@dataclass
class _LayerState:
    config: SparsePrefillConfig
    heads: list[HeadPattern]
    report: SparsePrefillReport


def head_block_mask(heads: list[HeadPattern], query: torch.Tensor, key: torch.Tensor, scale: float,
                    config: SparsePrefillConfig) -> torch.Tensor:  # fmt: skip
    """``(B, Hq, n_qb, n_qb)`` bool: the key blocks each query head's pattern reads, for ``query`` ``(B, Hq, n, D)``
    and ``key`` ``(B, Hkv, n, D)``."""
    B, Hq, n, _ = query.shape
    groups = Hq // key.shape[1]
    bs = config.block_size
    n_qb = -(-n // bs)
    mask = torch.zeros(B, Hq, n_qb, n_qb, dtype=torch.bool, device=query.device)
    by_pattern: dict[HeadPattern, list[int]] = {}
    for h, pattern in enumerate(heads):
        by_pattern.setdefault(pattern, []).append(h)
    for pattern, idx in by_pattern.items():
        rows = torch.tensor(idx, device=query.device)
        if pattern.kind == "a_shape":
            mask[:, rows] = a_shape_mask(n, bs, pattern.sink_blocks, pattern.local_blocks, query.device)
            continue
        q, k = query[:, rows], key[:, rows // groups]
        if pattern.kind == "vertical_slash":
            mask[:, rows] = vertical_slash_mask(q, k, scale, bs, pattern.n_vertical, pattern.n_slash, config.last_q)
        else:
            mask[:, rows] = block_sparse_mask(q, k, bs, pattern.top_blocks)
    return mask


def sparse_prefill_attention(
    module: nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Sparse attention of a prefill ``query`` ``(batch, heads, n, head_dim)`` over its own ``key`` and ``value``;
    dense (and counted as such) for layers without patterns, sliding windows, prompts under ``min_tokens`` and
    forwards over a cache that already holds tokens. Returns ``(output (batch, n, heads, head_dim), None)``."""
    state: _LayerState | None = getattr(module, _STATE, None)
    n = query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    reason = None
    if state is None:
        reason = "layer without patterns"
    elif sliding_window:
        reason = "sliding-window layer"
    elif hasattr(key, "attend") or key.shape[2] != n:
        reason = "the cache already held tokens"
    elif n < state.config.min_tokens:
        reason = f"fewer than min_tokens={state.config.min_tokens} tokens"
    elif attention_mask is not None:
        reason = "an attention mask was passed (padding)"
    if reason is not None:
        if state is not None:
            state.report.dense_calls[reason] = state.report.dense_calls.get(reason, 0) + 1
        if hasattr(key, "attend"):
            return key.attend(query, scaling=scale, sliding_window=sliding_window), None
        if attention_mask is not None:
            groups = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                                 value.repeat_interleave(groups, 1), attn_mask=attention_mask,
                                                 scale=scale)  # fmt: skip
            return out.transpose(1, 2).contiguous(), None
        return suffix_attention(query, key, value, scale, sliding_window), None
    mask = head_block_mask(state.heads, query, key, scale, state.config)
    index, count = mask_to_blocks(mask)
    n_qb = mask.shape[-1]
    state.report.sparse_calls += 1
    state.report.blocks_read += int(count.sum())
    state.report.blocks_causal += mask.shape[0] * mask.shape[1] * n_qb * (n_qb + 1) // 2
    out = block_sparse_attention(query, key, value, index, count, scale, state.config.block_size)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def sparse_prefill(model: nn.Module, config: SparsePrefillConfig | str | Path) -> Iterator[SparsePrefillReport]:
    """Run ``model``'s prefills inside the block with MInference's dynamic sparse attention (``config``: a
    :class:`SparsePrefillConfig` or the path of a pattern file); yields a :class:`SparsePrefillReport`.

    Compose it with any press: ``with sparse_prefill(model, "patterns.json"), press(model): ...``, or around the
    pipeline. Decoding forwards run under the ``"kvpress"`` attention function as always.
    """
    config = SparsePrefillConfig.coerce(config, "config")
    layers = attention_layers(model)
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    for idx, patterns in config.layers.items():
        if not 0 <= idx < len(layers):
            raise ValueError(f"the pattern file names layer {idx}; the model has layers 0..{len(layers) - 1}")
        if len(patterns) != heads:
            raise ValueError(f"layer {idx} lists {len(patterns)} head patterns; the model has {heads} query heads")
    report = SparsePrefillReport()
    previous = model.config._attn_implementation
    if SPARSE_PREFILL_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(SPARSE_PREFILL_NAME, sparse_prefill_attention)
    try:
        for module in layers:
            patterns = config.layers.get(module.layer_idx)
            if patterns is not None and not is_sliding_layer(module):
                setattr(module, _STATE, _LayerState(config, patterns, report))
        model.set_attn_implementation(SPARSE_PREFILL_NAME)
        yield report
    finally:
        model.set_attn_implementation(previous)
        for module in layers:
            if hasattr(module, _STATE):
                delattr(module, _STATE)
