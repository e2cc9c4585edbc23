"""`HeadKVPress`: one global budget shared by every head of every layer, split by static head importance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpress.presses.capabilities import Capabilities
from kvpress.presses.head_importance import importance_table
from kvpress.presses.scorer_press import keep_per_head
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import attention_layers, full_attention_layer_indices, kv_geometry, num_heads


def headkv_budgets(importance: torch.Tensor, average: int, cap: int, beta: float, temperature: float) -> torch.Tensor:
    """Ranked tokens per head ``(layers, heads)`` int64, summing to ``layers * heads * average`` (when it fits).

    HeadKV's allocation (Fu et al., 2025): with ``T = layers * heads * average`` and ``p`` the heads' importance
    ``p ** temperature`` normalised to sum to 1, head ``h`` gets ``average * (1 - 1 / beta) + p_h * T / beta``:
    every head keeps a floor, and a shared pool of ``T / beta`` tokens follows importance. A head is never given more
    than ``cap`` (the tokens it has): the excess goes to the other heads in proportion to their allocation, so the
    total is spent (the reference implementation leaves it unused). Real values are rounded by largest remainders.

    Args:
        importance: ``(layers, heads)`` non-negative scores.
        average: mean ranked budget per head.
        cap: most tokens a head can keep.
        beta: ``> 1``; larger values shrink the shared pool (more uniform budgets).
        temperature: exponent applied to the importance before normalising.
    """
    p = importance.double().clamp_min(0) ** temperature
    p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / p.numel())
    total = importance.numel() * average
    if total >= importance.numel() * cap:
        return torch.full(importance.shape, cap, dtype=torch.long)
    alloc = average * (1 - 1 / beta) + p * (total / beta)
    # Water-filling: heads over the cap give their excess to the others, in proportion to what those already have.
    for _ in range(importance.numel()):
        over = alloc > cap
        if not bool(over.any()):
            break
        excess = float((alloc[over] - cap).sum())
        alloc[over] = cap
        open_heads = alloc < cap
        alloc[open_heads] += excess * alloc[open_heads] / alloc[open_heads].sum()
    budgets = alloc.floor().long().clamp(0, cap)
    missing = total - int(budgets.sum())
    if missing > 0:
        remainder = (alloc - budgets).masked_fill(budgets >= cap, -1.0).flatten()
        budgets.view(-1)[remainder.topk(missing).indices] += 1
    return budgets


@dataclass
class HeadKVPress(SnapKVPress):
    """SnapKV selection inside each head, with per-head budgets from static head-importance scores (Fu et al., 2025,
    "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and Reasoning", arXiv
    2410.19258).

    The budget of the whole model, ``k`` tokens per (layer, kv-head) on average (``k`` from ``compression_ratio`` or
    ``target_size``), is shared by every kv head of every compressed layer. Each head keeps its observation window
    plus its share of the ``k - window_size`` ranked tokens per head on average, from :func:`headkv_budgets`. A kv
    head's importance is the mean of its query heads' scores. Heads then hold different lengths, which a
    :class:`~kvpress.cache.VarlenCache` stores exactly (the pipeline picks it).

    Args:
        scores: head importance of *this* model: the path of a file written by ``python -m kvpress.head_scores``
            (the needle-retrieval-and-reasoning probe), or the mapping itself (``{"layer-head": [score, ...]}``).
        beta: ``> 1``; the shared pool is ``1 / beta`` of the ranked budget, the rest is split evenly. The default,
            1.01, is the published runs' (nearly all of the budget follows importance); larger values are more
            uniform.
        temperature: exponent sharpening (``> 1``) or flattening (``< 1``) the importance before it is normalised.
    """

    scores: str | Path | dict = field(kw_only=True)
    beta: float = 1.01
    temperature: float = 1.0
    importance: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if self.scores is None:
            raise ValueError(
                "scores is required: a head-scores file written by `python -m kvpress.head_scores --model ... "
                "--output scores.json`, or its {'layer-head': [score, ...]} mapping"
            )
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 1:
            raise ValueError(
                f"beta must be a number > 1 (1 / beta of the budget follows importance), got {self.beta!r}"
            )
        temp = self.temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
            raise ValueError(f"temperature must be a positive number, got {temp!r}")
        self.importance = importance_table(self.scores)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(head_variable=True)

    def validate(self, model) -> None:
        super().validate(model)
        module = attention_layers(model)[0]
        expected = (len(attention_layers(model)), num_heads(module)[0])
        if tuple(self.importance.shape) != expected:
            raise ValueError(
                f"scores cover {self.importance.shape[0]} layers x {self.importance.shape[1]} heads, but the model "
                f"has {expected[0]} layers x {expected[1]} query heads; accepted: scores computed on this model "
                "(python -m kvpress.head_scores)"
            )

    def head_budgets(self, n_tokens: int, config) -> dict[int, torch.Tensor]:
        """Kept tokens of every kv head, window included: ``{layer: (kv_heads,)}`` for the compressed layers."""
        layers = full_attention_layer_indices(config)
        n_kv = kv_geometry(config)[1]
        table = self.importance[layers].view(len(layers), n_kv, -1).mean(-1)  # a kv head: mean of its query heads
        k = self.n_kept(n_tokens)
        window = min(self.window_size, k)  # a budget smaller than the window keeps the window's latest tokens
        ranked = headkv_budgets(table, k - window, n_tokens - window, self.beta, self.temperature)
        return {layer: ranked[i] + window for i, layer in enumerate(layers)}

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[-2]
        if self.n_kept(n) >= n:
            return keys, values
        lengths = self.head_budgets(n, module.config)[module.layer_idx].to(keys.device)
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        return keep_per_head(keys, values, scores, lengths.expand(keys.shape[0], -1))
