"""Attention of new query tokens over quantized ragged segments plus the full-precision causal tail.

The contract is that of `varlen_attention` (kernels/varlen_attention.py) with the ragged context given as
`QuantizedSegments` (kernels/quantized_segments.py). The kernel reuses varlen_attention's work decomposition (split-K
over segment ++ tail, load balanced over ragged lengths, GQA rows sharing every K/V tile, log-sum-exp merge of the
splits); only the segment loop differs: for a tile of BLOCK_N token slots it loads the packed int32 words of the keys
(BLOCK_N / PER_WORD word rows, PER_WORD = 32 / bits tokens per word) and of the values (one row of D / PER_WORD words
per token), shifts and masks out the codes, and computes ``code * scale + zero`` in float32 before rounding to the
model dtype for the dot products. No full-precision copy of the context exists at any point; the gap slots of a
segment's partial context group are masked like out-of-range slots.
"""

import dataclasses

import torch

from ._common import check_tensor, ensure_launchable, tl, triton, use_triton
from .quantization import _TL_DTYPES
from .quantized_segments import QuantizedSegments, check_segments, dequantize_segments
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
# Launch defaults where the caller's AttentionConfig leaves None. Empty: varlen_attention's heuristic (128-slot
# tiles, 4 warps, 2 stages for bf16 decode) was also the fastest in the 4-bit H100 sweep of
# benchmarks/kernels/quantized_decode_bandwidth.py.
_DEFAULTS = {}


def _with_defaults(config: AttentionConfig | None) -> AttentionConfig:
    """The caller's overrides, tuned defaults for the rest; split_tokens rounded up to whole words."""
    config = config or _DEFAULT_CONFIG
    if config.block_n is not None and (config.block_n < 16 or config.block_n & (config.block_n - 1)):
        raise ValueError(f"config.block_n must be a power of two >= 16 for quantized segments, got {config.block_n}")
    filled = {k: v for k, v in _DEFAULTS.items() if getattr(config, k) is None}
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
    seg_k, seg_v, lens = dequantize_segments(segs, reference=True)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return reference_varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale, q_lens)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel (the tail loop, split bookkeeping and merge are varlen_attention's)
# --------------------------------------------------------------------------------------------------------------

if triton is not None:
    from .quantization import _narrow
    from .varlen_attention import _attend_tail, _load_queries, _locate_split, _online_step, _qk, _write_split

    @triton.jit
    def _quantized_split_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, cg_ptr, cl_ptr, cgr_ptr,
        tk_ptr, tv_ptr, tail_lens_ptr, q_lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        q_b, q_h, q_q, q_d, kp_n, kp_d, ks_n, ks_d, vp_n, vp_w, vs_n, vs_g,
        tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d, o_b, o_h, o_q, o_d,
        NUM_SEG, HKV, Q, D, CHUNK, qk_scale,
        G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, HAS_QLENS: tl.constexpr, DIRECT: tl.constexpr,
        IEEE_DOT: tl.constexpr, OUT_DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        PER_WORD: tl.constexpr = 32 // BITS
        W: tl.constexpr = GS // PER_WORD  # words per group (GS * BITS is a multiple of 32)
        BW: tl.constexpr = BLOCK_N // PER_WORD  # key word rows per tile
        BLOCK_DW: tl.constexpr = BLOCK_D // PER_WORD  # value words per token (padded)
        MASK: tl.constexpr = (1 << BITS) - 1

        pid = tl.program_id(0)
        mb = tl.program_id(1)
        found, seg, split = _locate_split(pid, cg_ptr, tail_lens_ptr, q_lens_ptr, NUM_SEG, HKV, Q, CHUNK, GS,
                                          HAS_QLENS, BLOCK_S)  # fmt: skip
        if found == 0:
            return  # grid is an upper bound on the number of splits
        b = seg // HKV
        h = seg % HKV
        g_start = tl.load(cg_ptr + seg).to(tl.int64)
        n_slots = (tl.load(cg_ptr + seg + 1) - tl.load(cg_ptr + seg)) * GS
        ctx_len = tl.load(cl_ptr + seg)
        gap_end = tl.load(cgr_ptr + seg) * GS  # slots [ctx_len, gap_end) pad the last context group
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

        k_lo = split * CHUNK  # a multiple of PER_WORD (or 0): tiles start on whole words
        k_hi = tl.minimum(k_lo + CHUNK, n_slots + tail_len)
        n = tl.arange(0, BLOCK_N)
        wi = tl.arange(0, BW)
        shifts = tl.arange(0, PER_WORD).to(tl.uint32) * BITS
        dw = tl.arange(0, BLOCK_DW)
        dw_ok = dw < D // PER_WORD
        v_grp = (dw * PER_WORD) // GS  # value group of each value word

        # Each packed word is loaded once and unpacked into a (words, PER_WORD, ...) block that is reshaped to the
        # (BLOCK_N, BLOCK_D) tile of the dot products (measured on H100: 4x faster than addressing every element).
        seg_hi = tl.minimum(k_hi, n_slots)  # a multiple of PER_WORD: n_slots and CHUNK are
        for n0 in range(k_lo, seg_hi, BLOCK_N):
            # Keys: word row w of the tile holds tokens n0 + w * PER_WORD + [0, PER_WORD) of every channel.
            tok_w = n0 + wi * PER_WORD
            k_mask = (tok_w < seg_hi)[:, None] & d_ok[None, :]
            k_row = g_start * W + tok_w // PER_WORD  # a segment's key word rows are consecutive
            words = tl.load(kp_ptr + k_row[:, None] * kp_n + d[None, :] * kp_d, mask=k_mask, other=0)
            k_grp = g_start + tok_w // GS
            k_s = tl.load(ks_ptr + k_grp[:, None] * ks_n + d[None, :] * ks_d, mask=k_mask, other=0.0)
            k_z = tl.load(kz_ptr + k_grp[:, None] * ks_n + d[None, :] * ks_d, mask=k_mask, other=0.0)
            codes = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & MASK
            k = codes.to(tl.float32) * k_s.to(tl.float32)[:, None, :] + k_z.to(tl.float32)[:, None, :]
            k = tl.reshape(_narrow(k, OUT_DTYPE, EXACT_BF16), (BLOCK_N, BLOCK_D))

            # Values: token row t holds channels w * PER_WORD + [0, PER_WORD) in word w.
            cols = n0 + n
            c_ok = cols < seg_hi
            v_row = g_start * GS + cols
            v_mask = c_ok[:, None] & dw_ok[None, :]
            words = tl.load(vp_ptr + v_row[:, None] * vp_n + dw[None, :] * vp_w, mask=v_mask, other=0)
            v_s = tl.load(vs_ptr + v_row[:, None] * vs_n + v_grp[None, :] * vs_g, mask=v_mask, other=0.0)
            v_z = tl.load(vz_ptr + v_row[:, None] * vs_n + v_grp[None, :] * vs_g, mask=v_mask, other=0.0)
            codes = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & MASK
            v = codes.to(tl.float32) * v_s.to(tl.float32)[:, :, None] + v_z.to(tl.float32)[:, :, None]
            v = tl.reshape(_narrow(v, OUT_DTYPE, EXACT_BF16), (BLOCK_N, BLOCK_D))

            qk = _qk(q, k, IEEE_DOT) * qk_scale
            visible = c_ok & ((cols < ctx_len) | (cols >= gap_end))  # the gap is padding, not context
            qk = tl.where(row_ok[:, None] & visible[None, :], qk, float("-inf"))
            m_i, l_i, acc = _online_step(qk, v, m_i, l_i, acc, IEEE_DOT)

        b64 = b.to(tl.int64)
        m_i, l_i, acc = _attend_tail(q, qk_scale, tk_ptr + b64 * tk_b + h.to(tl.int64) * tk_h,
                                     tv_ptr + b64 * tv_b + h.to(tl.int64) * tv_h, tk_t, tk_d, tv_t, tv_d,
                                     tl.maximum(k_lo, n_slots) - n_slots, k_hi - n_slots, row_ok, tail_end, d, d_ok,
                                     m_i, l_i, acc, IEEE_DOT, BLOCK_N)  # fmt: skip
        _write_split(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, o_b, o_h, o_q, o_d, pid, b, r, qi, qh, d, d_ok,
                     m_i, l_i, acc, Q, G, DIRECT, BLOCK_D)


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
        segs: the compressed context of the B * Hkv segments (s = b * Hkv + h), dequantized inside the kernel.
        tail_k, tail_v: (B, Hkv, T_cap, D) full-precision tokens added after the context, the queries' own included.
        tail_lens: (B,) int valid tail entries per sequence.
        scale: softmax scale (e.g. D ** -0.5).
        q_lens: optional (B,) int valid queries per sequence (the rest is padding whose output is 0). Default: all Q.
        check: validate segment metadata and lengths (one host sync). Pass False on the decode hot path.
        config: optional launch overrides (tests, tuning); split_tokens is rounded up to a multiple of 16.

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
    if check:
        _check_values(q, segs, tail_k, tail_lens, q_lens)
    if not use_triton(q):
        return reference_quantized_varlen_attention(q, segs, tail_k, tail_v, tail_lens, scale, q_lens)
    ensure_launchable(_quantized_split_kernel, q)
    B, Hq, Q, D = q.shape
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    GS = segs.group_size
    p = _launch_params(B, Hq, Q, D, tail_k.shape[1], tail_k.shape[2], segs.n_groups * GS, q.dtype, q.device,
                       _with_defaults(config))  # fmt: skip
    has_qlens = q_lens is not None
    q_lens_arg = q_lens if has_qlens else tail_lens
    # As in varlen_attention: exact fp32 dots for fp32; bf16 under the CPU interpreter multiplies upcast operands
    # (its bf16 tl.dot is wrong) and narrows with integer rounding (its float32 -> bfloat16 cast truncates).
    interp_bf16 = not q.is_cuda and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32 or interp_bf16
    # Scale and zero share strides in the kernel; storage built by quantized_segments is already contiguous.
    k_scale, k_zero, v_scale, v_zero = (t.contiguous() for t in (segs.k_scale, segs.k_zero, segs.v_scale,
                                                                   segs.v_zero))  # fmt: skip
    parts = alloc_partials(p, Q, out)
    _quantized_split_kernel[(p["n_programs"], p["row_blocks"])](
        q, segs.k_packed, k_scale, k_zero, segs.v_packed, v_scale, v_zero, segs.cu_groups,
        segs.ctx_len, segs.ctx_groups, tail_k, tail_v, tail_lens, q_lens_arg, out, *parts,
        *q.stride(), *segs.k_packed.stride(), *k_scale.stride(), *segs.v_packed.stride(), *v_scale.stride(),
        *tail_k.stride(), *tail_v.stride(), *out.stride(),
        p["num_seg"], tail_k.shape[1], Q, D, p["chunk"], float(scale) * _LOG2E,
        G=p["G"], GS=GS, BITS=segs.bits, HAS_QLENS=has_qlens, DIRECT=p["direct"], IEEE_DOT=ieee,
        OUT_DTYPE=_TL_DTYPES[q.dtype], EXACT_BF16=interp_bf16,
        BLOCK_S=p["block_s"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip
    combine_splits(p, segs.cu_groups, GS, tail_lens, q_lens_arg, has_qlens, out, parts)
    return out
