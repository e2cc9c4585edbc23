"""Prefill a prompt into a cache, under a press or not, in one forward or chunk by chunk."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.base_press import BasePress
from kvpress.presses.report import CompressionReport
from kvpress.sparse_prefill import SparsePrefillConfig, sparse_prefill
from kvpress.utils import warn_past_positions


def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache,
    press: BasePress | None = None,
    record_kept: bool = False,
    chunk_size: int | None = None,
    sparse: SparsePrefillConfig | str | Path | None = None,
    question_length: int | None = None,
) -> tuple[int, CompressionReport | None]:
    """Run ``input_ids`` ``(batch, n)`` through ``model``'s decoder into ``cache`` (which must be empty), under
    ``press``.

    ``chunk_size`` prefills at most ``chunk_size`` tokens per forward (near-equal chunks): each chunk attends to the
    cache the earlier chunks left (compressed) plus itself, at its original positions, and the press then brings
    every layer back to the budget of the tokens seen so far, so peak memory follows the chunk and the budget, not
    the prompt. Presses must support it (``capabilities.chunked_prefill``); ``None`` (the default) prefills in one
    forward. Into a :class:`QuantizedCache`, the chunks run over a full-precision :class:`VarlenCache` (the press
    re-scores the kept tokens with every chunk), quantized layer by layer at the end.

    ``sparse``: run the prefill (its first chunk) with MInference's sparse attention, each head reading the blocks of
    its pattern (:func:`kvpress.sparse_prefill.sparse_prefill`; a config or a pattern file); the press then compresses
    as it would. A warning says so when every layer ran dense.

    ``question_length``: how many of the prompt's last tokens are the question (a query-aware prompt), told to the
    press through its report (``report.question_length``) for prompt-guided presses.

    Returns the position of the next token (``n``; the longest kept length for presses that re-rotate kept keys to
    contiguous positions) and the press's :class:`CompressionReport` (``None`` without a press; with the kept
    positions and their scores when ``record_kept``). No logits are computed: the first answer token comes from the
    question's own forward.
    """
    n = input_ids.shape[1]
    if question_length is not None and (
        isinstance(question_length, bool) or not isinstance(question_length, int) or not 1 <= question_length <= n
    ):
        raise ValueError(f"question_length must be None or an int in [1, {n}] (the prompt's length), got {question_length!r}")
    check_chunk_size(chunk_size, press)
    sparse = check_sparse(sparse, press)
    warn_past_positions(model.config, n)
    bounds = chunk_bounds(n, chunk_size)
    if press is not None and len(bounds) > 2:
        press.check_length(min(b - a for a, b in zip(bounds, bounds[1:])))  # e.g. a window inside every chunk
    if len(bounds) > 2 and isinstance(cache, QuantizedCache):
        # Later chunks re-score the tokens kept so far, whole: stage them in full precision, quantize at the end.
        if cache.get_seq_length() > 0:
            raise ValueError("cache must be empty: the prompt is prefilled into it")
        staging = VarlenCache(config=model.config)
        positions_needed = press is not None and cache.needs_positions
        position, report = prefill(model, input_ids, staging, press, record_kept or positions_needed, chunk_size,
                                   sparse, question_length)  # fmt: skip
        cache.quantize_from(staging, n, report.kept_indices if report is not None else None)
        return position, report
    base = model.base_model
    positions = torch.arange(n, device=input_ids.device)[None]
    sparse_block = sparse_prefill(model, sparse) if sparse is not None else contextlib.nullcontext()
    with (
        torch.no_grad(),
        sparse_block as sparse_report,
        press(model, record_kept=record_kept) if press else contextlib.nullcontext() as report,
    ):
        if report is not None:
            report.question_length = question_length
        for start, end in zip(bounds, bounds[1:]):
            if report is not None and chunk_size is not None:
                report.prefill_chunk = (start, end, n)
            # Later chunks run over a compressed cache whose layers may hold different lengths (per-layer budgets),
            # which the model's single mask cannot describe: the "kvpress" attention derives each layer's own.
            with compressed_attention(model) if start > 0 else contextlib.nullcontext():
                base(input_ids=input_ids[:, start:end], **cache_kwargs(base, cache),
                     position_ids=positions[:, start:end], use_cache=True)  # fmt: skip
        if report is not None:
            report.prefill_chunk = None
    if sparse_report is not None:
        if report is not None:
            report.state["sparse_prefill"] = sparse_report
        if sparse_report.sparse_calls == 0:
            warnings.warn(f"the sparse prefill ran every layer dense: {sparse_report.dense_calls}", UserWarning,
                          stacklevel=2)  # fmt: skip
    if press is None:
        return n, None
    if press.capabilities.rerotates_positions and report.kept_lengths:
        # Kept keys sit at positions 0..kept-1; layers may differ, so continue after the longest.
        return int(max(v.max().item() for v in report.kept_lengths.values())), report
    return n, report


def chunk_bounds(n: int, chunk_size: int | None) -> list[int]:
    """Boundaries ``[0, ..., n]`` of the fewest chunks of at most ``chunk_size`` tokens, of near-equal sizes (a short
    last chunk would starve presses that score with the chunk's last tokens)."""
    if chunk_size is None or n <= chunk_size:
        return [0, n]
    count = -(-n // chunk_size)
    return [i * n // count for i in range(count + 1)]


def check_chunk_size(chunk_size: int | None, press: BasePress | None, name: str = "chunk_size") -> None:
    """``ValueError`` unless ``chunk_size`` is ``None`` or an int >= 1 and ``press`` can prefill chunk by chunk
    (``name``: the parameter as the caller calls it)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be an int >= 1 or None (one forward), got {chunk_size!r}")
    if press is None:
        return
    reason = press.chunk_refusal()
    if reason is not None:
        raise ValueError(
            f"{type(press).__name__} cannot compress a prefill chunk by chunk: {reason}; accepted: presses that score "
            "tokens (ScorerPress: KnormPress, SnapKVPress, TOVAPress, ...), AdaKVPress or PerLayerCompressionPress "
            f"around one, ThinKPress, MiniCachePress, and ComposedPress of those; pass {name}=None"
        )


def check_sparse(sparse, press: BasePress | None, name: str = "sparse") -> SparsePrefillConfig | None:
    """``sparse`` as a :class:`SparsePrefillConfig` (``None`` stays ``None``); ``ValueError`` for a bad value or a
    press that reads the eager attention weights, which a sparse prefill does not compute (``name``: the parameter as
    the caller calls it)."""
    if sparse is None:
        return None
    sparse = SparsePrefillConfig.coerce(sparse, name)
    if press is not None and press.capabilities.needs_attention_weights:
        raise ValueError(
            f"{type(press).__name__} reads the attention weights of the eager implementation, which a sparse prefill "
            f"does not compute; pass {name}=None or a press that does not read them"
        )
    return sparse
