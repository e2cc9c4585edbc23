"""Small helpers shared by the single-press tests (random, streaming, observed attention, TOVA, expected attention).

- :func:`record_scores`: remember each layer's ``score`` inputs and output.
- :func:`prefill`: run the base model over ``ids`` under a press and return the compressed cache.
- :func:`full_layers`: indices of the layers whose cache holds every token (not sliding-window layers).
- :func:`kept_positions`: which original positions a compressed cache kept (rows matched exactly).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.utils import attention_layers


def record_scores(press) -> dict:
    """Make ``press`` remember each layer's ``score`` inputs and output (patched on the instance only).

    Returns ``{layer_idx: SimpleNamespace(keys, values, scores)}``, filled as the press runs: ``keys``/``values``
    ``(batch, kv_heads, n, head_dim)`` as the press received them, ``scores`` ``(batch, kv_heads, n)``.
    """
    seen, score = {}, press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        out = score(module, hidden_states, keys, values, attentions, kwargs)
        seen[module.layer_idx] = SimpleNamespace(keys=keys.clone(), values=values.clone(), scores=out.clone())
        return out

    press.score = recording
    return seen


def prefill(model, press, ids) -> DynamicCache:
    """Prefill ``ids`` ``(batch, n)`` through ``model.model`` under ``press``; the compressed cache, layers
    ``(batch, kv_heads, kept, head_dim)``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return cache


def full_layers(model) -> list[int]:
    """Layer indices of the attention layers without a sliding window (their cache holds every token)."""
    return [m.layer_idx for m in attention_layers(model) if not getattr(m, "sliding_window", None)]


def kept_positions(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Sorted positions ``(batch, heads, k)`` of the rows of ``kept`` ``(batch, heads, k, d)`` inside ``full``
    ``(batch, heads, n, d)`` (each row found exactly once)."""
    match = (kept[:, :, :, None] == full[:, :, None]).all(-1)
    assert match.sum(-1).eq(1).all()
    return match.float().argmax(-1).sort(-1).values
