"""Prefill a prompt into a cache, under a press or not."""

from __future__ import annotations

import torch
from torch import nn

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.base_press import BasePress
from kvpress.presses.report import CompressionReport
from kvpress.utils import warn_past_positions


def prefill(
    model: nn.Module, input_ids: torch.Tensor, cache, press: BasePress | None = None, record_kept: bool = False
) -> tuple[int, CompressionReport | None]:
    """Run ``input_ids`` ``(1, n)`` through ``model``'s decoder into ``cache`` (which must be empty), under ``press``.

    Returns the position of the next token (``n``; the longest kept length for presses that re-rotate kept keys to
    contiguous positions) and the press's :class:`CompressionReport` (``None`` without a press; with the kept
    positions and their scores when ``record_kept``). No logits are computed: the first answer token comes from the
    question's own forward.
    """
    warn_past_positions(model.config, input_ids.shape[1])
    base = model.base_model
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    kwargs = {"input_ids": input_ids, **cache_kwargs(base, cache), "position_ids": positions, "use_cache": True}
    with torch.no_grad():
        if press is None:
            base(**kwargs)
            return input_ids.shape[1], None
        with press(model, record_kept=record_kept) as report:
            base(**kwargs)
    if press.capabilities.rerotates_positions and report.kept_lengths:
        # Kept keys sit at positions 0..kept-1; layers may differ, so continue after the longest.
        return int(max(v.max().item() for v in report.kept_lengths.values())), report
    return input_ids.shape[1], report
