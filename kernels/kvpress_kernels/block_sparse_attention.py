"""Causal prefill attention over selected key blocks (MInference's dynamic sparse attention).

Each query block of ``block_size`` rows attends only to the key blocks listed for it (per batch row and query head),
with the causal mask applied inside every block. The pattern builders in ``sparse_patterns.py`` turn MInference's
three head patterns (A-shape, vertical-slash, block-sparse) into such lists; the kernel runs them all.
"""

from __future__ import annotations

import torch

from ._common import (
    TRITON_FLOAT_DTYPES,
    check_shape,
    check_tensor,
    ensure_launchable,
    next_pow2,
    tl,
    triton,
    use_triton,
)
from .varlen_attention import _LOG2E, _online_step, _qk

__all__ = ["block_sparse_attention", "block_token_mask", "reference_block_sparse_attention"]


def block_token_mask(block_index: torch.Tensor, block_count: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """``(B, H, n, n)`` bool: query ``i`` sees key ``j`` when ``j``'s block is listed for ``i``'s block and
    ``j <= i``."""
    B, H, n_qb, _ = block_index.shape
    n_kb = -(-n // block_size)
    listed = torch.arange(block_index.shape[-1], device=block_index.device) < block_count[..., None].long()
    blocks = torch.zeros(B, H, n_qb, n_kb + 1, dtype=torch.bool, device=block_index.device)
    target = torch.where(listed, block_index.long().clamp(0, n_kb), n_kb)  # unlisted slots land in a spare column
    blocks.scatter_(3, target, True)
    blocks = blocks[..., :n_kb]
    rows = blocks.repeat_interleave(block_size, 2)[:, :, :n]
    mask = rows.repeat_interleave(block_size, 3)[..., :n]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return mask & causal


def reference_block_sparse_attention(q, k, v, block_index, block_count, scale: float, block_size: int = 64):
    """Plain-torch :func:`block_sparse_attention` (float32 math, float64 for float64 inputs): a masked softmax over
    the listed blocks; a row that sees nothing outputs zeros."""
    groups = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = block_token_mask(block_index, block_count, q.shape[2], block_size)
    k, v = (x.to(acc).repeat_interleave(groups, 1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q.to(acc), k, v, attn_mask=mask, scale=scale)
    return out.nan_to_num(0.0).to(q.dtype)  # a row that sees nothing: 0


if triton is not None:

    @triton.jit
    def _block_sparse_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, out_ptr,
        q_b, q_h, q_t, q_d, k_b, k_h, k_t, k_d, v_b, v_h, v_t, v_d, i_b, i_h, i_q, i_j, c_b, c_h, c_q,
        o_b, o_h, o_t, o_d,
        HQ, N, D, GROUPS, qk_scale,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
    ):  # fmt: skip
        # Program (batch row * query head, query block): the listed key blocks, causal within each.
        bh = tl.program_id(0)
        qb = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        hk = h // GROUPS
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        r_ok = rows < N
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b.to(tl.int64) * q_b + h.to(tl.int64) * q_h + rows[:, None].to(tl.int64) * q_t
                    + d[None, :] * q_d, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        k_base = k_ptr + b.to(tl.int64) * k_b + hk.to(tl.int64) * k_h
        v_base = v_ptr + b.to(tl.int64) * v_b + hk.to(tl.int64) * v_h
        i_base = idx_ptr + b.to(tl.int64) * i_b + h.to(tl.int64) * i_h + qb.to(tl.int64) * i_q
        count = tl.load(cnt_ptr + b.to(tl.int64) * c_b + h.to(tl.int64) * c_h + qb.to(tl.int64) * c_q)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        n = tl.arange(0, BLOCK)
        for j in range(0, count):
            kb = tl.load(i_base + j * i_j)
            cols = kb * BLOCK + n
            c_ok = (cols < N) & (cols < (qb + 1) * BLOCK)  # blocks after the query block hold no visible key
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None].to(tl.int64) * k_t + d[None, :] * k_d, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * v_t + d[None, :] * v_d, mask=kv_mask, other=0.0)
            qk = _qk(q, k, IEEE_DOT) * qk_scale
            visible = r_ok[:, None] & c_ok[None, :] & (cols[None, :] <= rows[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + rows[:, None].to(tl.int64) * o_t
                 + d[None, :] * o_d, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    scale: float,
    block_size: int = 64,
) -> torch.Tensor:
    """Causal self-attention of a prefill over the listed key blocks only.

    Args:
        q: ``(B, Hq, n, D)``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        k, v: ``(B, Hkv, n, D)``.
        block_index: ``(B, Hq, ceil(n / block_size), max_blocks)`` int32 key-block indices per query block (distinct;
            a block after the query block is skipped).
        block_count: ``(B, Hq, ceil(n / block_size))`` int32 listed blocks per query block (the first of each row).
        scale: softmax scale (e.g. ``D ** -0.5``).
        block_size: rows per query block and tokens per key block (16, 32, 64 or 128).

    Returns:
        ``(B, Hq, n, D)`` in ``q``'s dtype (float32 accumulation; float64 inputs run the torch reference). Reads
        ``block_count * block_size`` keys per query block.
    """
    check_tensor(q, "q", 4)
    check_tensor(k, "k", 4, device=q.device)
    check_tensor(v, "v", 4, device=q.device)
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, n, D) or v.shape != k.shape or Hq % Hkv:
        raise ValueError(
            f"k and v must have shape ({B}, a divisor of {Hq}, {n}, {D}), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 16, 32, 64, 128, got {block_size!r}")
    n_qb = -(-n // block_size)
    check_tensor(block_index, "block_index", 4, dtypes=(torch.int32,), device=q.device)
    check_shape(block_index, "block_index", (B, Hq, n_qb, None))
    check_tensor(block_count, "block_count", 3, dtypes=(torch.int32,), device=q.device)
    check_shape(block_count, "block_count", (B, Hq, n_qb))
    if not use_triton(q) or q.dtype not in TRITON_FLOAT_DTYPES:
        return reference_block_sparse_attention(q, k, v, block_index, block_count, scale, block_size)
    ensure_launchable(_block_sparse_kernel, q)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    ieee = q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)
    _block_sparse_kernel[(B * Hq, n_qb)](
        q, k, v, block_index, block_count, out,
        *q.stride(), *k.stride(), *v.stride(), *block_index.stride(), *block_count.stride(), *out.stride(),
        Hq, n, D, Hq // Hkv, float(scale) * _LOG2E,
        BLOCK=block_size, BLOCK_D=max(16, next_pow2(D)), IEEE_DOT=ieee, num_warps=4,
    )  # fmt: skip
    return out
