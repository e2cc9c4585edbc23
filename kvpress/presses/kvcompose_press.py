"""`KVComposePress`: composite tokens, the same count for every head of a layer, budgets shared across layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.capabilities import Capabilities
from kvpress.presses.cross_layer_press import CrossLayerPress
from kvpress.presses.received_attention import received_attention
from kvpress.utils import group_reduce, query_states

_REDUCTIONS = ("mean", "max")


@dataclass
class KVComposePress(CrossLayerPress):
    """Attention-guided composite tokens with a budget allocated across layers (Akulov et al., 2025, "KVCompose:
    Efficient Structured KV Cache Compression with Composite Tokens", arXiv 2509.05165).

    A query head scores each prompt token by the mean softmax weight it receives from the prompt queries that see
    it (causal: token ``i`` from the ``n - i`` queries at or after it); a kv head reduces its group's scores by
    ``head_reduction``. Each kv head ranks its tokens on its own; the ``j``-th *composite token* of a layer is the
    ``j``-th best token of every head, scored by ``composite_reduction`` over the heads' ``j``-th best scores. The
    model's budget goes to the best composite tokens over all layers (ranked on the batch mean, so every sequence
    of a batch keeps the same count per layer): layers keep different counts, the heads of a layer the same count
    of their own best tokens. The cache stays dense (no head-variable storage).

    Prefill cost: every prompt query against every key, in each layer, in blocks of bounded memory (the scores need
    the whole attention matrix, which sdpa does not return); the layers stay uncompressed until the forward ends
    (:class:`~kvpress.presses.cross_layer_press.CrossLayerPress`).

    Args:
        head_reduction: ``"max"`` or ``"mean"`` over the query heads of a kv head.
        composite_reduction: ``"mean"`` or ``"max"`` over a layer's kv heads of their ``j``-th best scores.
    """

    head_reduction: str = "max"
    composite_reduction: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        for name in ("head_reduction", "composite_reduction"):
            if getattr(self, name) not in _REDUCTIONS:
                raise ValueError(f"{name} must be one of {_REDUCTIONS}, got {getattr(self, name)!r}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def per_head_layout(self) -> bool:
        return False

    def layer_scores(self, module, hidden_states, keys, values, attentions, kwargs):
        q = query_states(module, hidden_states, kwargs["position_embeddings"])
        n = keys.shape[2]
        seen_by = torch.arange(n, 0, -1, device=keys.device, dtype=torch.float32)  # queries at or after each token
        mean = received_attention(q, keys, module.scaling, "sum") / seen_by
        return group_reduce(mean, keys.shape[1], self.head_reduction)

    def allocate(self, scores, k):
        layers = sorted(scores)
        if k >= scores[layers[0]].shape[-1]:
            return None
        composite = []
        for i in layers:
            ranked = scores[i].float().sort(dim=-1, descending=True).values  # (b, h, n): j-th best per head
            reduced = ranked.mean(dim=1) if self.composite_reduction == "mean" else ranked.amax(dim=1)
            composite.append(reduced.mean(dim=0).to(scores[layers[0]].device))  # (n,), on the batch mean
        stacked = torch.stack(composite)  # (L, n), decreasing along n: a layer's count is its entries in the top
        n = stacked.shape[1]
        top = stacked.flatten().topk(len(layers) * k).indices // n
        counts = torch.bincount(top, minlength=len(layers))
        b, h = scores[layers[0]].shape[:2]
        return {layer: counts[j].expand(b, h).clone() for j, layer in enumerate(layers)}
