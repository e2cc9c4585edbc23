"""An independent float64 reference for the presses that evict while decoding (H2O, Scissorhands, CAM).

:func:`run_reference` decodes greedily with a plain ``DynamicCache``; after every attention layer of every decode
forward a hook recomputes, in float64 and with transformers' own rotary code, the attention of the forward's new
tokens over the layer's cache, applies a rule (statistics update, selection, eviction) and rewrites the layer."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.generation import prefill
from kvpress.utils import attention_layers


def attention_f64(module, hidden, keys, position_embeddings):
    """(batch, kv_heads, q, n) float64 attention of the new tokens, averaged over each kv head's query heads."""
    b, n_q, _ = hidden.shape
    q = module.q_proj(hidden).view(b, n_q, -1, module.head_dim).transpose(1, 2).double()
    cos, sin = (t.double() for t in position_embeddings)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    h_kv, n = keys.shape[1], keys.shape[2]
    k = keys.double().repeat_interleave(q.shape[1] // h_kv, dim=1)
    logits = q @ k.transpose(-1, -2) * module.scaling
    mask = torch.ones(n_q, n, dtype=torch.bool).tril(n - n_q)
    p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return p.view(b, h_kv, -1, n_q, n).mean(2)


def keep_rule(score, n_keep, n_recent, n_sink=0):
    """Sinks, recent tokens, then the highest scores (the later of equal scores first); increasing positions."""
    b, h, n = score.shape
    out = torch.empty(b, h, n_keep, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            protected = [t for t in range(n) if t < n_sink or t >= n - n_recent]
            rest = sorted((t for t in range(n) if t not in protected), key=lambda t: (float(score[i, j, t]), t))
            chosen = protected + rest[len(rest) - (n_keep - len(protected)) :]
            out[i, j] = torch.tensor(sorted(chosen))
    return out


def run_reference(model, context, tail, steps, rule):
    """Greedy tokens with ``rule(layer_idx, keys, values, attention) -> (keys, values)`` applied after each decode
    forward's attention in every layer; returns (tokens, cache)."""
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, context, cache)

    def hook(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        attn = attention_f64(module, kwargs["hidden_states"], layer.keys, kwargs["position_embeddings"])
        layer.keys, layer.values = rule(module.layer_idx, layer.keys, layer.values, attn)
        return output

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_layers(model)]
    tokens, feed = [], tail
    try:
        with torch.no_grad(), compressed_attention(model):
            for _ in range(steps):
                n = feed.shape[1]
                pos = torch.arange(position, position + n)[None]
                logits = model(input_ids=feed, **cache_kwargs(model, cache), position_ids=pos).logits
                position += n
                feed = logits[:, -1:].argmax(-1)
                tokens.append(int(feed))
    finally:
        for h in handles:
            h.remove()
    return tokens, cache
