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

    Returns ``{layer_idx: SimpleNamespace(keys, values, scores, hidden, cos, sin, module)}``, filled as the press
    runs: ``keys``/``values`` ``(batch, kv_heads, n, head_dim)`` as the press received them, ``scores`` ``(batch,
    kv_heads, n)``, the layer input ``hidden`` ``(batch, n, hidden)`` and the forward's rotary ``cos``/``sin``.
    """
    seen, score = {}, press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        out = score(module, hidden_states, keys, values, attentions, kwargs)
        cos, sin = kwargs["position_embeddings"]
        seen[module.layer_idx] = SimpleNamespace(keys=keys.clone(), values=values.clone(), scores=out.clone(),
                                                 hidden=hidden_states.clone(), cos=cos.clone(), sin=sin.clone(),
                                                 module=module)  # fmt: skip
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


def queries_f64(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries ``(batch, heads, n, head_dim)`` in float64 from the layer input, through the module's own
    weights (its query norm, where it has one, in float32)."""
    b, n, _ = hidden.shape
    d = module.head_dim
    if hasattr(module, "q_proj"):
        q = torch.nn.functional.linear(hidden.double(), module.q_proj.weight.double(),
                                       None if module.q_proj.bias is None else module.q_proj.bias.double())  # fmt: skip
    else:  # fused projection (Phi-3): the query rows come first
        w = module.qkv_proj.weight.double()
        q = hidden.double() @ w[: module.config.num_attention_heads * d].T
    q = q.view(b, n, -1, d)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q.float()).double()
    return rotate_f64(q.transpose(1, 2), cos, sin)


def rotate_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE in float64 on ``x`` ``(batch, heads, n, head_dim)`` by ``cos``/``sin`` ``(batch, n, rot)`` (partial
    rotary: the channels past ``rot`` pass through); ``inverse`` turns the other way."""
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    rot = cos.shape[-1]
    a, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = torch.cat([-a[..., half:], a[..., :half]], dim=-1)
    out = a * cos + turned * (-sin if inverse else sin)
    return torch.cat([out, rest], dim=-1)


def assert_keeps_top(cache_keys: torch.Tensor, full_keys: torch.Tensor, reference: torch.Tensor, tol: float = 1e-6):
    """The rows ``cache_keys`` kept of ``full_keys`` are the top ``reference`` scores ``(batch, heads, n)`` of each
    head: no dropped token scores above a kept one (beyond ``tol``, for ties)."""
    kept = (cache_keys[:, :, :, None] == full_keys[:, :, None]).all(-1).any(2)
    assert torch.equal(kept.sum(-1), torch.full(kept.shape[:2], cache_keys.shape[2]))
    lowest_kept = reference.masked_fill(~kept, float("inf")).amin(-1)
    highest_dropped = reference.masked_fill(kept, float("-inf")).amax(-1)
    assert bool((highest_dropped <= lowest_kept + tol).all())
