"""`CompressedContext`: one or several contexts prefilled (and compressed) once, answered many times."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from transformers import DynamicCache

from kvpress.cache.layer_access import dense_cache_bytes, layer_memory_bytes, restore_cache, snapshot_cache
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.rotary import rotary_table
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.compression_summary import CompressionSummary
from kvpress.generation.decode import graph_decoding_blocker, greedy_decode
from kvpress.generation.prefill import prefill
from kvpress.presses.base_press import BasePress


def make_cache(
    model: nn.Module,
    press: BasePress | None = None,
    quantization: QuantizationConfig | dict | None = None,
    ragged: bool = False,
):
    """The cache a press needs: a :class:`QuantizedCache` under ``quantization``, a :class:`VarlenCache` for presses
    that keep a different number of tokens per head or when ``ragged`` (CUDA-graph decoding), else a transformers
    ``DynamicCache``."""
    if quantization is not None:
        quantization = QuantizationConfig.coerce(quantization, "quantization")
        rope = rotary_table(model) if quantization.pre_rope else None
        return QuantizedCache(config=model.config, quantization=quantization, rope=rope)
    if ragged or (press is not None and press.capabilities.head_variable):
        return VarlenCache(config=model.config)
    return DynamicCache(config=model.config)


class CompressedContext:
    """A cache holding compressed contexts, where each continues, and the state every answer starts from.

    Build one with :meth:`prefill` (one context), :meth:`prefill_batch` (several, stacked in one ragged cache) or
    :meth:`resume` (a saved cache); then :meth:`generate` answers from it as often as needed: the cache returns to
    the compressed context after every answer, so answers equal those of separate prefills. A press whose phase is
    ``"decode"`` (or ``"both"``) also acts while each answer is generated, keeping the cache bounded.

    Attributes:
        model: the causal LM.
        cache: the cache (after :meth:`generate`, it holds the context again).
        positions: per sequence, the position of the first token after its context.
        summaries: per sequence, a :class:`CompressionSummary` of its prefill (``None`` after :meth:`resume`).
    """

    def __init__(self, model: nn.Module, cache, positions: list[int], summaries: list | None = None, empty=None,
                 decoding_press: BasePress | None = None):  # fmt: skip
        self.model, self.cache, self.positions = model, cache, list(positions)
        self.summaries = summaries
        self.decoding_press = decoding_press
        self._state = snapshot_cache(cache)
        self._empty = empty

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def prefill(
        cls,
        model: nn.Module,
        prompt: torch.Tensor,
        press: BasePress | None = None,
        cache=None,
        quantization: QuantizationConfig | dict | None = None,
        record_kept: bool = False,
        compact: bool | None = None,
        chunk_size: int | None = None,
        sparse=None,
        question_length: int | None = None,
    ) -> "CompressedContext":
        """Prefill ``prompt`` ``(1, n)`` into ``cache`` (default: :func:`make_cache`, ragged where CUDA-graph decoding
        applies; must be empty) under ``press``, in one forward or ``chunk_size`` tokens at a time, with MInference's
        sparse attention under ``sparse`` (a pattern config or file; :func:`~kvpress.generation.prefill`). A
        query-aware prompt may say how many of its last tokens are the question (``question_length``), for
        prompt-guided presses.

        ``compact=True`` moves a :class:`VarlenCache` into its ragged decode layout right away (the CUDA-graph decoder
        needs it); ``None`` does so where graph decoding applies (:func:`graph_decoding_blocker`). Quantized caches
        always quantize the context here, compressed by the press or not.
        """
        if compact is None:
            compact = graph_decoding_blocker(model, press, cache) is None
        cache = cache if cache is not None else make_cache(model, press, quantization, ragged=compact)
        if cache.get_seq_length() > 0:
            raise ValueError("cache must be empty: the context is prefilled into it")
        empty = snapshot_cache(cache)
        if press is not None:
            press.validate(model)
            press.check_length(prompt.shape[1])
        caps = press.capabilities if press is not None else None
        prefill_press = press if caps is not None and caps.compresses_prefill else None
        # Attached for the prefill whatever its phase, as under `with press(model): model.generate()`: a decode-time
        # press may lay the cache out for decoding then (QuestPress); the others leave the prefill alone.
        position, report = prefill(model, prompt, cache, press, record_kept, chunk_size, sparse, question_length)
        report = report if prefill_press is not None else None
        if isinstance(cache, VarlenCache):
            cache.next_positions = [position]
            if compact or isinstance(cache, QuantizedCache):
                cache.compact()
        summary = summarize(model, cache, prompt, press, report)  # a decode-only press is named, with no report
        decoding = press if caps is not None and caps.compresses_decode else None
        return cls(model, cache, [position], [summary], empty, decoding)

    @classmethod
    def prefill_batch(
        cls,
        model: nn.Module,
        prompts: list[torch.Tensor],
        press: BasePress | None = None,
        quantization: QuantizationConfig | dict | None = None,
        record_kept: bool = False,
        chunk_size: int | None = None,
        sparse=None,
    ) -> "CompressedContext":
        """Prefill each prompt ``(1, n_b)`` alone under ``press``, then stack the compressed caches into one ragged
        cache (a :class:`VarlenCache`, or a :class:`QuantizedCache` under ``quantization``): no padding token enters
        it, and :meth:`generate` decodes every sequence together."""
        if press is not None:
            if press.capabilities.compresses_decode:
                raise ValueError(
                    f"{type(press).__name__} compresses while decoding, on dense caches only so far; a batch is "
                    "stacked in a ragged cache: prefill the contexts one at a time"
                )
            press.validate(model)
            for prompt in prompts:
                press.check_length(prompt.shape[1])
        kind = VarlenCache if quantization is None else QuantizedCache
        caches, positions, summaries = [], [], []
        for prompt in prompts:
            ragged = make_cache(model, None, quantization, ragged=True)
            one = cls.prefill(
                model,
                prompt,
                press,
                ragged,
                record_kept=record_kept,
                compact=True,
                chunk_size=chunk_size,
                sparse=sparse,
            )
            caches.append(one.cache)
            positions += one.positions
            summaries += one.summaries
            del one
        cache = kind.concatenate(caches)
        cache.next_positions = positions
        return cls(model, cache, positions, summaries)

    @classmethod
    def resume(cls, model: nn.Module, cache) -> "CompressedContext":
        """Answer from a cache that already holds compressed contexts, e.g. ``VarlenCache.load(path)`` of a cache the
        pipeline (or :meth:`prefill`) filled, which records where each context ends (``next_positions``)."""
        positions = getattr(cache, "next_positions", None)
        if cache is None or cache.get_seq_length() == 0 or positions is None:
            raise ValueError(
                "resuming needs a cache that holds a compressed context and records where it ends: pass "
                "cache=VarlenCache.load(path) of a cache the pipeline filled"
            )
        return cls(model, cache, positions)

    # ---- answering ---------------------------------------------------------------------------------------------
    def generate(
        self,
        tails: list[torch.Tensor],
        max_new_tokens: int,
        eos_ids: Collection[int],
        pad_id: int = 0,
        cuda_graph: bool | None = None,
    ) -> list[list[int]]:
        """Greedy answer ids of every sequence after its tail ``(1, L_b)`` (:func:`greedy_decode`; ``cuda_graph=None``
        replays a CUDA graph wherever one applies); the cache is returned to the compressed context afterwards."""
        if len(tails) != len(self.positions):
            raise ValueError(f"got {len(tails)} tails for a cache of {len(self.positions)} sequences; give one each")
        try:
            # A decode-time press acts on the question and every generated token; its state starts fresh per answer.
            return greedy_decode(self.model, self.cache, tails, self.positions, max_new_tokens, eos_ids, pad_id,
                                 cuda_graph, self.decoding_press)  # fmt: skip
        finally:
            restore_cache(self.cache, self._state)

    def clear(self) -> None:
        """Return the cache to the state before :meth:`prefill` (empty), e.g. to prefill the next prompt into it."""
        if self._empty is None:
            raise ValueError("only a context built by CompressedContext.prefill can be cleared")
        restore_cache(self.cache, self._empty)


def summarize(model: nn.Module, cache, prompt: torch.Tensor, press: BasePress | None, report) -> CompressionSummary:
    """The :class:`CompressionSummary` of a one-sequence ``cache`` just prefilled with ``prompt`` ``(1, n)``."""
    dtype = next(model.parameters()).dtype
    n_tokens = prompt.shape[1]
    return CompressionSummary(
        press=None if press is None else repr(press),
        cache=type(cache).__name__,
        prefill_tokens=n_tokens,
        compression_ratio=0.0 if report is None else report.compression_ratio,
        kv_bytes_uncompressed=dense_cache_bytes(model.config, n_tokens, 1, dtype),
        kv_bytes=layer_memory_bytes(cache),
        layers=report,
        prompt_ids=prompt[0].cpu(),
    )
