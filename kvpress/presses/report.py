"""`CompressionReport`: what one ``with press(model):`` call actually kept, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressionReport:
    """Per-layer outcome of the prefill compressions done inside one ``with press(model) as report:`` block.

    Attributes:
        n_layers: number of attention layers the press was attached to.
        original_lengths: ``{layer_idx: tokens before compression}``.
        kept_lengths: ``{layer_idx: (batch, kv_heads) int64 tensor of tokens kept}`` (on CPU).
        record_kept: whether :meth:`record` also stores which tokens were kept and their scores (``with
            press(model, record_kept=True)``). Off by default: it holds ``O(batch * kv_heads * n)`` numbers per layer.
        kept_indices: with ``record_kept``, ``{layer_idx: (batch, kv_heads, max_kept) int64}`` prefill position of
            each kept token in the order the cache stores them; ``-1`` pads the heads that keep fewer than
            ``max_kept`` (on CPU).
        scores: with ``record_kept``, ``{layer_idx: (batch, kv_heads, n) float32}`` score each prefilled token
            received, for the layers whose press ranks tokens by a score (on CPU; ``NaN`` where nothing scored it).
        decode_compressions: ``{layer_idx: count}`` of re-compressions done while decoding (decode-time presses).
        state: scratch space of presses that act across forwards (buffers, step counts), dropped with the report.
        suspended: while ``True`` the press's layer hooks return at once: a decoder that drives the press itself
            (CUDA-graph decoding with a decode-time press) sets it while it captures and replays steps.
        prefill_chunk: ``(start, end, n)`` during a chunked prefill (set by :func:`kvpress.generation.prefill`): the
            prompt positions of the chunk being prefilled and the prompt's length; else ``None``.
        question_length: the number of the prompt's last tokens that are the question, when the caller knows it
            (the pipeline with ``query_aware=True``, ``prefill(..., question_length=)``); prompt-guided presses
            (Finch) read it.
    """

    n_layers: int
    original_lengths: dict[int, int] = field(default_factory=dict)
    kept_lengths: dict[int, torch.Tensor] = field(default_factory=dict)
    n_records: int = field(default=0, repr=False)  # layer compressions so far, repeated prefills included
    record_kept: bool = False
    kept_indices: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    scores: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    decode_compressions: dict[int, int] = field(default_factory=dict)
    state: dict = field(default_factory=dict, repr=False)
    suspended: bool = False
    prefill_chunk: tuple[int, int, int] | None = None
    question_length: int | None = None

    def record(
        self,
        layer_idx: int,
        n_tokens: int,
        lengths: torch.Tensor,
        indices: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        """Store the outcome of one layer: ``n_tokens`` prefilled, ``lengths`` ``(batch, kv_heads)`` kept.

        With ``record_kept``, ``indices`` ``(batch, kv_heads, >= max kept)`` (positions of the kept tokens, the first
        ``lengths[b, h]`` of each head meaningful) is required unless every token was kept (then they are
        ``0..n_tokens-1``), and ``scores`` ``(batch, kv_heads, n_tokens)`` is stored when given; otherwise both are
        ignored.
        """
        self.n_records += 1
        self.original_lengths[layer_idx] = n_tokens
        lengths = lengths.detach().to("cpu", torch.long)
        self.kept_lengths[layer_idx] = lengths
        if not self.record_kept:
            return
        if indices is None and bool((lengths == n_tokens).all()):
            indices = torch.arange(n_tokens).expand(*lengths.shape, n_tokens)  # every token kept, in order
        if indices is None:
            raise ValueError(f"record_kept=True needs the kept positions of layer {layer_idx}; got indices=None")
        indices = indices.detach().to("cpu", torch.long)[..., : int(lengths.max()) if lengths.numel() else 0].clone()
        slot = torch.arange(indices.shape[-1])
        indices[slot.expand_as(indices) >= lengths[..., None]] = -1
        self.kept_indices[layer_idx] = indices
        if scores is not None:
            self.scores[layer_idx] = scores.detach().to("cpu", torch.float32)

    def kept_mask(self, layer_idx: int) -> torch.Tensor:
        """``(batch, kv_heads, n)`` bool: which prefilled tokens ``layer_idx`` kept (needs ``record_kept=True``)."""
        if layer_idx not in self.kept_indices:
            recorded = sorted(self.kept_indices)
            hint = "" if self.record_kept else " (the press ran without record_kept=True)"
            raise KeyError(f"no kept tokens recorded for layer {layer_idx}{hint}; recorded layers: {recorded}")
        indices = self.kept_indices[layer_idx]
        b, h, _ = indices.shape
        mask = torch.zeros(b, h, self.original_lengths[layer_idx] + 1, dtype=torch.bool)
        mask.scatter_(-1, torch.where(indices < 0, mask.shape[-1] - 1, indices), True)
        return mask[..., :-1]  # the extra slot absorbed the -1 padding

    @property
    def compressed_layers(self) -> list[int]:
        """Indices of the layers that were compressed, in order."""
        return sorted(self.kept_lengths)

    def mean_kept(self, layer_idx: int) -> float:
        """Mean number of tokens kept per (sequence, kv-head) in ``layer_idx``."""
        return self.kept_lengths[layer_idx].double().mean().item()

    @property
    def compression_ratio(self) -> float:
        """Achieved fraction of removed tokens over all compressed layers, heads and sequences."""
        if not self.kept_lengths:
            return 0.0
        kept = sum(v.double().mean().item() for v in self.kept_lengths.values())
        total = sum(self.original_lengths[i] for i in self.kept_lengths)
        return 1.0 - kept / total
