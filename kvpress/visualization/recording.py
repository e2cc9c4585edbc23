"""`record_compression`: prefill a prompt under a press and keep the report of which tokens every head kept."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from kvpress.cache import VarlenCache
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.base_press import BasePress


@torch.no_grad()
def record_compression(model: nn.Module, press: BasePress, input_ids: torch.Tensor):
    """Prefill ``input_ids`` ``(batch, n)`` under ``press`` with ``record_kept=True``.

    The cache is the one the pipeline would use (a ``VarlenCache`` for head-variable presses, else a
    ``DynamicCache``), so the report describes exactly what that cache holds.

    Returns:
        ``(report, cache)``: the :class:`~kvpress.presses.report.CompressionReport` (``kept_indices``, ``scores``,
        ``kept_lengths``) and the compressed cache.
    """
    if not isinstance(press, BasePress):
        raise ValueError(f"press must be a kvpress press (BasePress), got {type(press).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, n) tensor of token ids, got {_describe(input_ids)}")
    config = model.config
    cache = VarlenCache(config=config) if press.capabilities.head_variable else DynamicCache(config=config)
    base = model.base_model
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    with press(model, record_kept=True) as report:
        base(input_ids=input_ids, **cache_kwargs(base, cache), position_ids=positions, use_cache=True)
    return report, cache


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
