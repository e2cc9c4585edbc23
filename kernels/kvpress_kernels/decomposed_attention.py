"""Attention of new query tokens over `DecomposedSegments` (decomposed_segments.py) plus the full-precision tail.

The contract is that of `quantized_varlen_attention` with the context given as `DecomposedSegments`: KIVI groups
whose codes index non-uniform levels, plus optional low-rank residual factors, sparse exact outliers and pre-RoPE
keys. The work decomposition (split-K over segment ++ tail, balanced over ragged lengths, the G query heads of a kv
head sharing every tile, log-sum-exp merge) is varlen_attention's.

Each key/value tile of ``BLOCK_N`` slots lies inside one group and is rebuilt in registers, in float32, from what the
storage holds and nothing else: codes unpacked and looked up in the level table, scaled and shifted; plus ``a @ b``
of the tile's low-rank block (one dot); plus the group's outliers, scattered with one dot of a one-hot
``(BLOCK_N, MO)`` slot matrix and a ``(MO, D)`` matrix holding each outlier's value in its channel; keys are then
rotated to their positions. The tile is rounded once to the model dtype (as the torch reference rounds each element)
and enters the usual online softmax. No full-precision copy of the context is written at any point.
"""

from __future__ import annotations

import dataclasses

import torch

from ._common import ensure_launchable, next_pow2, tl, triton, use_triton
from .decomposed_segments import DecomposedSegments, RotaryTable, dequantize_decomposed
from .quantization import _TL_DTYPES
from .quantized_attention import _check_values, _validate
from .quantized_attention import _plan as _kivi_plan
from .varlen_attention import (
    _DEFAULT_CONFIG,
    _LOG2E,
    AttentionConfig,
    alloc_partials,
    combine_splits,
    reference_varlen_attention,
)

__all__ = ["decomposed_attention", "reference_decomposed_attention"]

_OUTLIER_CHUNK = 16  # outliers per one-hot dot (tl.dot needs >= 16 on each side)
_LUT_GATHER = True  # level tables indexed in registers rather than one load per code
_STORAGE_FIELDS = (
    "k_packed",
    "k_scale",
    "k_zero",
    "v_packed",
    "v_scale",
    "v_zero",
)


def _validate_all(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope):
    if not isinstance(ds, DecomposedSegments):
        raise ValueError(f"ds must be a DecomposedSegments, got {type(ds).__name__}")  # noqa: TRY004
    ds.__post_init__()
    _validate(q, ds.segs, tail_k, tail_v, tail_lens, scale, q_lens)
    if ds.positions is not None:
        if not isinstance(rope, RotaryTable):
            raise ValueError("ds holds pre-RoPE keys: rope must be the model's RotaryTable")
        D = q.shape[-1]
        if D & (D - 1) or D < 32:
            raise ValueError(f"pre-RoPE keys are rotated in-kernel for power-of-two head dims >= 32 only, got {D}")


def reference_decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, q_lens=None, rope=None):
    """Torch reference of `decomposed_attention`: reconstructs the valid tokens (`dequantize_decomposed`) and runs
    `reference_varlen_attention`."""
    _validate_all(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope)
    seg_k, seg_v, lens = dequantize_decomposed(ds, rope)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return reference_varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale, q_lens)


if triton is not None:
    from .quantization import _narrow
    from .quantized_attention import _mm, _per_row, _query_rows, _softmax_step, _store_rows, _tail_rows
    from .varlen_attention import _locate_split

    @triton.jit
    def _key_codes(kp_ptr, slot, n_ok, c0, KW, NC: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr):
        """int32 codes (BLOCK_N, NC) of key channels [c0, c0 + NC) at the given slots (one row of KW words each).

        WORDS (BITS divides 32 and PW divides c0 and NC): each word is loaded once and unpacked code index first,
        which keeps a word's codes in one thread; else (3 bits, 10 codes a word) each code reads its own word."""
        PW: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        if WORDS:
            w = c0 // PW + tl.arange(0, NC // PW)
            words = tl.load(kp_ptr + slot[:, None] * KW + w[None, :], mask=n_ok[:, None] & (w < KW)[None, :], other=0)
            u = words.to(tl.uint32, bitcast=True)[None, :, :]
            codes = (u >> (tl.arange(0, PW).to(tl.uint32) * BITS)[:, None, None]) & MASK  # (PW, BLOCK_N, NC / PW)
            return tl.reshape(tl.permute(codes, (1, 2, 0)), (slot.shape[0], NC)).to(tl.int32)
        else:
            c = c0 + tl.arange(0, NC)
            c_ok = c < KW * PW
            words = tl.load(kp_ptr + slot[:, None] * KW + (c // PW)[None, :], mask=n_ok[:, None] & c_ok[None, :],
                            other=0)  # fmt: skip
            return ((words.to(tl.uint32, bitcast=True) >> ((c % PW) * BITS).to(tl.uint32)[None, :]) & MASK).to(tl.int32)

    @triton.jit
    def _value_codes(vp_ptr, grp, t0, n_ok, d, d_ok, D, GS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     WORDS: tl.constexpr):  # fmt: skip
        """int32 codes (BLOCK_N, BLOCK_D) of the group's slots [t0, t0 + BLOCK_N) (t0 inside the group): word row
        grp * W + t // PW holds slot t of the group at bits (t % PW) * BITS, for every channel."""
        PW: tl.constexpr = 32 // BITS
        W: tl.constexpr = (GS + PW - 1) // PW
        MASK: tl.constexpr = (1 << BITS) - 1
        if WORDS:
            BW: tl.constexpr = BLOCK_N // PW
            rows = grp * W + t0 // PW + tl.arange(0, BW)
            words = tl.load(vp_ptr + rows[:, None] * D + d[None, :], mask=d_ok[None, :], other=0)
            u = words.to(tl.uint32, bitcast=True)[None, :, :]
            codes = (u >> (tl.arange(0, PW).to(tl.uint32) * BITS)[:, None, None]) & MASK  # (PW, BW, BLOCK_D)
            return tl.trans(tl.reshape(tl.permute(codes, (2, 1, 0)), (d.shape[0], BLOCK_N))).to(tl.int32)
        else:
            t = t0 + tl.arange(0, BLOCK_N)
            words = tl.load(vp_ptr + (grp * W + t // PW)[:, None] * D + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                            other=0)  # fmt: skip
            return ((words.to(tl.uint32, bitcast=True) >> ((t % PW) * BITS).to(tl.uint32)[:, None]) & MASK).to(tl.int32)

    @triton.jit
    def _levels(codes, lut_ptr, seg, LUT: tl.constexpr, NLEV: tl.constexpr, GATHER: tl.constexpr):
        """Reconstruction level of each code (float32): the segment's table, or the code itself (uniform). GATHER:
        the table is loaded once and indexed in registers (tl.gather), else each code loads its level."""
        if LUT:
            if GATHER and NLEV >= 16:  # Triton 3.6 fails to compile gathers from narrower tables (sm_90)
                lut = tl.load(lut_ptr + seg * NLEV + tl.arange(0, NLEV))
                return tl.gather(tl.broadcast_to(lut[None, :], (codes.shape[0], NLEV)), codes, 1)
            else:
                return tl.load(lut_ptr + seg * NLEV + codes)
        else:
            return codes.to(tl.float32)

    @triton.jit
    def _cos_sin(pos, freq, rope_scale, APPROX: tl.constexpr):
        """scale * (cos, sin) of pos * freq (float32, as the reference rounds the angle), reduced to [-pi, pi] first
        (angles reach 1e5 rad at long contexts). APPROX (GPU): the hardware's approximate sin/cos, accurate to ~1e-6
        on the reduced range."""
        theta = pos.to(tl.float32) * freq
        k = tl.floor(theta * 0.15915494309189535 + 0.5)
        theta = (theta - k * 6.28125) - k * 0.0019353071795864769  # 2 pi split: k * 6.28125 is exact in float32
        if APPROX:
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [theta], dtype=tl.float32, is_pure=True,
                                          pack=1)  # fmt: skip
            s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [theta], dtype=tl.float32, is_pure=True,
                                          pack=1)  # fmt: skip
        else:
            c = tl.cos(theta)
            s = tl.sin(theta)
        return c * rope_scale, s * rope_scale

    @triton.jit
    def _outlier_chunk(pos_ptr, val_ptr, o0, hi, t0, D, BLOCK_N: tl.constexpr, MO: tl.constexpr):
        """Outliers ``o0 .. o0 + MO`` of a group (its list ends at ``hi``), for the tile starting at slot ``t0`` of
        the group: (row in the tile, channel, inside the tile and the list, value as float32), each ``(MO,)``."""
        idx = o0 + tl.arange(0, MO)
        ok = idx < hi
        op = tl.load(pos_ptr + idx, mask=ok, other=0).to(tl.int32)
        row = op // D - t0
        ok = ok & (row >= 0) & (row < BLOCK_N)
        return row, op % D, ok, tl.load(val_ptr + idx, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _decomposed_split_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, cg_ptr, cl_ptr, cgr_ptr,
        klut_ptr, vlut_ptr, ka_ptr, kb_ptr, kblk_ptr, va_ptr, vb_ptr, vblk_ptr,
        kocu_ptr, kopos_ptr, koval_ptr, vocu_ptr, vopos_ptr, voval_ptr, pos_ptr, freq_ptr, rope_scale,
        tk_ptr, tv_ptr, tail_lens_ptr, q_lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_q, q_d, tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d, o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK, qk_scale,
        G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, HAS_QLENS: tl.constexpr, DIRECT: tl.constexpr,
        IEEE_DOT: tl.constexpr, DT: tl.constexpr, EXACT_BF16: tl.constexpr, WORDS: tl.constexpr,
        EVEN_D: tl.constexpr, REPS: tl.constexpr, ROWS: tl.constexpr,
        K_LUT: tl.constexpr, V_LUT: tl.constexpr, K_RANK: tl.constexpr, V_RANK: tl.constexpr, RP: tl.constexpr,
        K_OUT: tl.constexpr, V_OUT: tl.constexpr, ROPE: tl.constexpr, MO: tl.constexpr, GATHER: tl.constexpr,
        APPROX: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        PW: tl.constexpr = 32 // BITS
        NLEV: tl.constexpr = 1 << BITS
        HALF: tl.constexpr = BLOCK_D // 2
        KW = (D + PW - 1) // PW  # key words per slot
        pid = tl.program_id(0)
        mb = tl.program_id(1)
        found, seg, split = _locate_split(pid, cg_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK, GS,
                                          HAS_QLENS, BLOCK_S)  # fmt: skip
        if found == 0:
            return
        b = seg // HKV
        h = seg % HKV
        b64 = b.to(tl.int64)
        g_start = tl.load(cg_ptr + seg).to(tl.int64)
        n_slots = (tl.load(cg_ptr + seg + 1) - tl.load(cg_ptr + seg)) * GS
        ctx_len = tl.load(cl_ptr + seg)
        gap_end = tl.load(cgr_ptr + seg) * GS
        tail_len = tl.load(tail_lens_ptr + b)
        if HAS_QLENS:
            n_q = tl.load(q_lens_ptr + b)
        else:
            n_q = Q
        rep, qr, qi, qh, r_out, row_ok, tail_end, d, dk, d_ok, q = _query_rows(
            q_ptr, q_b, q_h, q_q, q_d, b64, h, mb, n_q, tail_len, G, Q, D, 1, False, EVEN_D, REPS, ROWS, BLOCK_M,
            BLOCK_D)  # fmt: skip
        qf = q.to(tl.float32)
        q_off = b64 * q_b + qh.to(tl.int64) * q_h + qi.to(tl.int64) * q_q
        if ROPE:  # power-of-two D (validated): BLOCK_D == D
            dh = tl.arange(0, HALF)
            q1 = tl.load(q_ptr + q_off[:, None] + dh[None, :] * q_d, mask=row_ok[:, None], other=0.0)
            q2 = tl.load(q_ptr + q_off[:, None] + (dh + HALF)[None, :] * q_d, mask=row_ok[:, None], other=0.0)
            freq = tl.load(freq_ptr + dh)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        zacc = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum over tokens of p * zero, per row

        k_lo = split * CHUNK  # a multiple of BLOCK_N, which divides GS: every tile lies inside one group
        k_hi = tl.minimum(k_lo + CHUNK, n_slots + tail_len)
        seg_hi = tl.minimum(k_hi, n_slots)
        n = tl.arange(0, BLOCK_N)
        rp = tl.arange(0, RP)
        grp_i = tl.arange(0, BLOCK_M // ROWS)
        for n0 in range(k_lo, seg_hi, BLOCK_N):
            cols = n0 + n
            c_ok = cols < seg_hi
            slot = g_start * GS + cols
            grp = g_start + n0 // GS
            t0 = n0 % GS  # first slot of the tile inside its group

            # Keys. Without RoPE the group's scales fold into q: q . k = (q * s) . level[c] + q . z (+ corrections
            # as dots on q); pre-RoPE keys are rebuilt per half (channels [0, D/2) and [D/2, D)), rotated, and enter
            # two half-width dots, so that rotate-half needs no register shuffles.
            if ROPE:
                s1 = tl.load(ks_ptr + grp * D + dh).to(tl.float32)
                s2 = tl.load(ks_ptr + grp * D + HALF + dh).to(tl.float32)
                z1 = tl.load(kz_ptr + grp * D + dh).to(tl.float32)
                z2 = tl.load(kz_ptr + grp * D + HALF + dh).to(tl.float32)
                k1 = _levels(
                    _key_codes(kp_ptr, slot, c_ok, 0, KW, HALF, BITS, WORDS), klut_ptr, seg, K_LUT, NLEV, GATHER
                )
                k2 = _levels(
                    _key_codes(kp_ptr, slot, c_ok, HALF, KW, HALF, BITS, WORDS), klut_ptr, seg, K_LUT, NLEV, GATHER
                )
                k1 = k1 * s1[None, :] + z1[None, :]
                k2 = k2 * s2[None, :] + z2[None, :]
                if K_RANK > 0:
                    blk = tl.load(kblk_ptr + grp).to(tl.int64)
                    a = tl.load(ka_ptr + slot[:, None] * K_RANK + rp[None, :], mask=c_ok[:, None] & (rp < K_RANK)[None, :],
                                other=0.0)  # fmt: skip
                    b_rows = kb_ptr + blk * K_RANK * D + rp[:, None] * D
                    b1 = tl.load(b_rows + dh[None, :], mask=(rp < K_RANK)[:, None], other=0.0)
                    b2 = tl.load(b_rows + HALF + dh[None, :], mask=(rp < K_RANK)[:, None], other=0.0)
                    k1 += _mm(a, b1, IEEE_DOT)
                    k2 += _mm(a, b2, IEEE_DOT)
                pos = tl.load(pos_ptr + slot, mask=c_ok, other=0)
                cs, sn = _cos_sin(pos[:, None], freq[None, :], rope_scale, APPROX)
                r1 = _narrow(k1 * cs - k2 * sn, DT, EXACT_BF16)
                r2 = _narrow(k2 * cs + k1 * sn, DT, EXACT_BF16)
                qk = _mm(q1, tl.trans(r1), IEEE_DOT) + _mm(q2, tl.trans(r2), IEEE_DOT)
            else:
                k_s = tl.load(ks_ptr + grp * D + d, mask=d_ok, other=0.0).to(tl.float32)
                k_z = tl.load(kz_ptr + grp * D + d, mask=d_ok, other=0.0).to(tl.float32)
                kl = _levels(
                    _key_codes(kp_ptr, slot, c_ok, 0, KW, BLOCK_D, BITS, WORDS), klut_ptr, seg, K_LUT, NLEV, GATHER
                )
                qs = _narrow(qf * k_s[None, :], DT, EXACT_BF16)
                qk = _mm(qs, tl.trans(_narrow(kl, DT, EXACT_BF16)), IEEE_DOT) + tl.sum(qf * k_z[None, :], 1)[:, None]
                if K_RANK > 0:  # q . (a_t b) = (q b^T) . a_t
                    blk = tl.load(kblk_ptr + grp).to(tl.int64)
                    a = tl.load(ka_ptr + slot[:, None] * K_RANK + rp[None, :], mask=c_ok[:, None] & (rp < K_RANK)[None, :],
                                other=0.0)  # fmt: skip
                    bt = tl.load(kb_ptr + blk * K_RANK * D + rp[None, :] * D + d[:, None],
                                 mask=(rp < K_RANK)[None, :] & d_ok[:, None], other=0.0)  # fmt: skip
                    qb = _narrow(_mm(q, bt, IEEE_DOT), DT, EXACT_BF16)
                    qk += _mm(qb, tl.trans(a), IEEE_DOT)
            if K_OUT:
                # Each outlier (slot t, channel c, value x) adds x * (R(pos_t)^T q)[c] to column t: a dot of the
                # (BLOCK_M, MO) weights with a one-hot (MO, BLOCK_N) slot matrix.
                lo = tl.load(kocu_ptr + grp)
                hi = tl.load(kocu_ptr + grp + 1)
                for o0 in range(lo, hi, MO):
                    row, ch, ok, x = _outlier_chunk(kopos_ptr, koval_ptr, o0, hi, t0, D, BLOCK_N, MO)
                    # q gathered at each outlier's channel (and at its rotate-half partner): cheaper than building a
                    # channel-spread matrix for one more dot (H100, benchmarks/kernels/decomposed_tuning.py).
                    qc = tl.load(q_ptr + q_off[:, None] + ch[None, :] * q_d, mask=row_ok[:, None] & ok[None, :],
                                 other=0.0).to(tl.float32)  # fmt: skip
                    if ROPE:
                        lower = ch < HALF
                        partner = tl.where(lower, ch + HALF, ch - HALF)
                        qp = tl.load(q_ptr + q_off[:, None] + partner[None, :] * q_d,
                                     mask=row_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
                        opos = tl.load(pos_ptr + g_start * GS + n0 + row, mask=ok, other=0)
                        oc, osn = _cos_sin(opos, tl.load(freq_ptr + ch % HALF), rope_scale, APPROX)
                        wf = (qc * oc[None, :] + qp * tl.where(lower, osn, -osn)[None, :]) * x[None, :]
                    else:
                        wf = qc * x[None, :]
                    w = _narrow(wf, DT, EXACT_BF16)
                    onehot = tl.where(ok[:, None] & (row[:, None] == n[None, :]), 1.0, 0.0)
                    qk += _mm(w, _narrow(onehot, DT, EXACT_BF16), IEEE_DOT)
            visible = c_ok & ((cols < ctx_len) | (cols >= gap_end))  # the gap is padding, not context
            qk = tl.where(row_ok[:, None] & visible[None, :], qk * qk_scale, float("-inf"))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i)

            # Values (groups of GS channels per token): replica rep folds the scales of value group rep into p,
            # p @ v = (p * s) @ level[c] + p @ z; corrections are dots on p, identical in every replica.
            vl = _levels(_value_codes(vp_ptr, grp, t0, c_ok, d, d_ok, D, GS, BITS, BLOCK_N, WORDS), vlut_ptr, seg,
                         V_LUT, NLEV, GATHER)  # fmt: skip
            sz = slot[None, :] * (D // GS) + grp_i[:, None]
            sz_ok = (grp_i < REPS)[:, None] & c_ok[None, :]
            v_s = _per_row(tl.load(vs_ptr + sz, mask=sz_ok, other=0.0), ROWS)
            v_z = _per_row(tl.load(vz_ptr + sz, mask=sz_ok, other=0.0), ROWS)
            ps = _narrow(p * v_s, DT, EXACT_BF16)
            pn = _narrow(p, DT, EXACT_BF16)
            upd = _mm(ps, _narrow(vl, DT, EXACT_BF16), IEEE_DOT)
            if V_RANK > 0:  # p @ (a b) = (p @ a) @ b
                blk = tl.load(vblk_ptr + grp).to(tl.int64)
                a = tl.load(va_ptr + slot[:, None] * V_RANK + rp[None, :], mask=c_ok[:, None] & (rp < V_RANK)[None, :],
                            other=0.0)  # fmt: skip
                bv = tl.load(vb_ptr + blk * V_RANK * D + rp[:, None] * D + d[None, :],
                             mask=(rp < V_RANK)[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
                upd += _mm(_narrow(_mm(pn, a, IEEE_DOT), DT, EXACT_BF16), bv, IEEE_DOT)
            if V_OUT:
                # Outlier (slot t, channel c, value x) adds p[:, t] * x to channel c: two one-hot dots.
                lo = tl.load(vocu_ptr + grp)
                hi = tl.load(vocu_ptr + grp + 1)
                for o0 in range(lo, hi, MO):
                    row, ch, ok, x = _outlier_chunk(vopos_ptr, voval_ptr, o0, hi, t0, D, BLOCK_N, MO)
                    rows_oh = _narrow(tl.where(ok[None, :] & (n[:, None] == row[None, :]), 1.0, 0.0), DT, EXACT_BF16)
                    pt = _mm(pn, rows_oh, IEEE_DOT) * x[None, :]  # (BLOCK_M, MO)
                    cols_oh = tl.where(ok[:, None] & (ch[:, None] == d[None, :]), 1.0, 0.0)
                    upd += _mm(_narrow(pt, DT, EXACT_BF16), _narrow(cols_oh, DT, EXACT_BF16), IEEE_DOT)
            acc = acc * alpha[:, None] + upd
            zacc = zacc * alpha + tl.sum(p * v_z, 1)

        h64 = h.to(tl.int64)
        m_i, l_i, acc, zacc = _tail_rows(q, qk_scale, tk_ptr + b64 * tk_b + h64 * tk_h, tv_ptr + b64 * tv_b + h64 * tv_h,
                                         tk_t, tk_d, tv_t, tv_d, tl.maximum(k_lo, n_slots) - n_slots, k_hi - n_slots,
                                         row_ok, tail_end, d, dk, d_ok, m_i, l_i, acc, zacc, IEEE_DOT, DT, EXACT_BF16,
                                         BLOCK_N)  # fmt: skip
        _store_rows(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b64, qr, qi, qh, rep,
                    r_out, d, d_ok, m_i, l_i, acc + zacc[:, None], G, Q, GS, DIRECT, BLOCK_D)  # fmt: skip


def _plan(q, ds: DecomposedSegments, tail_k, config: AttentionConfig | None) -> dict:
    """quantized_varlen_attention's launch parameters (row replicas per value group, 64-slot decode tiles) with key
    tiles inside one group. Decode defaults where the caller leaves None, from the H100 sweep
    (benchmarks/kernels/results/decomposed_tuning_h100.json): 8 programs per SM (the outlier loops are
    latency-bound), and 4 warps for pre-RoPE keys (rotating doubles the per-tile register work; 2 stay best
    otherwise)."""
    config = config or _DEFAULT_CONFIG
    if q.shape[2] == 1:
        fill = {"programs_per_sm": 8, "num_warps": 4 if ds.positions is not None else 2}
        config = dataclasses.replace(config, **{k: v for k, v in fill.items() if getattr(config, k) is None})
    p = _kivi_plan(q, ds.segs, tail_k, config)
    if p["block_n"] > ds.segs.group_size:
        p = _kivi_plan(q, ds.segs, tail_k, dataclasses.replace(config, block_n=ds.segs.group_size))
    return p


def decomposed_attention(
    q: torch.Tensor,
    ds: DecomposedSegments,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float,
    q_lens: torch.Tensor | None = None,
    rope: RotaryTable | None = None,
    check: bool = True,
    *,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of the newest tokens over decomposed quantized segments plus the causal full-precision tail.

    Args:
        q: (B, Hq, Q, D) queries of ``ds.segs.dtype``; query head hq reads kv head hq // (Hq / Hkv).
        ds: the compressed context of the B * Hkv segments, read in its compressed form in-kernel.
        tail_k, tail_v: (B, Hkv, T_cap, D) full-precision (post-RoPE) tokens added after the context.
        tail_lens: (B,) int valid tail entries per sequence.
        scale: softmax scale.
        q_lens: optional (B,) int valid queries per sequence (the rest is padding with output 0).
        rope: the model's rotary table; required when ``ds`` holds pre-RoPE keys.
        check: validate segment metadata and lengths (one host sync). Pass False on the decode hot path.
        config: optional launch overrides (tests, tuning).

    Returns:
        (B, Hq, Q, D) in q's dtype; float32 accumulation. On CPU (without KVPRESS_FORCE_TRITON) the torch reference
        runs instead.
    """
    _validate_all(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope)
    segs = ds.segs
    if check:
        _check_values(q, segs, tail_k, tail_lens, q_lens)
    if not use_triton(q):
        return reference_decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope)
    ensure_launchable(_decomposed_split_kernel, q)
    Q, D = q.shape[2], q.shape[3]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    p = _plan(q, ds, tail_k, config)
    has_qlens = q_lens is not None
    q_lens_arg = q_lens if has_qlens else tail_lens
    interp_bf16 = not q.is_cuda and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32 or interp_bf16
    dummy = segs.ctx_len  # stands in for absent tensors (never read: the matching flag is off)
    k_lr, v_lr, k_out, v_out = ds.k_lowrank, ds.v_lowrank, ds.k_outliers, ds.v_outliers
    ranks = [0 if lr is None else lr.rank for lr in (k_lr, v_lr)]
    rope_args = (ds.positions, rope.inv_freq.to(q.device, torch.float32).contiguous(), float(rope.scale)) if (
        ds.positions is not None) else (dummy, dummy, 1.0)  # fmt: skip
    parts = alloc_partials(p, Q, out)
    # Storage is read with row-major strides computed in-kernel (decompose_segments builds it contiguous).
    segs = dataclasses.replace(segs, **{f: getattr(segs, f).contiguous() for f in _STORAGE_FIELDS})
    _decomposed_split_kernel[(p["n_programs"], p["row_blocks"])](
        q, segs.k_packed, segs.k_scale, segs.k_zero, segs.v_packed, segs.v_scale, segs.v_zero, segs.cu_groups,
        segs.ctx_len, segs.ctx_groups,
        dummy if ds.k_levels is None else ds.k_levels, dummy if ds.v_levels is None else ds.v_levels,
        *((dummy, dummy, dummy) if k_lr is None else (k_lr.a, k_lr.b, k_lr.block)),
        *((dummy, dummy, dummy) if v_lr is None else (v_lr.a, v_lr.b, v_lr.block)),
        *((dummy, dummy, dummy) if k_out is None else (k_out.cu, k_out.pos, k_out.val)),
        *((dummy, dummy, dummy) if v_out is None else (v_out.cu, v_out.pos, v_out.val)),
        *rope_args,
        tail_k, tail_v, tail_lens, q_lens_arg, out, *parts,
        *q.stride(), *tail_k.stride(), *tail_v.stride(), *out.stride(),
        p["num_seg"], tail_k.shape[1], Q, D, p["chunk"], float(scale) * _LOG2E,
        G=p["G"], GS=segs.group_size, BITS=segs.bits, HAS_QLENS=has_qlens, DIRECT=p["direct"], IEEE_DOT=ieee,
        DT=_TL_DTYPES[q.dtype], EXACT_BF16=interp_bf16, WORDS=32 % segs.bits == 0, EVEN_D=D == p["block_d"],
        REPS=p["reps"], ROWS=p["rows"],
        K_LUT=ds.k_levels is not None, V_LUT=ds.v_levels is not None, K_RANK=ranks[0], V_RANK=ranks[1],
        RP=max(16, next_pow2(max(ranks))), K_OUT=k_out is not None, V_OUT=v_out is not None,
        ROPE=ds.positions is not None, MO=_OUTLIER_CHUNK, GATHER=_LUT_GATHER, APPROX=q.is_cuda and q.dtype != torch.float32,
        BLOCK_S=p["block_s"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    combine_splits(p, segs.cu_groups, segs.group_size, tail_lens, q_lens_arg, has_qlens, out, parts)
    return out
