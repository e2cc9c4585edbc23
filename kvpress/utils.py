"""Model-agnostic helpers: finding attention layers, recomputing queries, RoPE algebra, group reductions."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model``, ordered by ``layer_idx``.

    A module counts as an attention layer when it carries ``layer_idx``, ``head_dim`` and an output projection
    ``o_proj`` (true of every decoder in transformers that uses the attention-function registry).
    """
    found = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "head_dim") and hasattr(m, "o_proj") and hasattr(m, "config")
    ]
    if not found:
        raise ValueError(
            f"no attention layers found in {type(model).__name__}: expected modules with `layer_idx`, `head_dim` and "
            "`o_proj` (transformers decoder models such as Llama, Mistral, Qwen2/3, Phi3, Gemma3)"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def is_sliding_layer(module: nn.Module) -> bool:
    """Whether an attention module slides over a bounded window (presses leave such layers as they are)."""
    return bool(getattr(module, "sliding_window", None) or getattr(module, "is_sliding", False))


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model's config selects (``"eager"``, ``"sdpa"``, ...)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def layer_types(config) -> list[str]:
    """Attention kind of every layer, as transformers' caches see it: ``config.layer_types``, or when absent,
    ``"sliding_attention"`` everywhere if ``sliding_window`` is set and ``"full_attention"`` otherwise."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def kv_geometry(config) -> tuple[int, int]:
    """``(head_dim, kv_heads)`` of a model config (its text decoder's, for multimodal configs)."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if get_text is not None else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return int(head_dim), int(kv_heads)


def full_attention_layer_indices(config) -> list[int]:
    """Indices of the layers that attend over the whole context: all but the sliding-window ones of
    :func:`layer_types` (presses compress exactly these; sliding-window layers keep their own bounded window)."""
    return [i for i, kind in enumerate(layer_types(config)) if kind != "sliding_attention"]


def num_heads(module: nn.Module) -> tuple[int, int]:
    """``(query heads, kv heads)`` of an attention module."""
    cfg = module.config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    return n_q, n_kv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation: ``(x1, x2) -> (-x2, x1)`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` (``(batch, heads, seq, head_dim)``) by the angles in ``cos``/``sin`` (``(batch, seq, rot_dim)``).

    Supports partial rotary embeddings (``rot_dim < head_dim``: the remaining channels pass through). With
    ``inverse=True`` the rotation is undone (the model's attention scaling factor in ``cos``/``sin`` is left applied
    once, as in the forward direction, so ``apply_rope(apply_rope(x), inverse=True) == scale**2 * x``).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def pre_rope_query_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries ``(batch, heads, seq, head_dim)`` recomputed from ``hidden_states`` ``(batch, seq, hidden)``.

    Uses only the module's own projections and norms (``q_proj`` or the query slice of a fused ``qkv_proj``, then
    ``q_norm`` when the architecture has one), so no model code is duplicated per architecture.
    """
    bsz, seq, _ = hidden_states.shape
    n_q, _ = num_heads(module)
    d = module.head_dim
    if hasattr(module, "q_proj"):
        q = module.q_proj(hidden_states)
    elif hasattr(module, "qkv_proj"):
        q = module.qkv_proj(hidden_states)[..., : n_q * d]
    else:
        raise ValueError(f"{type(module).__name__} has neither `q_proj` nor `qkv_proj`; cannot recompute queries")
    q = q.view(bsz, seq, n_q, d)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    return q.transpose(1, 2)


def query_states(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Recompute post-RoPE queries ``(batch, heads, seq, head_dim)`` for ``hidden_states`` ``(batch, seq, hidden)``.

    The :func:`pre_rope_query_states`, rotated by the last ``seq`` positions of ``position_embeddings``.
    """
    seq = hidden_states.shape[1]
    cos, sin = position_embeddings
    return apply_rope(pre_rope_query_states(module, hidden_states), cos[:, -seq:], sin[:, -seq:])


def unrotated_keys(keys: torch.Tensor, position_embeddings, who: str) -> torch.Tensor:
    """Pre-RoPE keys ``(batch, kv_heads, n, head_dim)`` of the post-RoPE ``keys`` of a one-forward prefill, whose
    ``position_embeddings`` ``(cos, sin)`` ``(batch, n, rot_dim)`` rotated them (up to the rotary attention factor,
    a constant). ``who`` names the caller in the ``ValueError`` raised when the rotations do not cover the keys
    (keys kept from earlier forwards, whose positions the forward does not carry)."""
    cos, sin = position_embeddings
    if cos.shape[-2] != keys.shape[2]:
        raise ValueError(
            f"{who} reads pre-RoPE keys, un-rotated with the positions of the forward that wrote them; the layer holds "
            f"{keys.shape[2]} keys but the forward carries {cos.shape[-2]} positions (a chunked prefill or a decode "
            "step): use it on a one-forward prefill"
        )
    return apply_rope(keys.float(), cos.float(), sin.float(), inverse=True)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(batch, kv_heads, ...)`` -> ``(batch, kv_heads * groups, ...)``, each kv head repeated for its group."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def group_reduce(x: torch.Tensor, n_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Reduce per-query-head values ``(batch, heads, ...)`` to per-kv-head ``(batch, kv_heads, ...)``.

    Query head ``h`` belongs to kv head ``h // group`` (the layout of grouped-query attention).
    """
    b, h = x.shape[:2]
    x = x.view(b, n_kv_heads, h // n_kv_heads, *x.shape[2:])
    if how == "mean":
        return x.mean(dim=2)
    if how == "max":
        return x.amax(dim=2)
    if how == "sum":
        return x.sum(dim=2)
    raise ValueError(f"unknown group reduction {how!r}; accepted: 'mean', 'max', 'sum'")


def window_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings,
    window: int,
) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all keys, in float32.

    Args:
        hidden_states: ``(batch, n, hidden)``; keys: ``(batch, kv_heads, n, head_dim)`` post-RoPE.
    Returns:
        ``(batch, heads, window, n)`` float32 weights, causal inside the final ``window x window`` block.
    """
    b, n_kv, n, d = keys.shape
    q = query_states(module, hidden_states[:, -window:], position_embeddings)
    n_q = q.shape[1]
    # Group the queries of each kv head instead of repeating the keys: no copy of the (long) key tensor.
    q = q.reshape(b, n_kv, (n_q // n_kv) * window, d).to(keys.dtype)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float().view(b, n_q, window, n) * module.scaling
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n - window :].masked_fill_(future, float("-inf"))
    return logits.softmax(dim=-1)


_WARNED_LENGTHS: set[tuple[str, int, int]] = set()


def warn_past_positions(config, n_tokens: int) -> None:
    """Warn once per (model type, prompt length) when a prompt of ``n_tokens`` runs past the model's
    ``max_position_embeddings``: the model was not trained on those positions (rotary embeddings extrapolate without
    an error), and compressing the cache does not change a token's position."""
    text = config.get_text_config(decoder=True)
    limit = getattr(text, "max_position_embeddings", None)
    key = (type(text).__name__, int(n_tokens), int(limit or 0))
    if limit is None or n_tokens <= limit or key in _WARNED_LENGTHS:
        return
    _WARNED_LENGTHS.add(key)
    warnings.warn(
        f"the prompt holds {n_tokens} tokens, more than the model's max_position_embeddings={limit} "
        f"({type(text).__name__}): positions past {limit} were not trained, so answers may degrade; compressing the "
        "cache keeps each token's position",
        UserWarning,
        stacklevel=3,
    )
