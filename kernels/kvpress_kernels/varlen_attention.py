"""Attention of new query tokens over a head-variable (ragged) cache: segment ++ causal tail, GQA in-kernel."""

import functools
import math
from dataclasses import dataclass

import torch

from ._common import (
    INT_DTYPES,
    TRITON_FLOAT_DTYPES,
    check_shape,
    check_tensor,
    ensure_launchable,
    next_pow2,
    num_sms,
    tl,
    triton,
    use_triton,
)

__all__ = ["AttentionConfig", "varlen_attention", "reference_varlen_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionConfig:
    """Optional launch overrides for `varlen_attention` (tests and tuning); None keeps the heuristic.

    block_n: key tokens per tile. num_warps / num_stages: Triton launch options.
    split_tokens: key tokens per split (split-K chunk). programs_per_sm: split target when split_tokens is None.
    combine_rows: query rows per program of the split merge.
    """

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    split_tokens: int | None = None
    programs_per_sm: int | None = None
    combine_rows: int | None = None


_DEFAULT_CONFIG = AttentionConfig()


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def validate_queries_and_tail(q, tail_k, tail_v, tail_lens, scale, q_lens) -> None:
    """Checks shared by every ragged attention: q, the dense tail, tail_lens, q_lens and scale."""
    check_tensor(q, "q", ndim=4, dtypes=_FLOAT_DTYPES)
    dev, dt = q.device, q.dtype
    B, Hq, _, D = q.shape
    check_tensor(tail_k, "tail_k", ndim=4, dtypes=(dt,), device=dev)
    check_tensor(tail_v, "tail_v", ndim=4, dtypes=(dt,), device=dev)
    check_tensor(tail_lens, "tail_lens", ndim=1, dtypes=INT_DTYPES, device=dev)
    Hkv = tail_k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, which is not a multiple of the {Hkv} kv heads of tail_k")
    check_shape(tail_k, "tail_k", (B, Hkv, None, D))
    check_shape(tail_v, "tail_v", tuple(tail_k.shape))
    check_shape(tail_lens, "tail_lens", (B,))
    if q_lens is not None:
        check_tensor(q_lens, "q_lens", ndim=1, dtypes=INT_DTYPES, device=dev)
        check_shape(q_lens, "q_lens", (B,))
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float, got {scale!r}")


def _validate(q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, scale, q_lens):
    check_tensor(q, "q", ndim=4, dtypes=_FLOAT_DTYPES)
    dev, dt = q.device, q.dtype
    B, D = q.shape[0], q.shape[3]
    check_tensor(seg_k, "seg_k", ndim=2, dtypes=(dt,), device=dev)
    check_tensor(seg_v, "seg_v", ndim=2, dtypes=(dt,), device=dev)
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    validate_queries_and_tail(q, tail_k, tail_v, tail_lens, scale, q_lens)
    check_shape(seg_k, "seg_k", (None, D))
    check_shape(seg_v, "seg_v", tuple(seg_k.shape))
    check_shape(cu_seqlens, "cu_seqlens", (B * tail_k.shape[1] + 1,))


def tail_value_flags(q, tail_k, tail_lens, q_lens) -> list:
    """(flag, message) pairs for the data checks of q_lens and tail_lens; flags are 0-d bool tensors (no sync)."""
    Q, cap = q.shape[2], tail_k.shape[2]
    n_q = q_lens if q_lens is not None else torch.full_like(tail_lens, Q)
    return [
        (((n_q < 0) | (n_q > Q)).any(), f"q_lens must lie in [0, {Q}] (Q = q.shape[2])"),
        (((tail_lens < 0) | (tail_lens > cap)).any(), f"tail_lens must lie in [0, {cap}] (tail_k.shape[2])"),
        ((tail_lens < n_q).any(), ("tail_lens[b] must be >= the number of valid queries of sequence b (queries "
                                   "are the last tail entries, appended before attention)")),
    ]  # fmt: skip


def raise_flags(checks: list) -> None:
    """One host sync for all (flag, message) pairs; raise ValueError with the first message whose flag is set."""
    flags = torch.stack([f for f, _ in checks]).tolist()
    for flag, (_, message) in zip(flags, checks):
        if flag:
            raise ValueError(message)


def _check_values(q, seg_k, cu_seqlens, tail_k, tail_lens, q_lens):
    """Data checks, one host sync: cu_seqlens is a valid prefix sum over seg_k rows, lengths fit."""
    N = seg_k.shape[0]
    cu = cu_seqlens.long()
    raise_flags([((cu[0] != 0) | (cu[-1] != N) | (cu[1:] < cu[:-1]).any(),
                  f"cu_seqlens must be non-decreasing prefix sums from 0 to seg_k.shape[0] = {N}")]
                + tail_value_flags(q, tail_k, tail_lens, q_lens))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------------------


def reference_varlen_attention(q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, scale, q_lens=None):
    """Torch reference of `varlen_attention` (same arguments, same results; padding query rows give 0).

    One (sequence, kv head) at a time: the G query heads' valid rows against that head's segment and causal tail,
    read in place (views, no gathered or GQA-repeated copy of the keys), float32 softmax (float64 for float64
    inputs). This is also the CPU path of `varlen_attention`, so its cost per step is the matmuls alone.
    """
    _validate(q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, scale, q_lens)
    B, Hq, Q, D = q.shape
    Hkv = tail_k.shape[1]
    G = Hq // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cu = cu_seqlens.tolist()
    tails = tail_lens.tolist()
    n_valid = q_lens.tolist() if q_lens is not None else [Q] * B
    out = torch.zeros(B, Hq, Q, D, dtype=q.dtype, device=q.device)
    for b in range(B):
        T, n = int(tails[b]), int(n_valid[b])
        if n == 0:
            continue
        # Valid query i sits at tail position T - n + i and sees the tail up to there.
        causal = torch.arange(T, device=q.device)[None, :] <= (T - n + torch.arange(n, device=q.device))[:, None]
        for h in range(Hkv):
            s = b * Hkv + h
            k_seg, v_seg = seg_k[cu[s] : cu[s + 1]].to(acc_dtype), seg_v[cu[s] : cu[s + 1]].to(acc_dtype)
            k_tail, v_tail = tail_k[b, h, :T].to(acc_dtype), tail_v[b, h, :T].to(acc_dtype)
            queries = q[b, h * G : (h + 1) * G, :n].to(acc_dtype).reshape(G * n, D)
            tail_logits = (queries @ k_tail.T).view(G, n, T).masked_fill(~causal, float("-inf")).view(G * n, T)
            probs = (torch.cat([queries @ k_seg.T, tail_logits], dim=1) * scale).softmax(dim=-1)
            mixed = probs[:, : k_seg.shape[0]] @ v_seg + probs[:, k_seg.shape[0] :] @ v_tail
            out[b, h * G : (h + 1) * G, :n] = mixed.view(G, n, D).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
#
# Work decomposition ("split-K" / flash-decoding, load balanced over ragged lengths):
#   the keys of segment s (b = s // Hkv, h = s % Hkv) are the virtual sequence  seg rows ++ tail rows of b,
#   n_keys(s) = seg_len(s) + tail_lens[b]. It is cut into ceil(n_keys / CHUNK) splits (at least one), and the
#   splits of all segments are numbered consecutively. Axis 0 of the grid walks that numbering, so a long head gets
#   many programs and a short head few: no host sync is needed, each program recomputes the prefix sum over
#   segments (B * Hkv small integers) and finds its own (segment, split). Axis 1 walks blocks of BLOCK_M query
#   rows of that kv head; row r stands for query token i = r // G of query head h * G + r % G, so the G heads that
#   share a kv head reuse every K/V tile loaded. Each program writes an unnormalised partial (m, l, acc) that a
#   second kernel merges (log-sum-exp), or, when one split per segment is guaranteed, the final output directly.

if triton is not None:

    @triton.jit
    def _split_plan(cu_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK,
                    SEG_UNIT: tl.constexpr, HAS_QLENS: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """Vectors over segments: split counts and the global index of each segment's first split.

        Segment s holds (cu[s + 1] - cu[s]) * SEG_UNIT key slots (SEG_UNIT > 1: cu counts groups of slots)."""
        s = tl.arange(0, BLOCK_S)
        s_ok = s < NUM_SEG
        seg_len = (tl.load(cu_ptr + s + 1, mask=s_ok, other=0) - tl.load(cu_ptr + s, mask=s_ok, other=0)) * SEG_UNIT
        tail_len = tl.load(tail_lens_ptr + s // HKV, mask=s_ok, other=0)
        if HAS_QLENS:
            n_q = tl.load(q_lens_ptr + s // HKV, mask=s_ok, other=0)
        else:
            n_q = tl.zeros([BLOCK_S], dtype=tl.int32) + Q
        # Keys seen by the last valid query; none for a sequence without valid queries.
        n_keys = tl.where(n_q > 0, seg_len + tail_len, 0)
        n_splits = tl.maximum((n_keys + CHUNK - 1) // CHUNK, 1)  # >= 1: every segment writes its (zero) rows
        n_splits = tl.where(s_ok, n_splits, 0)
        first = tl.cumsum(n_splits, 0) - n_splits
        return s, n_splits, first

    @triton.jit
    def _locate_split(pid, cu_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK,
                      SEG_UNIT: tl.constexpr, HAS_QLENS: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """(found, segment, split index inside the segment) of split program `pid`; found is 0 past the end."""
        s_idx, n_splits, first = _split_plan(cu_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK,
                                             SEG_UNIT, HAS_QLENS, BLOCK_S)  # fmt: skip
        mine = (first <= pid) & (pid < first + n_splits)
        found = tl.sum(mine.to(tl.int32), 0)
        seg = tl.sum(tl.where(mine, s_idx, 0), 0)
        split = pid - tl.sum(tl.where(mine, first, 0), 0)
        return found, seg, split

    @triton.jit
    def _load_queries(q_ptr, q_b, q_h, q_q, q_d, b, h, n_q, tail_len, mb, D,
                      G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Query rows mb * BLOCK_M + [0, BLOCK_M) of kv head h: row r is query token r // G of head h * G + r % G.

        Returns (q tile, r, query token, query head, row valid, causal tail end per row, d, d valid)."""
        r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = r // G
        qh = h * G + r % G
        row_ok = qi < n_q  # padding queries (and rows past G * Q) see nothing and produce 0
        tail_end = tail_len - n_q + qi + 1  # causal: exclusive end of the tail visible to query qi
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q_off = b.to(tl.int64) * q_b + qh.to(tl.int64) * q_h + qi.to(tl.int64) * q_q
        q = tl.load(q_ptr + q_off[:, None] + d[None, :] * q_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        return q, r, qi, qh, row_ok, tail_end, d, d_ok

    @triton.jit
    def _online_step(qk, v, m_i, l_i, acc, IEEE_DOT: tl.constexpr):
        """One online-softmax update; qk is already in log2 units, masked entries are -inf."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0 weight
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            # Round p like the native path does, then multiply exactly in fp32.
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _qk(q, k, IEEE_DOT: tl.constexpr):
        if IEEE_DOT:
            return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            return tl.dot(q, tl.trans(k))

    @triton.jit
    def _attend_tail(q, qk_scale, tk_base, tv_base, tk_t, tk_d, tv_t, tv_d, t_lo, t_hi, row_ok, tail_end, d, d_ok,
                     m_i, l_i, acc, IEEE_DOT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Online softmax over tail positions [t_lo, t_hi) of one (sequence, kv head), causally masked per row."""
        n = tl.arange(0, BLOCK_N)
        for t0 in range(t_lo, t_hi, BLOCK_N):
            cols = t0 + n
            c_ok = cols < t_hi
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(tk_base + cols[:, None] * tk_t + d[None, :] * tk_d, mask=kv_mask, other=0.0)
            v = tl.load(tv_base + cols[:, None] * tv_t + d[None, :] * tv_d, mask=kv_mask, other=0.0)
            qk = _qk(q, k, IEEE_DOT) * qk_scale
            visible = row_ok[:, None] & c_ok[None, :] & (cols[None, :] < tail_end[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)
        return m_i, l_i, acc

    @triton.jit
    def _write_split(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b, r, qi, qh, d, d_ok,
                     m_i, l_i, acc, Q, G: tl.constexpr, DIRECT: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Store a split's result: the normalised output (DIRECT, one split per segment) or its (m, l, acc)."""
        r_ok = r < G * Q
        if DIRECT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_off = b.to(tl.int64) * o_b + qh.to(tl.int64) * o_h + qi.to(tl.int64) * o_q
            tl.store(out_ptr + o_off[:, None] + d[None, :] * o_d, out.to(out_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip
        else:
            GQ = G * Q
            p_row = pid.to(tl.int64) * GQ + r
            tl.store(part_m_ptr + p_row, m_i, mask=r_ok)
            tl.store(part_l_ptr + p_row, l_i, mask=r_ok)
            tl.store(part_acc_ptr + p_row[:, None] * BLOCK_D + d[None, :], acc, mask=r_ok[:, None])

    @triton.jit
    def _attn_split_kernel(
        q_ptr, sk_ptr, sv_ptr, cu_ptr, tk_ptr, tv_ptr, tail_lens_ptr, q_lens_ptr,
        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_q, q_d, sk_n, sk_d, sv_n, sv_d,
        tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d, o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK, qk_scale,
        G: tl.constexpr, HAS_QLENS: tl.constexpr, DIRECT: tl.constexpr, IEEE_DOT: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        mb = tl.program_id(1)
        found, seg, split = _locate_split(pid, cu_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK, 1,
                                          HAS_QLENS, BLOCK_S)  # fmt: skip
        if found == 0:
            return  # grid is an upper bound on the number of splits
        b = seg // HKV
        h = seg % HKV
        seg_start = tl.load(cu_ptr + seg)
        seg_len = tl.load(cu_ptr + seg + 1) - seg_start
        tail_len = tl.load(tail_lens_ptr + b)
        if HAS_QLENS:
            n_q = tl.load(q_lens_ptr + b)
        else:
            n_q = Q
        q, r, qi, qh, row_ok, tail_end, d, d_ok = _load_queries(q_ptr, q_b, q_h, q_q, q_d, b, h, n_q, tail_len, mb,
                                                                D, G, BLOCK_M, BLOCK_D)  # fmt: skip

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        k_lo = split * CHUNK
        k_hi = tl.minimum(k_lo + CHUNK, seg_len + tail_len)
        n = tl.arange(0, BLOCK_N)

        # Segment part of this split: rows seg_start + [k_lo, min(k_hi, seg_len)) of the flat storage.
        seg_hi = tl.minimum(k_hi, seg_len)
        for n0 in range(k_lo, seg_hi, BLOCK_N):
            cols = n0 + n
            c_ok = cols < seg_hi
            row = (seg_start + cols).to(tl.int64)
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(sk_ptr + row[:, None] * sk_n + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            v = tl.load(sv_ptr + row[:, None] * sv_n + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            qk = _qk(q, k, IEEE_DOT) * qk_scale
            qk = tl.where(row_ok[:, None] & c_ok[None, :], qk, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)

        # Tail part: tail positions [max(k_lo, seg_len), k_hi) - seg_len, causally masked per query row.
        b64 = b.to(tl.int64)
        m_i, l_i, acc = _attend_tail(q, qk_scale, tk_ptr + b64 * tk_b + h.to(tl.int64) * tk_h,
                                     tv_ptr + b64 * tv_b + h.to(tl.int64) * tv_h, tk_t, tk_d, tv_t, tv_d,
                                     tl.maximum(k_lo, seg_len) - seg_len, k_hi - seg_len, row_ok, tail_end, d, d_ok,
                                     m_i, l_i, acc, IEEE_DOT, BLOCK_N)  # fmt: skip
        _write_split(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b, r, qi, qh, d, d_ok,
                     m_i, l_i, acc, Q, G, DIRECT, BLOCK_D)

    @triton.jit
    def _attn_combine_kernel(
        cu_ptr, tail_lens_ptr, q_lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK,
        G: tl.constexpr, SEG_UNIT: tl.constexpr, HAS_QLENS: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (segment, block of BLOCK_R query rows): log-sum-exp merge of the segment's split partials,
        # BLOCK_P splits at a time (a long segment has hundreds of splits; this keeps the merge short).
        seg = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        s_idx, n_splits, first = _split_plan(cu_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK,
                                             SEG_UNIT, HAS_QLENS, BLOCK_S)  # fmt: skip
        own = s_idx == seg
        n_sp = tl.sum(tl.where(own, n_splits, 0), 0)
        p0 = tl.sum(tl.where(own, first, 0), 0)
        GQ = G * Q
        r_ok = r < GQ
        d = tl.arange(0, BLOCK_D)
        j = tl.arange(0, BLOCK_P)
        m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_run = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j0 in range(0, n_sp, BLOCK_P):
            ok = ((j0 + j) < n_sp)[:, None] & r_ok[None, :]  # (BLOCK_P, BLOCK_R)
            p_row = (p0 + j0 + j).to(tl.int64)[:, None] * GQ + r[None, :]
            m_j = tl.load(part_m_ptr + p_row, mask=ok, other=float("-inf"))
            l_j = tl.load(part_l_ptr + p_row, mask=ok, other=0.0)
            a_j = tl.load(part_acc_ptr + p_row[:, :, None] * BLOCK_D + d[None, None, :], mask=ok[:, :, None],
                          other=0.0)  # fmt: skip
            m_new = tl.maximum(m_run, tl.max(m_j, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp2(m_j - m_use[None, :])  # (BLOCK_P, BLOCK_R) weight of each split
            alpha = tl.exp2(m_run - m_use)
            l_run = l_run * alpha + tl.sum(l_j * w, 0)
            acc = acc * alpha[:, None] + tl.sum(a_j * w[:, :, None], 0)
            m_run = m_new
        out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
        b = seg // HKV
        qh = (seg % HKV) * G + r % G
        o_off = b.to(tl.int64) * o_b + qh.to(tl.int64) * o_h + (r // G).to(tl.int64) * o_q
        tl.store(out_ptr + o_off[:, None] + d[None, :] * o_d, out.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & (d < D)[None, :])  # fmt: skip


_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=256)
def _launch_params(B, Hq, Q, D, Hkv, cap, n_rows, dtype, device, config: AttentionConfig) -> dict:
    """Tile sizes, split size (tokens) and grids, from host-known shapes only (no sync); cached per shape."""
    G = Hq // Hkv
    num_seg = B * Hkv
    on_gpu = device.type == "cuda"
    block_d = next_pow2(D)
    fp32 = dtype == torch.float32
    # Query rows per program (tl.dot needs >= 16; the G heads of a kv head share every K/V tile). fp32 caps it
    # lower: 64 x 128 fp32 tiles spill registers (ptxas, sm_90).
    block_m = min(16 if fp32 and block_d > 128 else 32 if fp32 else 64, max(16, next_pow2(G * Q)))
    # Defaults from the H100 sweep in benchmarks/kernels (decode, bf16, D = 128: 128-token tiles, 4 warps, 2 stages
    # were fastest); register/shared-memory use checked with ptxas for sm_90. Wider rows (fp32, D = 256) or
    # 64-row question tiles get smaller key tiles / more warps so that 2 stages stay under ~100 KB of shared memory.
    wide = fp32 or block_d > 128
    block_n = config.block_n or (32 if block_d > 128 else 64 if (wide or block_m > 16) else 128)
    num_warps = config.num_warps or (4 if block_m <= 16 and not wide else 8)
    num_stages = config.num_stages or 2
    row_blocks = triton.cdiv(G * Q, block_m)
    keys_bound = n_rows + num_seg * cap  # >= total keys over segments (tail capacity bounds tail_lens)
    max_keys = n_rows + cap  # >= keys of any single segment
    if config.split_tokens is not None:
        chunk = max(1, int(config.split_tokens))
    else:
        # About 4 programs per SM (~ one wave at 3 resident CTAs per SM): more splits only add partials to merge
        # (H100 sweep: 8/16/32 per SM were 4/20/50 % slower at 128k). Splits of >= 256 tokens keep a program's
        # fixed costs (plan, q load, partial write) small next to streaming its K/V.
        target = (config.programs_per_sm or 4) * num_sms(device)
        splits_wanted = max(1, target // row_blocks)
        chunk = max(256, triton.cdiv(triton.cdiv(keys_bound, splits_wanted), block_n) * block_n)
    direct = chunk >= max_keys  # then every segment has exactly one split: write the output directly
    n_programs = num_seg if direct else triton.cdiv(keys_bound, chunk) + num_seg
    # Merge: on the GPU one query row per program and 64 splits per step (a long head has ~100+ splits, and the
    # merge is a sequential chain per program); the CPU interpreter prefers few, wide programs.
    block_r = config.combine_rows or (1 if on_gpu else min(16, next_pow2(G * Q)))
    block_p = max(2, 8192 // (block_r * block_d))
    return dict(G=G, num_seg=num_seg, block_d=block_d, block_m=block_m, block_n=block_n, num_warps=num_warps,
                num_stages=num_stages, row_blocks=row_blocks, chunk=max(1, min(chunk, max_keys)), direct=direct,
                n_programs=n_programs, block_s=next_pow2(num_seg), block_r=block_r, block_p=block_p,
                combine_grid=(num_seg, triton.cdiv(G * Q, block_r)))  # fmt: skip


def varlen_attention(
    q: torch.Tensor,
    seg_k: torch.Tensor,
    seg_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float,
    q_lens: torch.Tensor | None = None,
    *,
    check: bool = True,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of the newest tokens over ragged segments plus the causal dense tail.

    Args:
        q: (B, Hq, Q, D) queries, Hq = G * Hkv; query head hq reads kv head hq // G.
        seg_k, seg_v: (N, D) compressed context; segment s = b * Hkv + h is rows cu_seqlens[s]:cu_seqlens[s + 1].
        cu_seqlens: (B * Hkv + 1,) int32 prefix sums of segment lengths (lengths may be 0).
        tail_k, tail_v: (B, Hkv, T_cap, D) tokens appended after compression; the queries' own keys included.
        tail_lens: (B,) int valid tail entries per sequence.
        scale: softmax scale (e.g. D ** -0.5).
        q_lens: optional (B,) int valid queries per sequence (rows 0..q_lens[b]-1 of q; the rest is padding whose
            output is 0). Default: all Q.
        check: validate cu_seqlens / lengths (one host sync). Pass False on the decode hot path.
        config: optional launch overrides (tests, tuning).

    Query i < Qb of sequence b sits at tail position tail_lens[b] - Qb + i and attends to its kv head's whole
    segment plus tail positions [0, tail_lens[b] - Qb + i].

    Returns:
        (B, Hq, Q, D) in q's dtype; float32 accumulation (float64 inputs run the torch reference).
    """
    _validate(q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, scale, q_lens)
    if not use_triton(q) or q.dtype not in TRITON_FLOAT_DTYPES:
        if check:
            _check_values(q, seg_k, cu_seqlens, tail_k, tail_lens, q_lens)
        return reference_varlen_attention(q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, scale, q_lens)
    ensure_launchable(_attn_split_kernel, q)
    if check:
        _check_values(q, seg_k, cu_seqlens, tail_k, tail_lens, q_lens)
    B, Hq, Q, D = q.shape
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    p = _launch_params(B, Hq, Q, D, tail_k.shape[1], tail_k.shape[2], seg_k.shape[0], q.dtype, q.device,
                       config or _DEFAULT_CONFIG)  # fmt: skip
    G = p["G"]
    has_qlens = q_lens is not None
    q_lens_arg = q_lens if has_qlens else tail_lens
    # fp32 inputs: exact fp32 dots instead of TF32. bf16 on the CPU interpreter: its tl.dot multiplies the raw
    # bf16 bit patterns (triton 3.9), so upcast the (exactly representable) operands and multiply in fp32 there.
    ieee = q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)
    parts = alloc_partials(p, Q, out)
    _attn_split_kernel[(p["n_programs"], p["row_blocks"])](
        q, seg_k, seg_v, cu_seqlens, tail_k, tail_v, tail_lens, q_lens_arg,
        out, *parts,
        *q.stride(), *seg_k.stride(), *seg_v.stride(), *tail_k.stride(), *tail_v.stride(), *out.stride(),
        p["num_seg"], tail_k.shape[1], Q, D, p["chunk"], float(scale) * _LOG2E,
        G=G, HAS_QLENS=has_qlens, DIRECT=p["direct"], IEEE_DOT=ieee,
        BLOCK_S=p["block_s"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    combine_splits(p, cu_seqlens, 1, tail_lens, q_lens_arg, has_qlens, out, parts)
    return out


def alloc_partials(p: dict, Q: int, out: torch.Tensor) -> tuple:
    """(acc, m, l) float32 buffers for the split partials (one allocation); `out` stands in when unused (direct)."""
    if p["direct"]:
        return out, out, out
    rows = p["n_programs"] * p["G"] * Q
    part = torch.empty(rows * (p["block_d"] + 2), dtype=torch.float32, device=out.device)
    return part[: rows * p["block_d"]], part[-2 * rows : -rows], part[-rows:]


def combine_splits(p: dict, cu, seg_unit: int, tail_lens, q_lens_arg, has_qlens: bool, out, parts) -> None:
    """Merge the split partials into `out` (B, Hq, Q, D) unless the split kernel wrote it directly.

    cu: the (S + 1,) prefix sums the split plan was built from, counting units of `seg_unit` key slots."""
    if p["direct"]:
        return
    Q, D = out.shape[2], out.shape[3]
    _attn_combine_kernel[p["combine_grid"]](
        cu, tail_lens, q_lens_arg, out, *parts,
        *out.stride(),
        p["num_seg"], p["num_seg"] // out.shape[0], Q, D, p["chunk"],
        G=p["G"], SEG_UNIT=seg_unit, HAS_QLENS=has_qlens, BLOCK_S=p["block_s"], BLOCK_P=p["block_p"],
        BLOCK_R=p["block_r"], BLOCK_D=p["block_d"], num_warps=4,
    )  # fmt: skip
