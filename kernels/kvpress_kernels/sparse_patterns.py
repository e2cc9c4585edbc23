"""MInference's three head patterns as lists of key blocks per query block, for :func:`block_sparse_attention`.

- A-shape: the first ``sink_blocks`` blocks and the ``local_blocks`` blocks up to the query's own.
- Vertical-slash: the key columns and the diagonals (offsets ``query - key``) that the last ``last_q`` queries attend
  to most, estimated online from their softmax; each query block reads the blocks those columns and diagonals cross.
- Block-sparse: the ``top_blocks`` key blocks whose mean-pooled key scores highest against the query block's
  mean-pooled query (the query's own block always among them).

Every builder returns ``(block_index, block_count)``: ``(B, H, n_qb, max_blocks)`` int32 increasing key-block indices
and ``(B, H, n_qb)`` int32 counts, from a ``(B, H, n_qb, n_kb)`` boolean block mask (:func:`mask_to_blocks`).
"""

from __future__ import annotations

import torch

__all__ = [
    "a_shape_blocks",
    "a_shape_mask",
    "block_sparse_blocks",
    "block_sparse_mask",
    "mask_to_blocks",
    "vertical_slash_blocks",
    "vertical_slash_mask",
]


def _causal_blocks(n_qb: int, device) -> torch.Tensor:
    """``(n_qb, n_qb)`` bool: key block ``j`` can hold a visible key for query block ``i`` (``j <= i``)."""
    return torch.ones(n_qb, n_qb, dtype=torch.bool, device=device).tril()


def mask_to_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, n_qb, n_kb)`` bool block mask to ``(block_index, block_count)``, indices increasing."""
    count = mask.sum(-1, dtype=torch.int32)
    width = max(1, int(count.max())) if count.numel() else 1
    # A stable sort of "not listed" puts the listed blocks first, in increasing order.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), count


def a_shape_mask(n: int, block_size: int, sink_blocks: int = 1, local_blocks: int = 4, device=None) -> torch.Tensor:
    """``(n_qb, n_qb)`` block mask of sinks plus a local band: query block ``i`` reads blocks ``< sink_blocks`` and
    ``(i - local_blocks, i]``."""
    if sink_blocks < 0 or local_blocks < 1:
        raise ValueError(f"sink_blocks must be >= 0 and local_blocks >= 1, got {sink_blocks} and {local_blocks}")
    n_qb = -(-n // block_size)
    i = torch.arange(n_qb, device=device)[:, None]
    j = torch.arange(n_qb, device=device)[None, :]
    return ((j < sink_blocks) | (j > i - local_blocks)) & (j <= i)


def a_shape_blocks(batch: int, heads: int, n: int, block_size: int, sink_blocks: int = 1, local_blocks: int = 4,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`a_shape_mask` for every batch row and head, as block lists."""
    mask = a_shape_mask(n, block_size, sink_blocks, local_blocks, device)
    return mask_to_blocks(mask.expand(batch, heads, *mask.shape))


def _last_query_attention(q: torch.Tensor, k: torch.Tensor, scale: float, last_q: int) -> torch.Tensor:
    """``(B, Hq, last_q, n)`` float32 softmax of the last ``last_q`` queries over every key (causal)."""
    B, Hq, n, _ = q.shape
    groups = Hq // k.shape[1]
    tail = q[:, :, n - last_q :].float()
    logits = tail @ k.float().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    pos = torch.arange(n - last_q, n, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(n, device=q.device)[None, :] > pos, float("-inf"))
    return logits.softmax(-1)


def vertical_slash_blocks(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, n_vertical: int,
                          n_slash: int, last_q: int = 64) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The ``n_vertical`` key columns and ``n_slash`` diagonals the last ``last_q`` queries weigh most (the first
    column and the main diagonal always among them), as the blocks they cross in each query block.

    ``q`` ``(B, Hq, n, D)``, ``k`` ``(B, Hkv, n, D)``: the layer's post-RoPE queries and keys.
    """
    return mask_to_blocks(vertical_slash_mask(q, k, scale, block_size, n_vertical, n_slash, last_q))


def vertical_slash_mask(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, n_vertical: int,
                        n_slash: int, last_q: int = 64) -> torch.Tensor:  # fmt: skip
    """The ``(B, Hq, n_qb, n_qb)`` block mask of :func:`vertical_slash_blocks`."""
    B, Hq, n, _ = q.shape
    last_q = min(last_q, n)
    weights = _last_query_attention(q, k, scale, last_q)  # (B, Hq, last_q, n)
    vertical = weights.sum(2)
    vertical[..., 0] = float("inf")
    # Diagonal offset of (query p, key j) is p - j >= 0; weights of masked keys are 0.
    offsets = (torch.arange(n - last_q, n, device=q.device)[:, None] - torch.arange(n, device=q.device)).clamp(min=0)
    slash = torch.zeros(B, Hq, n, device=q.device).scatter_add_(2, offsets.flatten().expand(B, Hq, -1),
                                                                weights.flatten(2))  # fmt: skip
    slash[..., 0] = float("inf")
    columns = vertical.topk(min(n_vertical, n), -1).indices  # (B, Hq, V)
    diagonals = slash.topk(min(n_slash, n), -1).indices  # (B, Hq, S)
    n_qb = -(-n // block_size)
    # One spare column takes the blocks that fall before the first (negative indices).
    mask = torch.zeros(B, Hq, n_qb, n_qb + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(3, (columns // block_size)[:, :, None, :].expand(B, Hq, n_qb, -1), True)
    # Rows [i * bs, (i + 1) * bs) meet diagonal o at keys [i * bs - o, (i + 1) * bs - 1 - o]: at most two blocks.
    starts = torch.arange(n_qb, device=q.device)[:, None] * block_size  # (n_qb, 1)
    for edge in (starts - diagonals[..., None, :], starts + block_size - 1 - diagonals[..., None, :]):
        kb = edge.div(block_size, rounding_mode="floor")  # (B, Hq, n_qb, S)
        mask.scatter_(3, torch.where(kb >= 0, kb, n_qb), True)
    return mask[..., :n_qb] & _causal_blocks(n_qb, q.device)


def block_sparse_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_blocks`` key blocks per query block by mean-pooled ``q . k`` (causal; the query's own block always
    among them)."""
    return mask_to_blocks(block_sparse_mask(q, k, block_size, top_blocks))


def block_sparse_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, top_blocks: int) -> torch.Tensor:
    """The ``(B, Hq, n_qb, n_qb)`` block mask of :func:`block_sparse_blocks`."""
    B, Hq, n, D = q.shape
    groups = Hq // k.shape[1]
    n_qb = -(-n // block_size)
    pad = n_qb * block_size - n
    counts = torch.full((n_qb,), float(block_size), device=q.device)
    counts[-1] = block_size - pad
    q_pool = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).unflatten(2, (n_qb, block_size)).sum(3)
    k_pool = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).unflatten(2, (n_qb, block_size)).sum(3)
    q_pool, k_pool = q_pool / counts[:, None], (k_pool / counts[:, None]).repeat_interleave(groups, 1)
    causal = _causal_blocks(n_qb, q.device)
    scores = (q_pool @ k_pool.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
    scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    chosen = scores.topk(min(top_blocks, n_qb), -1).indices
    mask = torch.zeros(B, Hq, n_qb, n_qb, dtype=torch.bool, device=q.device).scatter_(3, chosen, True)
    return mask & causal
