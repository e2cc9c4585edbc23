"""Attention maps: how much each query of a prompt attends to each earlier token, per layer and head."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import read_layer
from kvpress.utils import attention_layers, window_attention
from kvpress.visualization._plotting import axes, log_norm, mark_spans


@torch.no_grad()
def attention_maps(
    model: nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None, last_queries: int | None = None
) -> dict[int, torch.Tensor]:
    """Softmax attention weights of every query over every key of one prompt, per layer.

    Recomputed from each layer's input and cached keys (``softmax(q k^T * scaling)`` with the causal mask, float32),
    so any attention implementation works; models that add logit soft-capping or sliding windows to that formula are
    drawn without them.

    Args:
        input_ids: ``(1, n)`` token ids.
        layers: attention layer indices to return (default: all).
        last_queries: keep only the rows of the last ``last_queries`` queries (default: all ``n``), which bounds the
            memory of long prompts: ``heads * last_queries * n`` floats per layer.

    Returns:
        ``{layer_idx: (heads, q, n) float32}`` on CPU, ``q = last_queries or n``; row ``i`` is query
        ``n - q + i``'s distribution over the keys up to it.
    """
    modules = attention_layers(model)
    layers = list(range(len(modules))) if layers is None else list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(modules)]
    if bad:
        raise ValueError(f"layers must be attention layer indices in [0, {len(modules)}), got {bad}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("input_ids must be a (1, n) tensor of token ids (one prompt)")
    n = input_ids.shape[1]
    if last_queries is not None and (
        isinstance(last_queries, bool) or not isinstance(last_queries, int) or not 1 <= last_queries <= n
    ):
        raise ValueError(f"last_queries must be None (every query) or an int in [1, {n}], got {last_queries!r}")
    inputs: dict[int, tuple] = {}

    def capture(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        inputs[module.layer_idx] = (hidden, kwargs["position_embeddings"])

    handles = [modules[i].register_forward_pre_hook(capture, with_kwargs=True) for i in layers]
    cache = DynamicCache(config=model.config)
    base = model.base_model
    try:
        base(input_ids=input_ids, **cache_kwargs(base, cache), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for i in layers:
        hidden, position_embeddings = inputs[i]
        keys, _ = read_layer(cache, i)
        maps[i] = window_attention(modules[i], hidden, keys, position_embeddings, last_queries or n)[0].cpu()
    return maps


def plot_attention_map(
    weights: torch.Tensor,
    head: int | None = None,
    spans: dict[str, tuple[int, int]] | None = None,
    title: str | None = None,
    ax=None,
    vmin: float = 1e-4,
):
    """Draw one attention map (queries down, keys across) on a log colour scale.

    Args:
        weights: ``(heads, n, n)`` from :func:`attention_maps`, or one head's ``(n, n)``.
        head: the head to draw; ``None`` averages over heads.
        spans: ``{name: (start, end)}`` key ranges to mark (by their edges, so the colours stay true).
        vmin: smallest weight drawn in colour (the log scale starts there; masked future cells stay white).
    Returns:
        The matplotlib figure.
    """
    if weights.dim() == 3:
        if head is not None and not 0 <= head < weights.shape[0]:
            raise ValueError(f"head must be in [0, {weights.shape[0]}) or None (mean over heads), got {head!r}")
        weights = weights.mean(0) if head is None else weights[head]
    elif weights.dim() != 2 or head is not None:
        raise ValueError(
            "weights must be (heads, n, n) (with head=None or an index) or one head's (n, n) with head=None"
        )
    n = weights.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    shown = weights.float().clamp_min(vmin).masked_fill(future, float("nan"))
    fig, ax = axes(ax, (6.5, 5.5))
    image = ax.imshow(shown.numpy(), cmap="viridis", norm=log_norm(vmin, 1.0), interpolation="none")
    fig.colorbar(image, ax=ax, label="attention weight")
    ax.set_xlabel("key position (token)")
    ax.set_ylabel("query position (token)")
    mark_spans(ax, spans, fill=False)
    ax.set_title(title or ("mean over heads" if head is None else f"head {head}"))
    return fig
