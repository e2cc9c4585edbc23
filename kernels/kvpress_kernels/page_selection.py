"""Quest's page selection: an upper bound of ``q . k`` over each page from its key bounds, and the top pages.

For one query row ``q`` and a page with element-wise key bounds ``lo <= k <= hi``,
``max_k q . k <= sum_c max(q_c lo_c, q_c hi_c) = relu(q) . hi + min(q, 0) . lo``: two dot products per page, read
from the bounds (``2 D`` values per page) instead of the page's ``page_size * D`` keys. The query heads that share
a kv head read the same pages, so a page's score is the largest bound over the group.
"""

from __future__ import annotations

import torch

from ._common import TRITON_FLOAT_DTYPES, check_tensor, ensure_launchable, next_pow2, tl, triton, use_triton
from .paged_kv import PagedKV

__all__ = ["page_scores", "reference_page_scores", "reference_select_pages", "select_pages"]


def reference_page_scores(q: torch.Tensor, paged: PagedKV, recent_pages: int = 1) -> torch.Tensor:
    """Plain-torch :func:`page_scores` (float32, or float64 for float64 inputs)."""
    B, Hq, D = q.shape
    Hkv = paged.page_min.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(B, Hkv, Hq // Hkv, D)
    lo, hi = paged.page_min.to(acc), paged.page_max.to(acc)
    # (B, Hkv, G, P): relu(q) . hi + min(q, 0) . lo, with empty pages' infinite bounds kept out of the products.
    finite_lo, finite_hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)
    bound = qg.clamp(min=0) @ finite_hi.transpose(-1, -2) + qg.clamp(max=0) @ finite_lo.transpose(-1, -2)
    scores = bound.amax(2)
    return _mark_pages(scores, paged.lengths, paged.page_size, recent_pages)


def _mark_pages(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, recent_pages: int) -> torch.Tensor:
    """``+inf`` for each sequence's last ``recent_pages`` pages (always read), ``-inf`` past its last page."""
    n_pages = (lengths.long() + page_size - 1) // page_size
    page = torch.arange(scores.shape[-1], device=scores.device)
    last = n_pages[:, None, None]
    scores = scores.masked_fill(page >= last - recent_pages, float("inf"))
    return scores.masked_fill(page >= last, float("-inf"))


if triton is not None:

    @triton.jit
    def _group_query_rows(q_ptr, q_b, q_h, q_d, bh, HKV, D, G: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr):  # fmt: skip
        """Program ``bh`` = sequence * HKV + kv head: (b, h, the G query rows of the head's group as a
        (BLOCK_M, BLOCK_D) tile, row index, row valid, channel index, channel valid)."""
        b = bh // HKV
        h = bh % HKV
        r = tl.arange(0, BLOCK_M)
        r_ok = r < G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q_off = b.to(tl.int64) * q_b + (h * G + r).to(tl.int64) * q_h
        q = tl.load(q_ptr + q_off[:, None] + d[None, :] * q_d, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        return b, h, q, r, r_ok, d, d_ok

    @triton.jit
    def _page_score_kernel(
        q_ptr, lo_ptr, hi_ptr, len_ptr, out_ptr,
        q_b, q_h, q_d, lo_b, lo_h, lo_p, lo_d, hi_b, hi_h, hi_p, hi_d, o_b, o_h, o_p,
        HKV, D, N_PAGES, RECENT,
        PAGE: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):  # fmt: skip
        # Program (sequence * kv head, block of BLOCK_P pages): the group's G query rows against the pages' bounds.
        b, h, q, r, r_ok, d, d_ok = _group_query_rows(q_ptr, q_b, q_h, q_d, tl.program_id(0), HKV, D, G, BLOCK_M,
                                                      BLOCK_D)  # fmt: skip
        # Split in fp32 (the interpreter compares bf16 by raw bits); exact back in q's dtype.
        q32 = q.to(tl.float32)
        q_pos = tl.maximum(q32, 0.0).to(q.dtype)
        q_neg = tl.minimum(q32, 0.0).to(q.dtype)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n_pages = (tl.load(len_ptr + b) + PAGE - 1) // PAGE
        p_ok = p < n_pages
        mask = p_ok[:, None] & d_ok[None, :]
        lo = tl.load(lo_ptr + b.to(tl.int64) * lo_b + h.to(tl.int64) * lo_h + p[:, None].to(tl.int64) * lo_p
                     + d[None, :] * lo_d, mask=mask, other=0.0)  # fmt: skip
        hi = tl.load(hi_ptr + b.to(tl.int64) * hi_b + h.to(tl.int64) * hi_h + p[:, None].to(tl.int64) * hi_p
                     + d[None, :] * hi_d, mask=mask, other=0.0)  # fmt: skip
        if IEEE_DOT:
            bound = tl.dot(q_pos.to(tl.float32), tl.trans(hi.to(tl.float32)), input_precision="ieee")
            bound += tl.dot(q_neg.to(tl.float32), tl.trans(lo.to(tl.float32)), input_precision="ieee")
        else:
            bound = tl.dot(q_pos, tl.trans(hi)) + tl.dot(q_neg, tl.trans(lo))
        bound = tl.where(r_ok[:, None], bound, float("-inf"))
        score = tl.max(bound, 0)
        score = tl.where(p >= n_pages - RECENT, float("inf"), score)
        score = tl.where(p_ok, score, float("-inf"))
        tl.store(out_ptr + b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + p * o_p, score, mask=p < N_PAGES)


def page_scores(q: torch.Tensor, paged: PagedKV, recent_pages: int = 1) -> torch.Tensor:
    """Upper bound of the attention logit (unscaled ``q . k``) over each page, per (sequence, kv head).

    Args:
        q: ``(B, Hq, D)`` one decode query per sequence; query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        paged: the layer's :class:`PagedKV`.
        recent_pages: each sequence's last pages (the newest tokens, the query's own among them) score ``+inf``.

    Returns:
        ``(B, Hkv, n_pages)`` float32, ``n_pages = capacity // page_size``; pages past a sequence's last score
        ``-inf``.
    """
    check_tensor(q, "q", 3, device=paged.keys.device)
    B, Hq, D = q.shape
    _, Hkv, n_pages, Dk = paged.page_min.shape
    if Hq % Hkv or D != Dk or q.shape[0] != paged.page_min.shape[0]:
        raise ValueError(f"q must have shape ({paged.page_min.shape[0]}, a multiple of {Hkv}, {Dk}), got {(B, Hq, D)}")
    if not isinstance(recent_pages, int) or recent_pages < 0:
        raise ValueError(f"recent_pages must be an int >= 0, got {recent_pages!r}")
    if not use_triton(q) or q.dtype not in TRITON_FLOAT_DTYPES:
        return reference_page_scores(q, paged, recent_pages)
    ensure_launchable(_page_score_kernel, q)
    out = torch.empty(B, Hkv, n_pages, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    G = Hq // Hkv
    block_p = 64
    # fp32 (and bf16 in the CPU interpreter, whose tl.dot multiplies raw bf16 bits): exact fp32 products.
    ieee = q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)
    _page_score_kernel[(B * Hkv, triton.cdiv(n_pages, block_p))](
        q, paged.page_min, paged.page_max, paged.lengths, out,
        *q.stride(), *paged.page_min.stride(), *paged.page_max.stride(), *out.stride(),
        Hkv, D, n_pages, recent_pages,
        PAGE=paged.page_size, G=G, BLOCK_M=max(16, next_pow2(G)), BLOCK_P=block_p, BLOCK_D=next_pow2(D),
        IEEE_DOT=ieee, num_warps=4,
    )  # fmt: skip
    return out


# Rows up to this many pages are selected in one program's registers; longer rows use torch.topk.
MAX_KERNEL_PAGES = 16384

if triton is not None:

    @triton.jit
    def _select_kernel(scores_ptr, out_ptr, s_row, o_row, N, K, BLOCK: tl.constexpr):
        # Program = one row: the K-th largest score by a bitwise search over order-preserving integer keys, then
        # every larger score and the first of the equal ones, written in increasing page order.
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < N
        x = tl.load(scores_ptr + row.to(tl.int64) * s_row + i, mask=ok, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        # Flip the magnitude bits of negatives: signed-int order is then float order; shifted to [0, 2^32).
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        key = tl.where(ok, key, -1)  # padding is never selected (the threshold is >= 0)
        threshold = tl.zeros([1], dtype=tl.int64)
        for bit in tl.static_range(31, -1, -1):
            candidate = threshold | (1 << bit)
            count = tl.sum((key[None, :] >= candidate[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(count >= K, candidate, threshold)
        greater = key > threshold
        equal = key == threshold
        need = K - tl.sum(greater.to(tl.int32), axis=0)
        take = greater | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= need))
        slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row.to(tl.int64) * o_row + slot, i, mask=take)


def reference_select_pages(scores: torch.Tensor, n_pages: int) -> torch.Tensor:
    """Plain-torch :func:`select_pages`: the top ``n_pages`` by ``torch.topk`` (ties: any of them), increasing."""
    return scores.topk(n_pages, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def select_pages(scores: torch.Tensor, n_pages: int) -> torch.Tensor:
    """The ``n_pages`` best-scoring pages per (sequence, kv head): ``(B, Hkv, n_pages)`` int32 page indices, in
    increasing order (among equal scores at the cut, the first pages).

    A fixed count (no host sync, CUDA-graph safe): when a sequence holds fewer pages, the rest of the selection
    points past its last page, which :func:`~kvpress_kernels.page_attention` reads as empty. One Triton program per
    row for rows of up to :data:`MAX_KERNEL_PAGES` pages (``torch.topk`` runs a few blocks of radix passes
    per row, slower at decode sizes); longer rows, and float64 scores, use :func:`reference_select_pages`.
    """
    if not isinstance(n_pages, int) or not 1 <= n_pages <= scores.shape[-1]:
        raise ValueError(f"n_pages must be an int in [1, {scores.shape[-1]}] (pages of the buffer), got {n_pages!r}")
    check_tensor(scores, "scores", 3, dtypes=(torch.float32, torch.float64))
    n = scores.shape[-1]
    if not use_triton(scores) or scores.dtype != torch.float32 or n > MAX_KERNEL_PAGES:
        return reference_select_pages(scores, n_pages)
    ensure_launchable(_select_kernel, scores)
    rows = scores.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(scores.shape[:-1] + (n_pages,), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    block = next_pow2(n)
    _select_kernel[(rows.shape[0],)](rows, out, rows.stride(0), n_pages, n, n_pages, BLOCK=block,
                                     num_warps=16 if block >= 4096 else 4)  # fmt: skip
    return out
