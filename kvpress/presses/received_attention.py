"""Attention each cached key receives from a run of queries, computed block by block (never the full matrix)."""

from __future__ import annotations

import torch

# Query rows per block: bounds the float32 logits held at once to about 2**27 numbers (512 MiB).
_BLOCK_ELEMENTS = 2**27


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, how: str) -> torch.Tensor:
    """Softmax weight that each key receives, reduced over the queries: ``(batch, heads, n)`` float32.

    Args:
        queries: ``(batch, heads, m, head_dim)`` post-RoPE queries of the last ``m`` positions of the sequence whose
            ``n`` keys are ``keys`` ``(batch, kv_heads, n, head_dim)``: query ``j`` sees keys ``0 .. n - m + j``
            (causal). Query head ``h`` reads kv head ``h // (heads // kv_heads)``.
        scaling: the attention's logit scale (``module.scaling``).
        how: ``"max"`` (largest weight over the queries) or ``"sum"``.
    """
    if how not in ("max", "sum"):
        raise ValueError(f"how must be 'max' or 'sum', got {how!r}")
    b, n_q, m, d = queries.shape
    n_kv, n = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    q = queries.view(b, n_kv, groups, m, d).to(keys.dtype)
    k = keys[:, :, None]  # (b, n_kv, 1, n, d): the group's query heads share it, no copy
    out = torch.zeros(b, n_kv, groups, n, device=keys.device, dtype=torch.float32)
    block = max(1, min(m, _BLOCK_ELEMENTS // max(1, b * n_q * n)))
    for start in range(0, m, block):
        end = min(m, start + block)
        logits = torch.matmul(q[:, :, :, start:end], k.transpose(-1, -2)).float() * scaling  # (b, kv, g, blk, n)
        rows = torch.arange(n - m + start, n - m + end, device=keys.device)
        future = torch.arange(n, device=keys.device)[None, :] > rows[:, None]
        weights = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)
        if how == "max":
            out = torch.maximum(out, weights.amax(dim=-2))
        else:
            out += weights.sum(dim=-2)
    return out.view(b, n_q, n)
