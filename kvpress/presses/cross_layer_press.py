"""`CrossLayerPress`: presses whose budget is shared by every layer (and head) of the model."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.layer_access import read_layer, write_layer
from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_budget, n_kept
from kvpress.presses.report import CompressionReport
from kvpress.presses.scorer_press import keep_per_head, keep_tokens, rank_key, top_positions

_PENDING = "cross_layer_pending"


@dataclass
class CrossLayerPress(BasePress):
    """Score every layer during the prefill, then compress them all at once when the forward ends.

    Each full-attention layer's hook stores its ``(batch, kv_heads, n)`` scores (:meth:`layer_scores`) and leaves the
    layer whole; once the last layer has run, :meth:`allocate` splits the model's budget (``kv_heads * k`` tokens per
    layer and sequence on average, ``k = round(n * (1 - compression_ratio))``, or ``target_size``) between layers
    and heads, and every layer keeps its heads' best tokens. Until then the prefill holds every layer uncompressed:
    peak memory is that of an uncompressed prefill, the price of a global choice. One-forward prefills only.

    Args:
        compression_ratio: fraction of the prefilled tokens removed, over the whole model, in ``[0, 1)``.
        target_size: tokens kept per (layer, kv head) on average, instead of ``compression_ratio``.
    """

    compression_ratio: float = 0.0
    target_size: int | None = None

    def __post_init__(self):
        check_budget(self.compression_ratio, self.target_size)

    # ---- what subclasses implement ----------------------------------------------------------------------------
    @abstractmethod
    def layer_scores(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor | None:
        """``(batch, kv_heads, n)`` importance of each prefilled token of one layer (``+inf``: kept whole), or
        ``None`` when the scores come from :meth:`complete_scores`."""

    def complete_scores(self, decoder, args, kwargs, cache, pending: dict, report) -> dict[int, torch.Tensor]:
        """``{layer_idx: scores}`` of every full-attention layer, from the layer hooks' ``pending`` results (a
        press that scores with forwards of its own runs them here, through ``decoder``, the decoder stack, called
        with the prefill's ``args`` and ``kwargs``). Default: ``pending``."""
        return pending

    def allocate(self, scores: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor] | None:
        """``{layer_idx: (batch, kv_heads) int64 kept counts}``, ``kv_heads * k * len(scores)`` per sequence in all
        (``None``: every token stays). Default: the best scores over every (layer, head, token) of the model."""
        n = next(iter(scores.values())).shape[-1]
        return None if k >= n else global_top_counts(scores, k)

    def per_head_layout(self) -> bool:
        """Whether heads of one layer may keep different counts (then the layers need a ``VarlenCache``)."""
        return True

    # ---- mechanics --------------------------------------------------------------------------------------------
    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        raise RuntimeError(f"{type(self).__name__} compresses every layer at the end of the prefill forward")

    def compress_prefill(self, module, cache, hidden_states, keys, values, attentions, kwargs, report) -> None:
        scores = self.layer_scores(module, hidden_states, keys, values, attentions, kwargs)
        report.state.setdefault(_PENDING, {})[module.layer_idx] = scores

    def finish_prefill(self, decoder, args, kwargs, cache, report: CompressionReport) -> None:
        pending = report.state.pop(_PENDING, None)
        if not pending:
            return
        n = read_layer(cache, next(iter(pending)))[0].shape[-2]
        scores = self.complete_scores(decoder, args, kwargs, cache, pending, report)
        k = n_kept(n, self.compression_ratio, self.target_size)
        counts = self.allocate(scores, k)
        for layer_idx in sorted(scores):
            keys, values = read_layer(cache, layer_idx)
            s = scores[layer_idx].float()
            if counts is None or bool((counts[layer_idx] >= n).all()):  # the budget holds every token
                kv = CompressedKV(keys, values, scores=s)
            elif self.per_head_layout():
                kv = keep_per_head(keys, values, s, counts[layer_idx].to(keys.device))
                write_layer(cache, layer_idx, kv)
            else:
                kv = keep_tokens(keys, values, top_positions(s, int(counts[layer_idx].max())), s)
                write_layer(cache, layer_idx, kv)
            report.record(layer_idx, n_tokens=n, lengths=kv.lengths, indices=kv.indices, scores=kv.scores)


def global_top_counts(scores: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """Kept counts ``{layer: (batch, heads)}`` of the ``heads * k * layers`` best of all ``scores`` ``{layer: (batch,
    heads, n)}`` per sequence, ``+inf`` first (:func:`~kvpress.presses.scorer_press.rank_key`)."""
    layers = sorted(scores)
    device = scores[layers[0]].device  # layers may sit on different devices (device_map)
    stacked = torch.stack([rank_key(scores[i].float().to(device)) for i in layers], dim=1)  # (b, L, h, n)
    b, n_layers, h, n = stacked.shape
    top = stacked.flatten(1).topk(n_layers * h * k, dim=-1).indices // n  # (b, L*h*k) flat (layer, head)
    counts = torch.zeros(b, n_layers * h, dtype=torch.long, device=top.device)
    counts = counts.scatter_add_(1, top, torch.ones_like(top)).unflatten(1, (n_layers, h))
    return {layer: counts[:, j] for j, layer in enumerate(layers)}
