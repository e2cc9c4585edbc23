"""The ``"kvpress"`` attention function, registered with transformers' attention-function registry.

After compression, layers hold different numbers of tokens (per layer, and per head for head-variable caches), so
the single mask transformers builds per forward cannot fit every layer. Under the ``"kvpress"`` implementation no
mask is built (it has no entry in the mask registry); each layer derives its own from the shapes instead: the
``q_len`` new tokens are the last ones of the layer's cache, attend causally among themselves and see every cached
token before them (within ``sliding_window`` for sliding layers). Cache layers that store keys in their own layout
return an object with an ``attend`` method from ``update``, and the function hands the query to it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

ATTENTION_NAME = "kvpress"


def causal_suffix_mask(
    q_len: int, kv_len: int, device: torch.device, sliding_window: int | None = None
) -> torch.Tensor | None:
    """Boolean ``(q_len, kv_len)`` mask (True = attend) for ``q_len`` new tokens that end a cache of ``kv_len``.

    Returns ``None`` when every query may see every key (single token, no window cutting in).
    """
    if q_len == 1 and (not sliding_window or kv_len <= sliding_window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def kvpress_attention(
    module: nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``(batch, heads, q_len, head_dim)`` over a compressed layer.

    Returns ``(output (batch, q_len, heads, head_dim), None)`` as transformers' attention functions do.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by the 'kvpress' attention function")
    if hasattr(key, "attend"):
        return key.attend(query, scaling=scaling, sliding_window=sliding_window), None
    if attention_mask is not None:
        # A caller-built mask is sized for one layer; it cannot describe compressed layers of other lengths.
        raise ValueError("the 'kvpress' attention function builds its own masks; pass attention_mask=None")
    return suffix_attention(query, key, value, scaling, sliding_window), None


def suffix_attention(query, key, value, scaling: float | None, sliding_window: int | None = None) -> torch.Tensor:
    """Dense attention of ``query`` ``(batch, heads, q_len, head_dim)``, the newest ``q_len`` tokens, over ``key`` and
    ``value`` ``(batch, kv_heads, kv_len, head_dim)`` (:func:`causal_suffix_mask`; GQA by head groups); returns
    ``(batch, q_len, heads, head_dim)``."""
    mask = causal_suffix_mask(query.shape[2], key.shape[2], query.device, sliding_window)
    groups = query.shape[1] // key.shape[1]
    if mask is not None and groups > 1 and query.shape[2] > query.shape[3]:
        # sdpa's fused kernels take a mask or grouped heads, not both; its fallback materializes q_len x kv_len
        # weights per query head, which for a long chunk (q_len > head_dim) outweighs repeating the keys and values.
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        groups = 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1, dropout_p=0.0
    )
    return out.transpose(1, 2).contiguous()


def register_attention() -> str:
    """Register ``"kvpress"`` with transformers (idempotent) and return its name."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, kvpress_attention)
    return ATTENTION_NAME


@contextlib.contextmanager
def compressed_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the ``"kvpress"`` attention function inside the block, restoring its own afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
