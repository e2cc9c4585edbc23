"""Decode attention over selected pages of a :class:`PagedKV` (Quest): only the chosen pages' keys and values
are read, so a step reads ``n_selected * page_size`` tokens per kv head however long the context."""

from __future__ import annotations

import torch

from ._common import TRITON_FLOAT_DTYPES, check_tensor, ensure_launchable, next_pow2, num_sms, tl, triton, use_triton
from .paged_kv import PagedKV
from .varlen_attention import _LOG2E, _online_step, _qk

__all__ = ["page_attention", "reference_page_attention", "page_token_mask"]


def page_token_mask(pages: torch.Tensor, paged: PagedKV) -> torch.Tensor:
    """``(B, Hkv, capacity)`` bool: the slots of the selected ``pages`` ``(B, Hkv, n)`` that hold a token."""
    B, Hkv, _ = pages.shape
    page_of_slot = torch.zeros(B, Hkv, paged.capacity // paged.page_size, dtype=torch.bool, device=pages.device)
    in_range = pages.long().clamp(max=page_of_slot.shape[-1] - 1)
    page_of_slot.scatter_(2, in_range, pages.long() < page_of_slot.shape[-1])
    slots = page_of_slot.repeat_interleave(paged.page_size, dim=2)
    valid = torch.arange(paged.capacity, device=pages.device) < paged.lengths.long()[:, None, None]
    return slots & valid


def reference_page_attention(q: torch.Tensor, paged: PagedKV, pages: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch :func:`page_attention`: masked softmax over the selected pages' tokens (float32 math, or
    float64 for float64 inputs); returns ``(B, Hq, D)`` in ``q``'s dtype."""
    B, Hq, D = q.shape
    Hkv = paged.keys.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = page_token_mask(pages, paged).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, capacity)
    keys = paged.keys.to(acc).repeat_interleave(Hq // Hkv, dim=1)
    values = paged.values.to(acc).repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", q.to(acc), keys) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)  # a head with nothing selected outputs 0
    if q.dtype != acc:
        weights = weights.to(q.dtype).to(acc)  # the kernel rounds p to the value dtype before p @ v
    return torch.einsum("bht,bhtd->bhd", weights, values).to(q.dtype)


if triton is not None:
    from .page_selection import _group_query_rows

    @triton.jit
    def _page_attn_kernel(
        q_ptr, k_ptr, v_ptr, pages_ptr, len_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_d, k_b, k_h, k_t, k_d, v_b, v_h, v_t, v_d, pg_b, pg_h, pg_j, o_b, o_h, o_d,
        HKV, D, N_SEL, PAGES_PER_SPLIT, N_SPLITS, qk_scale,
        PAGE: tl.constexpr, G: tl.constexpr, TILE_PAGES: tl.constexpr, DIRECT: tl.constexpr,
        IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (sequence * kv head, split): selected pages [split * PAGES_PER_SPLIT, ...), TILE_PAGES per tile.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b, h, q, r, r_ok, d, d_ok = _group_query_rows(q_ptr, q_b, q_h, q_d, bh, HKV, D, G, BLOCK_M, BLOCK_D)
        length = tl.load(len_ptr + b)
        k_base = k_ptr + b.to(tl.int64) * k_b + h.to(tl.int64) * k_h
        v_base = v_ptr + b.to(tl.int64) * v_b + h.to(tl.int64) * v_h
        pg_base = pages_ptr + b.to(tl.int64) * pg_b + h.to(tl.int64) * pg_h
        n = tl.arange(0, TILE_PAGES * PAGE)
        slot = n // PAGE
        offset = n % PAGE
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        j_lo = split * PAGES_PER_SPLIT
        j_hi = tl.minimum(j_lo + PAGES_PER_SPLIT, N_SEL)
        for j0 in range(j_lo, j_hi, TILE_PAGES):
            j = j0 + slot
            j_ok = j < j_hi
            page = tl.load(pg_base + j * pg_j, mask=j_ok, other=0)
            tok = page.to(tl.int64) * PAGE + offset
            t_ok = j_ok & (tok < length)
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + tok[:, None] * k_t + d[None, :] * k_d, mask=kv_mask, other=0.0)
            v = tl.load(v_base + tok[:, None] * v_t + d[None, :] * v_d, mask=kv_mask, other=0.0)
            qk = _qk(q, k, IEEE_DOT) * qk_scale
            qk = tl.where(r_ok[:, None] & t_ok[None, :], qk, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)
        if DIRECT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_off = b.to(tl.int64) * o_b + (h * G + r).to(tl.int64) * o_h
            tl.store(out_ptr + o_off[:, None] + d[None, :] * o_d, out.to(out_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip
        else:
            row = (bh.to(tl.int64) * N_SPLITS + split) * G + r
            tl.store(part_m_ptr + row, m_i, mask=r_ok)
            tl.store(part_l_ptr + row, l_i, mask=r_ok)
            tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=r_ok[:, None])

    @triton.jit
    def _page_combine_kernel(
        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_d, HKV, D, N_SPLITS,
        G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (sequence * kv head, query row of the group): log-sum-exp merge of its N_SPLITS partials.
        bh = tl.program_id(0)
        r = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        m_run = tl.full([1], float("-inf"), dtype=tl.float32)
        l_run = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, N_SPLITS, BLOCK_S):
            ok = (s0 + s) < N_SPLITS
            row = (bh.to(tl.int64) * N_SPLITS + s0 + s) * G + r
            m_j = tl.load(part_m_ptr + row, mask=ok, other=float("-inf"))
            l_j = tl.load(part_l_ptr + row, mask=ok, other=0.0)
            a_j = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m_run, tl.max(m_j, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp2(m_j - m_use)
            alpha = tl.exp2(m_run - m_use)
            l_run = l_run * alpha + tl.sum(l_j * w, 0)
            acc = acc * alpha + tl.sum(a_j * w[:, None], 0)
            m_run = m_new
        out = acc / tl.where(l_run > 0, l_run, 1.0)
        b = bh // HKV
        h = bh % HKV
        o_off = b.to(tl.int64) * o_b + (h * G + r).to(tl.int64) * o_h
        tl.store(out_ptr + o_off + d * o_d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def page_attention(
    q: torch.Tensor, paged: PagedKV, pages: torch.Tensor, scale: float, pages_per_split: int | None = None
) -> torch.Tensor:
    """Attention of one decode query per sequence over the selected pages only.

    Args:
        q: ``(B, Hq, D)``; query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        paged: the layer's keys and values (:class:`PagedKV`), the query's own token already appended.
        pages: ``(B, Hkv, n)`` int32 distinct page indices per (sequence, kv head), e.g. from
            :func:`~kvpress_kernels.select_pages`; slots past a sequence's length are skipped.
        scale: softmax scale (e.g. ``D ** -0.5``).
        pages_per_split: selected pages per program (default: about 4 programs per SM in all).

    Returns:
        ``(B, Hq, D)`` in ``q``'s dtype (float32 accumulation; float64 inputs run the torch reference). Reads
        ``n * page_size`` tokens per (sequence, kv head).
    """
    check_tensor(q, "q", 3, device=paged.keys.device)
    check_tensor(pages, "pages", 3, dtypes=(torch.int32, torch.int64), device=paged.keys.device)
    B, Hq, D = q.shape
    _, Hkv, _, Dk = paged.keys.shape
    if Hq % Hkv or D != Dk or B != paged.keys.shape[0]:
        raise ValueError(f"q must have shape ({paged.keys.shape[0]}, a multiple of {Hkv}, {Dk}), got {(B, Hq, D)}")
    if pages.shape[:2] != (B, Hkv):
        raise ValueError(f"pages must have shape ({B}, {Hkv}, n), got {tuple(pages.shape)}")
    if not use_triton(q) or q.dtype not in TRITON_FLOAT_DTYPES:
        return reference_page_attention(q, paged, pages, scale)
    ensure_launchable(_page_attn_kernel, q)
    out = torch.empty_like(q)
    n_sel = pages.shape[2]
    if out.numel() == 0:
        return out
    G = Hq // Hkv
    page = paged.page_size
    tile_pages = max(1, 64 // page) if page <= 64 else 1
    if pages_per_split is None:
        splits_wanted = max(1, 4 * num_sms(q.device) // (B * Hkv))
        pages_per_split = triton.cdiv(triton.cdiv(n_sel, splits_wanted), tile_pages) * tile_pages
    if not isinstance(pages_per_split, int) or pages_per_split < 1:
        raise ValueError(f"pages_per_split must be an int >= 1, got {pages_per_split!r}")
    n_splits = triton.cdiv(n_sel, pages_per_split) if n_sel else 1
    direct = n_splits == 1
    block_d = next_pow2(D)
    if direct:
        parts = (out, out, out)
    else:
        rows = B * Hkv * n_splits * G
        part = torch.empty(rows * (block_d + 2), dtype=torch.float32, device=q.device)
        parts = (part[: rows * block_d], part[-2 * rows : -rows], part[-rows:])
    ieee = q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)
    _page_attn_kernel[(B * Hkv, n_splits)](
        q, paged.keys, paged.values, pages, paged.lengths, out, *parts,
        *q.stride(), *paged.keys.stride(), *paged.values.stride(), *pages.stride(), *out.stride(),
        Hkv, D, n_sel, pages_per_split, n_splits, float(scale) * _LOG2E,
        PAGE=page, G=G, TILE_PAGES=tile_pages, DIRECT=direct, IEEE_DOT=ieee,
        BLOCK_M=max(16, next_pow2(G)), BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    if not direct:
        _page_combine_kernel[(B * Hkv, G)](
            out, *parts, *out.stride(), Hkv, D, n_splits,
            G=G, BLOCK_S=min(64, next_pow2(n_splits)), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out
