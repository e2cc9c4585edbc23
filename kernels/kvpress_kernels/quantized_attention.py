"""Attention of new query tokens over quantized ragged segments plus the full-precision causal tail.

The contract is that of `varlen_attention` (varlen_attention.py) with the ragged context given as
`QuantizedSegments` (quantized_segments.py). The kernel reuses varlen_attention's work decomposition (split-K
over segment ++ tail, load balanced over ragged lengths, GQA rows sharing every K/V tile, log-sum-exp merge of the
splits). Its segment loop never forms dequantized keys or values; the scales and zeros are folded into the other
operand of each dot product, which then runs on the raw codes ``c``:

- keys (groups of ``GS`` tokens per channel): for a token t of key group g, ``q . k_t = (q * s_g) . c_t + q . z_g``.
  A tile of key slots spans whole groups or lies inside one, and each of its groups is one dot product of the
  scaled queries with the tile's codes (columns of other groups discarded);
- values (groups of ``GS`` channels per token): restricted to the channels of value group g,
  ``p @ v = (p * s_g) @ c + p @ z_g``. The query rows are replicated once per value group (``REPS = D / GS``
  copies; decode fills a few of the 16 rows a dot product needs anyway), replica g folds the scales of group g into
  its softmax weights and owns the output channels of group g; ``p @ z_g`` is a per-row sum.

Codes are packed along the axis each dot product reduces (keys along channels, values along tokens;
quantization.py), so a thread's words unpack into the consecutive reduction elements its matrix-multiply
fragment holds, without an exchange through shared memory. Codes become dot operands without int-to-float
conversions: OR'ed into the mantissa of ``2**MANT`` (bfloat16 128.0, float16 1024.0, up to 7 / 10 bits) a code c is
the number ``2**MANT + c`` exactly, and the offset ``2**MANT * sum(operand)`` is subtracted together with the zero
term. Two codes are unpacked per 32-bit operation (the low and high halves of a packed word hold codes j and
j + PER_WORD / 2), so inside each word the key channels and the value tokens run in a fixed permuted order (`_slot`):
q, key scales and tail keys are read in that channel order, key columns, masks and value scales in that token order.
float32 (and 8-bit codes with bfloat16) converts codes exactly instead.

Rounding: the scaled operands ``q * s_g`` and ``p * s_g`` are rounded once to the model dtype (where dequantizing
would round k and v), products accumulate in float32. No full-precision copy of the context exists at any point; the
gap slots of a segment's partial context group are masked like out-of-range slots.
"""

import dataclasses

import torch

from ._common import check_tensor, ensure_launchable, next_pow2, tl, triton, use_triton
from .quantization import _TL_DTYPES
from .quantized_segments import QuantizedSegments, _kivi_bits, check_segments, dequantize_segments
from .varlen_attention import (
    _DEFAULT_CONFIG,
    _LOG2E,
    AttentionConfig,
    _launch_params,
    alloc_partials,
    combine_splits,
    raise_flags,
    reference_varlen_attention,
    tail_value_flags,
    validate_queries_and_tail,
)

__all__ = ["quantized_varlen_attention", "reference_quantized_varlen_attention"]

# Split boundaries fall on whole packed words: 16 tokens fill a word of 2-bit codes (the most per word).
_SPLIT_ALIGN = 16
# Decode (one query token) launch defaults where the caller's AttentionConfig leaves None: 64-slot tiles and 2 warps
# (the rest as varlen_attention: 2 stages, about 4 programs per SM) were the fastest of the configurations timed on
# the H100 from 16k to 128k tokens per head (benchmarks/kernels/results/quantized_decode_bandwidth_h100.json, "sweep"
# and "sweep_graph"): two warps replicate the scaled-query operand less, and smaller programs keep more of them
# resident to hide the unpacking latency. Question blocks (several query tokens) keep varlen_attention's heuristic.
_DECODE_DEFAULTS = {"block_n": 64, "num_warps": 2}
# (bit pattern of 2**MANT, 2**MANT, MANT) per 16-bit dtype: codes of up to MANT bits OR'ed into the mantissa.
_MAGIC = {torch.bfloat16: (0x4300, 128.0, 7), torch.float16: (0x6400, 1024.0, 10)}


def _with_defaults(config: AttentionConfig | None, decode: bool) -> AttentionConfig:
    """The caller's overrides, tuned defaults for the rest (decode only); split_tokens rounded up to whole words."""
    config = config or _DEFAULT_CONFIG
    if config.block_n is not None and (config.block_n < 16 or config.block_n & (config.block_n - 1)):
        raise ValueError(f"config.block_n must be a power of two >= 16 for quantized segments, got {config.block_n}")
    filled = {k: v for k, v in _DECODE_DEFAULTS.items() if decode and getattr(config, k) is None}
    if config.split_tokens is not None:
        filled["split_tokens"] = -(-max(1, int(config.split_tokens)) // _SPLIT_ALIGN) * _SPLIT_ALIGN
    return dataclasses.replace(config, **filled) if filled else config


def _validate(q, segs, tail_k, tail_v, tail_lens, scale, q_lens):
    check_segments(segs)
    check_tensor(q, "q", ndim=4)
    if q.dtype != segs.dtype:
        raise ValueError(f"q has dtype {q.dtype}, expected the dtype of segs ({segs.dtype})")
    if q.device != segs.device:
        raise ValueError(f"segs is on {segs.device}, expected {q.device} (same device as q)")
    B, _, _, D = q.shape
    if segs.head_dim != D:
        raise ValueError(f"segs.head_dim = {segs.head_dim} must equal q.shape[3] = {D}")
    validate_queries_and_tail(q, tail_k, tail_v, tail_lens, scale, q_lens)
    S = B * tail_k.shape[1]
    if segs.num_segments != S:
        raise ValueError(f"segs has {segs.num_segments} segments, expected batch * kv_heads = {S}")


def _check_values(q, segs, tail_k, tail_lens, q_lens):
    """Data checks, one host sync: group prefix sums and context lengths consistent, tail lengths fit."""
    cu, G = segs.cu_groups.long(), segs.group_size
    ctx_len, ctx_groups = segs.ctx_len.long(), segs.ctx_groups.long()
    raise_flags([
        ((cu[0] != 0) | (cu[-1] != segs.n_groups) | (cu[1:] < cu[:-1]).any(),
         f"segs.cu_groups must be non-decreasing prefix sums from 0 to n_groups = {segs.n_groups}"),
        ((ctx_len < 0).any() | (ctx_groups != (ctx_len + G - 1) // G).any(),
         "segs.ctx_len must be >= 0 and segs.ctx_groups = ceil(ctx_len / group_size)"),
        ((ctx_groups > cu[1:] - cu[:-1]).any(), "segs.ctx_groups must not exceed the groups of each segment"),
    ] + tail_value_flags(q, tail_k, tail_lens, q_lens))  # fmt: skip


def reference_quantized_varlen_attention(q, segs, tail_k, tail_v, tail_lens, scale, q_lens=None):
    """Torch reference of `quantized_varlen_attention` (same arguments, same results; padding query rows give 0).

    Dequantizes the valid tokens (`dequantize_segments`, torch path) and runs `reference_varlen_attention`.
    """
    _validate(q, segs, tail_k, tail_v, tail_lens, scale, q_lens)
    _kivi_bits(segs.bits)
    seg_k, seg_v, lens = dequantize_segments(segs, reference=True)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return reference_varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale, q_lens)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel (the split plan and the merge of split partials are varlen_attention's)
# --------------------------------------------------------------------------------------------------------------

if triton is not None:
    from .quantization import _narrow
    from .varlen_attention import _locate_split

    @triton.jit
    def _slot(i, PW: tl.constexpr, PAIR: tl.constexpr):
        """Code index held by column i of an unpacked tile: token of a key tile, channel of a value tile."""
        if PAIR:
            e = i % PW
            return i - e + e // 2 + (e % 2) * (PW // 2)
        else:
            return i

    @triton.jit
    def _codes(words, code_or, BITS: tl.constexpr, PAIR: tl.constexpr, DT: tl.constexpr):
        """(A, W) int32 words -> codes of dtype DT, (PW // 2, A, W, 2) with PAIR else (PW, A, W); PW = 32 // BITS.

        PAIR: [j, a, w, i] holds code j + i * PW // 2 of word (a, w) as the number 2**MANT + c; code_or is the bit
        pattern of 2**MANT in both halves of a 32-bit word (a runtime scalar, so that mask and OR fuse into one
        LOP3: two immediates cannot). Else [j, a, w] holds code j converted exactly. The code index leads: the
        default register layout then keeps a word's codes in one thread."""
        PW: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        u = words.to(tl.uint32, bitcast=True)[None, :, :]
        if PAIR:
            s = tl.arange(0, PW // 2).to(tl.uint32) * BITS
            t = ((u >> s[:, None, None]) & (MASK | (MASK << 16))) | code_or.to(tl.uint32)
            return tl.join(t.to(tl.uint16), (t >> 16).to(tl.uint16)).to(DT, bitcast=True)
        else:
            s = tl.arange(0, PW).to(tl.uint32) * BITS
            return ((u >> s[:, None, None]) & MASK).to(tl.float32).to(DT)  # exact: codes have at most 8 bits

    # _unpack_rows / _unpack_cols and the tl.trans at their call sites look interchangeable; they are not for the
    # compiler. Unpacking in the words' own orientation and transposing afterwards lets Triton pick register layouts
    # that match the dot operands; the direct forms (e.g. tl.trans(words) first, or values unpacked untransposed)
    # compiled for sm_90 to 17-33% more instructions per loop, the codes passing through shared memory (11 -> 139-267
    # shared stores per iteration, Triton 3.6, 4-bit decode configuration).
    @triton.jit
    def _unpack_rows(words, code_or, BITS: tl.constexpr, PAIR: tl.constexpr, DT: tl.constexpr):
        """(A, W) words -> (A, W * PW) codes: column w * PW + e holds code _slot(e) of word (a, w)."""
        A: tl.constexpr = words.shape[0]
        W: tl.constexpr = words.shape[1]
        codes = _codes(words, code_or, BITS, PAIR, DT)
        if PAIR:
            codes = tl.permute(codes, (1, 2, 0, 3))
        else:
            codes = tl.permute(codes, (1, 2, 0))
        return tl.reshape(codes, (A, W * (32 // BITS)))

    @triton.jit
    def _unpack_cols(words, code_or, BITS: tl.constexpr, PAIR: tl.constexpr, DT: tl.constexpr):
        """(W, C) words -> (C, W * PW) codes, transposed: column w * PW + e holds code _slot(e) of word (w, c)."""
        W: tl.constexpr = words.shape[0]
        C: tl.constexpr = words.shape[1]
        codes = _codes(words, code_or, BITS, PAIR, DT)
        if PAIR:
            codes = tl.permute(codes, (2, 1, 0, 3))
        else:
            codes = tl.permute(codes, (2, 1, 0))
        return tl.reshape(codes, (C, W * (32 // BITS)))

    @triton.jit
    def _per_row(x, ROWS: tl.constexpr):
        """(R, N) -> (R * ROWS, N) float32: row r of the result is row r // ROWS of x."""
        R: tl.constexpr = x.shape[0]
        N: tl.constexpr = x.shape[1]
        return tl.reshape(tl.broadcast_to(x[:, None, :], (R, ROWS, N)), (R * ROWS, N)).to(tl.float32)

    @triton.jit
    def _mm(a, b, IEEE_DOT: tl.constexpr):
        if IEEE_DOT:
            # fp32 inputs, or bf16 under the CPU interpreter (its bf16 tl.dot is wrong): exact fp32 products.
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _softmax_step(qk, m_i, l_i):
        """Online softmax over a (rows, tokens) tile of log2-unit logits (masked entries -inf): (p, alpha, m, l)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0 weight
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _query_rows(q_ptr, q_b, q_h, q_q, q_d, b64, h, mb, n_q, tail_len, G: tl.constexpr, Q, D, PW: tl.constexpr,
                    PAIR: tl.constexpr, EVEN_D: tl.constexpr, REPS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Dot row r is replica rep = r // ROWS (value group) of query row qr: query token qi = qr // G of head
        qh = h * G + qr % G. Returns (rep, qr, qi, qh, r_out: rows that write (padding queries write 0), row_ok:
        rows of valid queries, tail_end: exclusive end of the tail each row sees, dq: value / accumulator channels,
        dk: the channel of q and of key-tile row dq (the unpacked order of key words), dq_ok, q (BLOCK_M, BLOCK_D)
        read in dk order)."""
        r = tl.arange(0, BLOCK_M)
        rep = r // ROWS
        qr = mb * ROWS + r % ROWS
        qi = qr // G
        qh = h * G + qr % G
        r_out = (rep < REPS) & (qr < G * Q)
        row_ok = r_out & (qi < n_q)
        tail_end = tail_len - n_q + qi + 1
        dq = tl.arange(0, BLOCK_D)
        dk = _slot(dq, PW, PAIR)
        if EVEN_D:
            dq_ok = dq < BLOCK_D
        else:
            dq_ok = dq < D
        q_off = b64 * q_b + qh.to(tl.int64) * q_h + qi.to(tl.int64) * q_q
        q = tl.load(q_ptr + q_off[:, None] + dk[None, :] * q_d, mask=row_ok[:, None] & dq_ok[None, :], other=0.0)
        return rep, qr, qi, qh, r_out, row_ok, tail_end, dq, dk, dq_ok, q

    @triton.jit
    def _quantized_split_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, cg_ptr, cl_ptr, cgr_ptr,
        tk_ptr, tv_ptr, tail_lens_ptr, q_lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_q, q_d, kp_n, kp_w, ks_n, ks_d, vp_n, vp_d, vs_n, vs_g,
        tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d, o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK, qk_scale, code_or,
        G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, HAS_QLENS: tl.constexpr, DIRECT: tl.constexpr,
        IEEE_DOT: tl.constexpr, DT: tl.constexpr, EXACT_BF16: tl.constexpr, OFF: tl.constexpr, PAIR: tl.constexpr,
        EVEN_D: tl.constexpr, REPS: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        PW: tl.constexpr = 32 // BITS
        W: tl.constexpr = GS // PW  # value word rows per group (GS * BITS is a multiple of 32)
        BW: tl.constexpr = BLOCK_N // PW  # value word rows per tile
        BLOCK_DW: tl.constexpr = BLOCK_D // PW  # key words per token (padded)
        KT: tl.constexpr = min(GS, BLOCK_N)  # key slots of one tile sharing a scale group

        pid = tl.program_id(0)
        mb = tl.program_id(1)
        found, seg, split = _locate_split(pid, cg_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK, GS,
                                          HAS_QLENS, BLOCK_S)  # fmt: skip
        if found == 0:
            return  # grid is an upper bound on the number of splits
        b = seg // HKV
        h = seg % HKV
        b64 = b.to(tl.int64)
        g_start = tl.load(cg_ptr + seg).to(tl.int64)
        n_slots = (tl.load(cg_ptr + seg + 1) - tl.load(cg_ptr + seg)) * GS
        ctx_len = tl.load(cl_ptr + seg)
        gap_end = tl.load(cgr_ptr + seg) * GS  # slots [ctx_len, gap_end) pad the last context group
        tail_len = tl.load(tail_lens_ptr + b)
        if HAS_QLENS:
            n_q = tl.load(q_lens_ptr + b)
        else:
            n_q = Q

        rep, qr, qi, qh, r_out, row_ok, tail_end, dq, dk, dq_ok, q = _query_rows(
            q_ptr, q_b, q_h, q_q, q_d, b64, h, mb, n_q, tail_len, G, Q, D, PW, PAIR, EVEN_D, REPS, ROWS, BLOCK_M,
            BLOCK_D)  # fmt: skip
        dw = tl.arange(0, BLOCK_DW)
        if EVEN_D:  # compile-time all-true masks keep loads vectorised
            dw_ok = dw < BLOCK_DW
        else:
            dw_ok = dw < D // PW
        qf = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        zacc = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum over tokens of p * zero, per row

        k_lo = split * CHUNK  # a multiple of KT (or 0): tiles start on whole words and scale groups
        k_hi = tl.minimum(k_lo + CHUNK, n_slots + tail_len)
        seg_hi = tl.minimum(k_hi, n_slots)  # a multiple of PW: n_slots and CHUNK are
        n = tl.arange(0, BLOCK_N)
        tok = _slot(n, PW, PAIR)  # token (offset in the tile) of key-tile column / value-tile row n
        wi = tl.arange(0, BW)
        grp_i = tl.arange(0, BLOCK_M // ROWS)
        for n0 in range(k_lo, seg_hi, BLOCK_N):
            # Keys: one row of D / PW words per token slot, gathered in tile order and unpacked to a (D, BLOCK_N)
            # tile whose row dq holds channel dk[dq].
            cols = n0 + tok
            c_ok = cols < seg_hi
            words = tl.load(kp_ptr + (g_start * GS + cols)[:, None] * kp_n + dw[None, :] * kp_w,
                            mask=c_ok[:, None] & dw_ok[None, :], other=0)  # fmt: skip
            k_codes = tl.trans(_unpack_rows(words, code_or, BITS, PAIR, DT))
            for j in tl.static_range(BLOCK_N // KT):
                # Scale group of tile columns [j * KT, (j + 1) * KT): q . k = (q * s) . c + q . z - OFF * sum(q * s).
                t0 = n0 + j * KT
                grp = g_start + t0 // GS
                g_ok = dq_ok & (t0 + 0 * dq < seg_hi)  # a tensor compare (the interpreter rejects bool & scalar)
                k_s = tl.load(ks_ptr + grp * ks_n + dk * ks_d, mask=g_ok, other=0.0).to(tl.float32)
                k_z = tl.load(kz_ptr + grp * ks_n + dk * ks_d, mask=g_ok, other=0.0).to(tl.float32)
                qs = _narrow(qf * k_s[None, :], DT, EXACT_BF16)
                corr = tl.sum(qf * k_z[None, :] - OFF * qs.to(tl.float32), 1)
                part = _mm(qs, k_codes, IEEE_DOT) + corr[:, None]
                if j == 0:
                    qk = part
                else:
                    qk = tl.where((n // KT == j)[None, :], part, qk)
            visible = c_ok & ((cols < ctx_len) | (cols >= gap_end))  # the gap is padding, not context
            qk = tl.where(row_ok[:, None] & visible[None, :], qk * qk_scale, float("-inf"))
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i)

            # Values: word row w holds tokens n0 + w * PW + [0, PW) of every channel; unpacked to a (BLOCK_N, D)
            # tile whose row n holds token n0 + tok[n], matching the key columns.
            v_row = g_start * GS + cols
            tok_w = n0 + wi * PW
            words = tl.load(vp_ptr + (g_start * W + tok_w // PW)[:, None] * vp_n + dq[None, :] * vp_d,
                            mask=(tok_w < seg_hi)[:, None] & dq_ok[None, :], other=0)  # fmt: skip
            v_codes = tl.trans(_unpack_cols(words, code_or, BITS, PAIR, DT))
            # Scale and zero of (value group of the row, token), loaded once per group and spread over its rows.
            sz = grp_i[:, None] * vs_g + v_row[None, :] * vs_n
            sz_ok = (grp_i < REPS)[:, None] & c_ok[None, :]
            v_s = _per_row(tl.load(vs_ptr + sz, mask=sz_ok, other=0.0), ROWS)
            v_z = _per_row(tl.load(vz_ptr + sz, mask=sz_ok, other=0.0), ROWS)
            ps = _narrow(p * v_s, DT, EXACT_BF16)
            acc = acc * alpha[:, None] + _mm(ps, v_codes, IEEE_DOT)
            zacc = zacc * alpha + tl.sum(p * v_z - OFF * ps.to(tl.float32), 1)

        h64 = h.to(tl.int64)
        m_i, l_i, acc, zacc = _tail_rows(q, qk_scale, tk_ptr + b64 * tk_b + h64 * tk_h, tv_ptr + b64 * tv_b + h64 * tv_h,
                                         tk_t, tk_d, tv_t, tv_d, tl.maximum(k_lo, n_slots) - n_slots, k_hi - n_slots,
                                         row_ok, tail_end, dq, dk, dq_ok, m_i, l_i, acc, zacc, IEEE_DOT, DT,
                                         EXACT_BF16, BLOCK_N)  # fmt: skip
        _store_rows(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b64, qr, qi, qh, rep,
                    r_out, dq, dq_ok, m_i, l_i, acc + zacc[:, None], G, Q, GS, DIRECT, BLOCK_D)  # fmt: skip

    @triton.jit
    def _tail_rows(q, qk_scale, tk_base, tv_base, tk_t, tk_d, tv_t, tv_d, t_lo, t_hi, row_ok, tail_end, dq, dk, dq_ok,
                   m_i, l_i, acc, zacc, IEEE_DOT: tl.constexpr, DT: tl.constexpr, EXACT_BF16: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
        """Online softmax over tail positions [t_lo, t_hi), causally masked per query row (tail_end); keys are read
        in q's channel order dk. Returns (m_i, l_i, acc, zacc)."""
        n = tl.arange(0, BLOCK_N)
        for t0 in range(t_lo, t_hi, BLOCK_N):
            cols = t0 + n
            c_ok = cols < t_hi
            k = tl.load(tk_base + cols[:, None] * tk_t + dk[None, :] * tk_d, mask=c_ok[:, None] & dq_ok[None, :],
                        other=0.0)  # fmt: skip
            v = tl.load(tv_base + cols[:, None] * tv_t + dq[None, :] * tv_d, mask=c_ok[:, None] & dq_ok[None, :],
                        other=0.0)  # fmt: skip
            qk = _mm(q, tl.trans(k), IEEE_DOT) * qk_scale
            visible = row_ok[:, None] & c_ok[None, :] & (cols[None, :] < tail_end[:, None])
            p, alpha, m_i, l_i = _softmax_step(tl.where(visible, qk, float("-inf")), m_i, l_i)
            acc = acc * alpha[:, None] + _mm(_narrow(p, DT, EXACT_BF16), v, IEEE_DOT)
            zacc = zacc * alpha
        return m_i, l_i, acc, zacc

    @triton.jit
    def _store_rows(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b64, qr, qi, qh, rep,
                    r_out, dq, dq_ok, m_i, l_i, acc, G: tl.constexpr, Q, GS: tl.constexpr, DIRECT: tl.constexpr,
                    BLOCK_D: tl.constexpr):  # fmt: skip
        """Replica rep writes the channels of value group rep: the normalised output (DIRECT, one split per segment)
        or the split's unnormalised (m, l, acc) for the merge."""
        own = r_out[:, None] & ((dq // GS)[None, :] == rep[:, None])
        if DIRECT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_off = b64 * o_b + qh.to(tl.int64) * o_h + qi.to(tl.int64) * o_q
            tl.store(out_ptr + o_off[:, None] + dq[None, :] * o_d, out.to(out_ptr.dtype.element_ty),
                     mask=own & dq_ok[None, :])  # fmt: skip
        else:
            p_row = pid.to(tl.int64) * (G * Q) + qr
            first = r_out & (rep == 0)
            tl.store(part_m_ptr + p_row, m_i, mask=first)
            tl.store(part_l_ptr + p_row, l_i, mask=first)
            tl.store(part_acc_ptr + p_row[:, None] * BLOCK_D + dq[None, :], acc, mask=own)


def _code_format(dtype: torch.dtype, bits: int) -> tuple[int, float]:
    """(code_or, OFF): codes OR'ed into 2**MANT = OFF where the dtype's mantissa holds them (code_or: the bit pattern
    in both halves of a word), else (0, 0.0): converted exactly (float32; 8-bit codes with bfloat16)."""
    magic = _MAGIC.get(dtype)
    if magic is None or bits > magic[2]:
        return 0, 0.0
    return magic[0] * 0x10001, magic[1]


def _plan(q: torch.Tensor, segs: QuantizedSegments, tail_k: torch.Tensor, config: AttentionConfig | None) -> dict:
    """varlen_attention's launch parameters with splits aligned to the key tiles' scale groups, plus the row layout:
    ``rows`` query rows per program, each replicated once per value group (``reps``) in ``block_m`` dot rows."""
    B, Hq, Q, D = q.shape
    GS = segs.group_size
    config = _with_defaults(config, decode=Q == 1)
    args = (B, Hq, Q, D, tail_k.shape[1], tail_k.shape[2], segs.n_groups * GS, q.dtype, q.device)
    p = _launch_params(*args, config)
    kt = min(p["block_n"], GS)
    if not p["direct"] and p["chunk"] % kt:  # only an explicit split_tokens can be unaligned
        aligned = dataclasses.replace(config, block_n=p["block_n"], split_tokens=-(-p["chunk"] // kt) * kt)
        p = _launch_params(*args, aligned)
    p = dict(p)
    reps = D // GS
    # Dot rows per program: as varlen_attention (64 for 16-bit dtypes, 32 for float32, halved past D = 128).
    cap = (32 if q.dtype == torch.float32 else 64) // (2 if p["block_d"] > 128 else 1)
    rows = max(1, min(next_pow2(p["G"] * Q), cap // reps))
    p.update(reps=reps, rows=rows, block_m=max(16, next_pow2(rows * reps)), row_blocks=triton.cdiv(p["G"] * Q, rows))
    return p


def quantized_varlen_attention(
    q: torch.Tensor,
    segs: QuantizedSegments,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float,
    q_lens: torch.Tensor | None = None,
    check: bool = True,
    *,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of the newest tokens over quantized ragged segments plus the causal full-precision tail.

    Args:
        q: (B, Hq, Q, D) queries of ``segs.dtype``, Hq = G * Hkv; query head hq reads kv head hq // G.
        segs: the compressed context of the B * Hkv segments (s = b * Hkv + h), read as packed codes in-kernel.
        tail_k, tail_v: (B, Hkv, T_cap, D) full-precision tokens added after the context, the queries' own included.
        tail_lens: (B,) int valid tail entries per sequence.
        scale: softmax scale (e.g. D ** -0.5).
        q_lens: optional (B,) int valid queries per sequence (the rest is padding whose output is 0). Default: all Q.
        check: validate segment metadata and lengths (one host sync). Pass False on the decode hot path.
        config: optional launch overrides (tests, tuning); split_tokens is rounded up to a multiple of 16 and of
            min(block_n, group_size).

    Query i < Qb of sequence b sits at tail position tail_lens[b] - Qb + i and attends to the valid tokens of its kv
    head's segment plus tail positions [0, tail_lens[b] - Qb + i].

    Returns:
        (B, Hq, Q, D) in q's dtype; float32 accumulation. On CPU (without KVPRESS_FORCE_TRITON) the torch reference
        runs instead.

    Raises:
        ValueError: shapes, dtypes or devices that disagree (q vs segs: dtype, head_dim, B * Hkv segments), a bad
            or (with check) inconsistent lengths.
    """
    _validate(q, segs, tail_k, tail_v, tail_lens, scale, q_lens)
    _kivi_bits(segs.bits)
    if check:
        _check_values(q, segs, tail_k, tail_lens, q_lens)
    if not use_triton(q):
        return reference_quantized_varlen_attention(q, segs, tail_k, tail_v, tail_lens, scale, q_lens)
    ensure_launchable(_quantized_split_kernel, q)
    Q, D = q.shape[2], q.shape[3]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    p = _plan(q, segs, tail_k, config)
    has_qlens = q_lens is not None
    q_lens_arg = q_lens if has_qlens else tail_lens
    # As in varlen_attention: exact fp32 dots for fp32; bf16 under the CPU interpreter multiplies upcast operands
    # (its bf16 tl.dot is wrong) and narrows with integer rounding (its float32 -> bfloat16 cast truncates).
    interp_bf16 = not q.is_cuda and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32 or interp_bf16
    code_or, off = _code_format(q.dtype, segs.bits)
    # Scale and zero share strides in the kernel; storage built by quantized_segments is already contiguous.
    k_scale, k_zero, v_scale, v_zero = (t.contiguous() for t in (segs.k_scale, segs.k_zero, segs.v_scale,
                                                                   segs.v_zero))  # fmt: skip
    parts = alloc_partials(p, Q, out)
    _quantized_split_kernel[(p["n_programs"], p["row_blocks"])](
        q, segs.k_packed, k_scale, k_zero, segs.v_packed, v_scale, v_zero, segs.cu_groups,
        segs.ctx_len, segs.ctx_groups, tail_k, tail_v, tail_lens, q_lens_arg, out, *parts,
        *q.stride(), *segs.k_packed.stride(), *k_scale.stride(), *segs.v_packed.stride(), *v_scale.stride(),
        *tail_k.stride(), *tail_v.stride(), *out.stride(),
        p["num_seg"], tail_k.shape[1], Q, D, p["chunk"], float(scale) * _LOG2E, code_or,
        G=p["G"], GS=segs.group_size, BITS=segs.bits, HAS_QLENS=has_qlens, DIRECT=p["direct"], IEEE_DOT=ieee,
        DT=_TL_DTYPES[q.dtype], EXACT_BF16=interp_bf16, OFF=off, PAIR=code_or != 0,
        EVEN_D=D == p["block_d"], REPS=p["reps"], ROWS=p["rows"],
        BLOCK_S=p["block_s"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    combine_splits(p, segs.cu_groups, segs.group_size, tail_lens, q_lens_arg, has_qlens, out, parts)
    return out
