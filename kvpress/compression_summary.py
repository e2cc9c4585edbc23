"""`CompressionSummary`: what the pipeline did to one context's KV cache (returned with ``return_report=True``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kvpress.presses.report import CompressionReport


@dataclass(frozen=True)
class CompressionSummary:
    """The compressed context of one pipeline call (one per context of a batch, one per question when query-aware).

    Attributes:
        press: ``repr`` of the press, or ``None`` for no press.
        cache: class name of the cache holding the context (``DynamicCache``, ``VarlenCache``, ``QuantizedCache``).
        prefill_tokens: tokens prefilled (the context with the chat template's prefix; plus the question when
            query-aware).
        compression_ratio: fraction of the prefilled tokens removed, over the compressed layers, heads and
            sequences (0.0 without a press).
        kv_bytes_uncompressed: bytes a ``DynamicCache`` would hold for the prefill at the model's dtype.
        kv_bytes: bytes the cache really holds after compression (and quantization), before any question.
        layers: the press's per-layer :class:`~kvpress.presses.report.CompressionReport` (``None`` without a press);
            with the pipeline's ``record_kept=True`` it also holds the kept positions and scores.
        prompt_ids: ``(prefill_tokens,)`` int64 token ids of the prefilled prompt (on CPU), to locate text in the
            report's positions (:func:`kvpress.visualization.token_spans`).
    """

    press: str | None
    cache: str
    prefill_tokens: int
    compression_ratio: float
    kv_bytes_uncompressed: int
    kv_bytes: int
    layers: CompressionReport | None = field(default=None, repr=False, compare=False)
    prompt_ids: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def saved_bytes(self) -> int:
        """``kv_bytes_uncompressed - kv_bytes``; negative when the cache holds more than a ``DynamicCache`` would
        (e.g. Quest's page bounds and append room, which buy fewer bytes read per token, not fewer held)."""
        return self.kv_bytes_uncompressed - self.kv_bytes

    @property
    def memory_ratio(self) -> float:
        """``kv_bytes / kv_bytes_uncompressed``: the share of the uncompressed cache's memory still held."""
        return self.kv_bytes / self.kv_bytes_uncompressed if self.kv_bytes_uncompressed else 1.0

    def as_dict(self) -> dict:
        """Plain fields (no per-layer report) plus ``saved_bytes`` and ``memory_ratio``, ready for JSON."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("layers", "prompt_ids")}
        return {**out, "saved_bytes": self.saved_bytes, "memory_ratio": self.memory_ratio}
