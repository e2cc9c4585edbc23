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
from .varlen_attention import (
    _DEFAULT_CONFIG,
    _LOG2E,
    AttentionConfig,
    _launch_params,
    alloc_partials,
    combine_splits,
    reference_varlen_attention,
)

__all__ = ["decomposed_attention", "reference_decomposed_attention"]

_OUTLIER_CHUNK = 16
_STORAGE_FIELDS = (
    "k_packed",
    "k_scale",
    "k_zero",
    "v_packed",
    "v_scale",
    "v_zero",
)  # outliers scattered per dot (tl.dot needs >= 16 on each side)


def _validate_all(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope):
    if not isinstance(ds, DecomposedSegments):
        raise ValueError(f"ds must be a DecomposedSegments, got {type(ds).__name__}")  # noqa: TRY004
    ds.__post_init__()
    _validate(q, ds.segs, tail_k, tail_v, tail_lens, scale, q_lens)
    if ds.positions is not None:
        if not isinstance(rope, RotaryTable):
            raise ValueError("ds holds pre-RoPE keys: rope must be the model's RotaryTable")
        D = q.shape[-1]
        if D & (D - 1):
            raise ValueError(f"pre-RoPE keys are rotated in-kernel for power-of-two head dims only, got {D}")


def reference_decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, q_lens=None, rope=None):
    """Torch reference of `decomposed_attention`: reconstructs the valid tokens (`dequantize_decomposed`) and runs
    `reference_varlen_attention`."""
    _validate_all(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope)
    seg_k, seg_v, lens = dequantize_decomposed(ds, rope)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return reference_varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale, q_lens)


if triton is not None:
    from .quantization import _narrow
    from .varlen_attention import _attend_tail, _load_queries, _locate_split, _online_step, _write_split

    @triton.jit
    def _rebuild(codes, lut_ptr, seg, LUT: tl.constexpr, NLEV: tl.constexpr):
        """Level of each code (float32): a lookup in the segment's table, or the code itself for uniform levels."""
        if LUT:
            return tl.load(lut_ptr + seg * NLEV + codes.to(tl.int32))
        else:
            return codes.to(tl.float32)

    @triton.jit
    def _add_low_rank(x, a_ptr, b_ptr, blk_ptr, slot, n_ok, grp, d, d_ok, D, R: tl.constexpr, RP: tl.constexpr):
        """x + a[slot] @ b[block of grp]: (BLOCK_N, BLOCK_D) float32; RP = R padded to a dot-able size."""
        r = tl.arange(0, RP)
        r_ok = r < R
        a = tl.load(a_ptr + slot[:, None] * R + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        blk = tl.load(blk_ptr + grp).to(tl.int64)
        b = tl.load(b_ptr + blk * R * D + r[:, None] * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        return x + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _add_outliers(x, cu_ptr, pos_ptr, val_ptr, grp, first_slot, n, d, D, MO: tl.constexpr):
        """x + the outliers of group grp whose slot in the group is first_slot + n (n < BLOCK_N)."""
        lo = tl.load(cu_ptr + grp)
        hi = tl.load(cu_ptr + grp + 1)
        m = tl.arange(0, MO)
        for o0 in range(lo, hi, MO):
            idx = o0 + m
            ok = idx < hi
            p = tl.load(pos_ptr + idx, mask=ok, other=0).to(tl.int32)
            v = tl.load(val_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            row = p // D - first_slot
            col = p % D
            onehot = tl.where(ok[None, :] & (row[None, :] == n[:, None]), 1.0, 0.0)  # (BLOCK_N, MO)
            spread = tl.where(col[:, None] == d[None, :], v[:, None], 0.0)  # (MO, BLOCK_D)
            x += tl.dot(onehot, spread, input_precision="ieee")
        return x

    @triton.jit
    def _rope(x, pos, inv_freq_ptr, rope_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rotate-half RoPE of a (BLOCK_N, BLOCK_D) float32 tile to positions pos (BLOCK_N,)."""
        HALF: tl.constexpr = BLOCK_D // 2
        freq = tl.load(inv_freq_ptr + tl.arange(0, HALF))
        theta = pos.to(tl.float32)[:, None] * freq[None, :]
        c = tl.cos(theta) * rope_scale
        s = tl.sin(theta) * rope_scale
        x1, x2 = tl.split(tl.permute(tl.reshape(x, (BLOCK_N, 2, HALF)), (0, 2, 1)))
        y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)  # (BLOCK_N, HALF, 2)
        return tl.reshape(tl.permute(y, (0, 2, 1)), (BLOCK_N, BLOCK_D))

    @triton.jit
    def _decomposed_split_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, cg_ptr, cl_ptr, cgr_ptr,
        klut_ptr, vlut_ptr, ka_ptr, kb_ptr, kblk_ptr, va_ptr, vb_ptr, vblk_ptr,
        kocu_ptr, kopos_ptr, koval_ptr, vocu_ptr, vopos_ptr, voval_ptr, pos_ptr, freq_ptr, rope_scale,
        tk_ptr, tv_ptr, tail_lens_ptr, q_lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_q, q_d, tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d, o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK, qk_scale,
        G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, HAS_QLENS: tl.constexpr, DIRECT: tl.constexpr,
        IEEE_DOT: tl.constexpr, DT: tl.constexpr, EXACT_BF16: tl.constexpr,
        K_LUT: tl.constexpr, V_LUT: tl.constexpr, K_RANK: tl.constexpr, V_RANK: tl.constexpr, RP: tl.constexpr,
        K_OUT: tl.constexpr, V_OUT: tl.constexpr, ROPE: tl.constexpr, MO: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        PW: tl.constexpr = 32 // BITS
        W: tl.constexpr = (GS + PW - 1) // PW  # value word rows per group (3 bits: 10 codes a word, the last partial)
        KW = (D + PW - 1) // PW  # key words per slot
        MASK: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0)
        mb = tl.program_id(1)
        found, seg, split = _locate_split(pid, cg_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK, GS,
                                          HAS_QLENS, BLOCK_S)  # fmt: skip
        if found == 0:
            return
        b = seg // HKV
        h = seg % HKV
        g_start = tl.load(cg_ptr + seg).to(tl.int64)
        n_slots = (tl.load(cg_ptr + seg + 1) - tl.load(cg_ptr + seg)) * GS
        ctx_len = tl.load(cl_ptr + seg)
        gap_end = tl.load(cgr_ptr + seg) * GS
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

        k_lo = split * CHUNK  # a multiple of BLOCK_N, which divides GS: every tile lies inside one group
        k_hi = tl.minimum(k_lo + CHUNK, n_slots + tail_len)
        seg_hi = tl.minimum(k_hi, n_slots)
        n = tl.arange(0, BLOCK_N)
        dw = d // PW
        dshift = ((d % PW) * BITS).to(tl.uint32)
        for n0 in range(k_lo, seg_hi, BLOCK_N):
            cols = n0 + n
            c_ok = cols < seg_hi
            slot = g_start * GS + cols  # global slot of each tile row
            grp = g_start + n0 // GS
            in_grp = cols % GS  # slot inside the group
            tile_ok = c_ok[:, None] & d_ok[None, :]

            # Keys: one row of D / PW words per slot, channel d at word d // PW, bits (d % PW) * BITS.
            words = tl.load(kp_ptr + slot[:, None] * KW + dw[None, :], mask=tile_ok, other=0)
            codes = (words.to(tl.uint32, bitcast=True) >> dshift[None, :]) & MASK
            k_s = tl.load(ks_ptr + grp * D + d, mask=d_ok, other=0.0).to(tl.float32)
            k_z = tl.load(kz_ptr + grp * D + d, mask=d_ok, other=0.0).to(tl.float32)
            k = _rebuild(codes, klut_ptr, seg, K_LUT, 1 << BITS) * k_s[None, :] + k_z[None, :]
            if K_RANK > 0:
                k = _add_low_rank(k, ka_ptr, kb_ptr, kblk_ptr, slot, c_ok, grp, d, d_ok, D, K_RANK, RP)
            if K_OUT:
                k = _add_outliers(k, kocu_ptr, kopos_ptr, koval_ptr, grp, n0 % GS, n, d, D, MO)
            if ROPE:
                pos = tl.load(pos_ptr + slot, mask=c_ok, other=0)
                k = _rope(k, pos, freq_ptr, rope_scale, BLOCK_N, BLOCK_D)
            k = _narrow(k, DT, EXACT_BF16)

            # Values: word row grp * W + t // PW holds slot t of the group at bits (t % PW) * BITS, every channel.
            words = tl.load(vp_ptr + (grp * W + in_grp // PW)[:, None] * D + d[None, :], mask=tile_ok, other=0)
            vshift = ((in_grp % PW) * BITS).to(tl.uint32)
            codes = (words.to(tl.uint32, bitcast=True) >> vshift[:, None]) & MASK
            sz = slot[:, None] * (D // GS) + (d // GS)[None, :]
            v_s = tl.load(vs_ptr + sz, mask=tile_ok, other=0.0).to(tl.float32)
            v_z = tl.load(vz_ptr + sz, mask=tile_ok, other=0.0).to(tl.float32)
            v = _rebuild(codes, vlut_ptr, seg, V_LUT, 1 << BITS) * v_s + v_z
            if V_RANK > 0:
                v = _add_low_rank(v, va_ptr, vb_ptr, vblk_ptr, slot, c_ok, grp, d, d_ok, D, V_RANK, RP)
            if V_OUT:
                v = _add_outliers(v, vocu_ptr, vopos_ptr, voval_ptr, grp, n0 % GS, n, d, D, MO)
            v = _narrow(v, DT, EXACT_BF16)

            if IEEE_DOT:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            visible = c_ok & ((cols < ctx_len) | (cols >= gap_end))  # the gap is padding, not context
            qk = tl.where(row_ok[:, None] & visible[None, :], qk * qk_scale, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)

        b64 = b.to(tl.int64)
        m_i, l_i, acc = _attend_tail(q, qk_scale, tk_ptr + b64 * tk_b + h.to(tl.int64) * tk_h,
                                     tv_ptr + b64 * tv_b + h.to(tl.int64) * tv_h, tk_t, tk_d, tv_t, tv_d,
                                     tl.maximum(k_lo, n_slots) - n_slots, k_hi - n_slots, row_ok, tail_end, d, d_ok,
                                     m_i, l_i, acc, IEEE_DOT, BLOCK_N)  # fmt: skip
        _write_split(
            out_ptr,
            part_acc_ptr,
            part_m_ptr,
            part_l_ptr,
            o_b,
            o_h,
            o_q,
            o_d,
            pid,
            b,
            r,
            qi,
            qh,
            d,
            d_ok,
            m_i,
            l_i,
            acc,
            Q,
            G,
            DIRECT,
            BLOCK_D,
        )


def _plan(q, ds: DecomposedSegments, tail_k, config: AttentionConfig | None) -> dict:
    """varlen_attention's launch parameters with key tiles inside one group and splits on tile boundaries."""
    B, Hq, Q, D = q.shape
    segs = ds.segs
    config = config or _DEFAULT_CONFIG
    args = (B, Hq, Q, D, tail_k.shape[1], tail_k.shape[2], segs.n_groups * segs.group_size, q.dtype, q.device)
    p = _launch_params(*args, config)
    block_n = min(p["block_n"], segs.group_size)
    if block_n != p["block_n"] or (not p["direct"] and p["chunk"] % block_n):
        fixed = AttentionConfig(
            block_n=block_n, num_warps=config.num_warps, num_stages=config.num_stages,
            split_tokens=-(-p["chunk"] // block_n) * block_n, programs_per_sm=config.programs_per_sm,
            combine_rows=config.combine_rows,
        )  # fmt: skip
        p = _launch_params(*args, fixed)
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
        DT=_TL_DTYPES[q.dtype], EXACT_BF16=interp_bf16,
        K_LUT=ds.k_levels is not None, V_LUT=ds.v_levels is not None, K_RANK=ranks[0], V_RANK=ranks[1],
        RP=max(16, next_pow2(max(ranks))), K_OUT=k_out is not None, V_OUT=v_out is not None,
        ROPE=ds.positions is not None, MO=_OUTLIER_CHUNK,
        BLOCK_S=p["block_s"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    combine_splits(p, segs.cu_groups, segs.group_size, tail_lens, q_lens_arg, has_qlens, out, parts)
    return out
