"""Attention over a cross-layer merged context (MiniCache) without rebuilding the layer's keys and values.

Two adjacent layers share one unit direction per token (``dir_k``, ``dir_v``: ``(B, Hkv, N, D)``); each layer keeps
its own per-token magnitudes (``mag_k``, ``mag_v``: ``(B, Hkv, N)``), so the layer's key is ``mag_k * dir_k``. Tokens
stored exactly (retained at merge time, then the question and decoded tokens) sit in a dense causal tail
``tail_k, tail_v: (B, Hkv, T_cap, D)`` with ``tail_lens: (B,)`` valid entries, as in :mod:`.varlen_attention`.

The kernel scales the logits ``q . dir_k`` by ``mag_k`` and the value tiles by ``mag_v`` on the fly: the merged
directions are read once per step for each layer of the pair, and no per-layer copy of the keys is ever built.
Split-K over the merged tokens (one extra split for the tail); the partial softmax states are merged in torch.
"""

from __future__ import annotations

import torch

from ._common import TRITON_FLOAT_DTYPES, check_shape, check_tensor, ensure_launchable, next_pow2, num_sms, tl, triton
from ._common import use_triton as _use_triton

_LOG2E = 1.4426950408889634


def _validate(q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, scale) -> None:
    check_tensor(q, "q", 4)
    B, Hq, Q, D = q.shape
    check_tensor(dir_k, "dir_k", 4, device=q.device)
    Hkv, N = dir_k.shape[1], dir_k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, which must be a multiple of dir_k's {Hkv} kv heads")
    check_shape(dir_k, "dir_k", (B, Hkv, N, D))
    check_tensor(dir_v, "dir_v", 4, device=q.device)
    check_shape(dir_v, "dir_v", (B, Hkv, N, D))
    for name, t in (("mag_k", mag_k), ("mag_v", mag_v)):
        check_tensor(t, name, 3, device=q.device)
        check_shape(t, name, (B, Hkv, N))
    check_tensor(tail_k, "tail_k", 4, device=q.device)
    check_shape(tail_k, "tail_k", (B, Hkv, None, D))
    check_tensor(tail_v, "tail_v", 4, device=q.device)
    check_shape(tail_v, "tail_v", tuple(tail_k.shape))
    check_tensor(tail_lens, "tail_lens", 1, device=q.device)
    check_shape(tail_lens, "tail_lens", (B,))
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if int(tail_lens.min()) < Q or int(tail_lens.max()) > tail_k.shape[2]:
        raise ValueError(
            f"tail_lens must be in [Q={Q}, T_cap={tail_k.shape[2]}] (the queries' own keys are the last Q tail "
            f"entries), got {tail_lens.tolist()}"
        )


def reference_merged_attention(q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, scale) -> torch.Tensor:
    """Plain-torch :func:`merged_attention`: rebuilds the layer's keys and values, float32 softmax (float64 inputs
    stay float64); returns ``(B, Hq, Q, D)`` in ``q``'s dtype."""
    B, Hq, Q, D = q.shape
    Hkv = dir_k.shape[1]
    G = Hq // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = dir_k.to(work) * mag_k.to(work)[..., None]
    values = dir_v.to(work) * mag_v.to(work)[..., None]
    out = torch.empty(B, Hkv, G * Q, D, dtype=work, device=q.device)
    for b in range(B):
        T = int(tail_lens[b])
        k = torch.cat([keys[b], tail_k[b, :, :T].to(work)], dim=1)  # (Hkv, N + T, D)
        v = torch.cat([values[b], tail_v[b, :, :T].to(work)], dim=1)
        queries = q[b].to(work).reshape(Hkv, G * Q, D)
        logits = queries @ k.transpose(-1, -2) * scale
        row = torch.arange(G * Q, device=q.device) % Q  # query i of each head sits at tail position T - Q + i
        col = torch.arange(k.shape[1], device=q.device) - dir_k.shape[2]  # tail position (negative: merged)
        logits = logits.masked_fill(col[None, None, :] > (T - Q + row)[None, :, None], float("-inf"))
        out[b] = logits.softmax(-1) @ v
    return out.view(B, Hkv, G, Q, D).reshape(B, Hq, Q, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _merged_split_kernel(
        q_ptr, dk_ptr, dv_ptr, mk_ptr, mv_ptr, tk_ptr, tv_ptr, tail_lens_ptr, acc_ptr, m_ptr, l_ptr,
        q_b, q_h, q_q, q_d, dk_b, dk_h, dk_n, dk_d, dv_b, dv_h, dv_n, dv_d, mk_b, mk_h, mk_n, mv_b, mv_h, mv_n,
        tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d,
        HKV, N, Q, D, CHUNK, N_SPLITS, ROWS_PAD, qk_scale,
        G: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row r: query head h * G + r // Q, query r % Q
        row_ok = rows < G * Q
        qi = rows % Q
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(
            q_ptr + b * q_b + (h * G + rows // Q)[:, None] * q_h + qi[:, None] * q_q + d[None, :] * q_d,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        if IEEE:
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        offs = tl.arange(0, BLOCK_N)
        if split < N_SPLITS:  # merged tokens: direction tiles scaled by this layer's magnitudes
            lo = split * CHUNK
            hi = tl.minimum(lo + CHUNK, N)
            for start in range(lo, hi, BLOCK_N):
                n = start + offs
                n_ok = n < hi
                tile = n_ok[:, None] & d_ok[None, :]
                k = tl.load(dk_ptr + b * dk_b + h * dk_h + n[:, None] * dk_n + d[None, :] * dk_d, mask=tile, other=0.0)
                v = tl.load(dv_ptr + b * dv_b + h * dv_h + n[:, None] * dv_n + d[None, :] * dv_d, mask=tile, other=0.0)
                mk = tl.load(mk_ptr + b * mk_b + h * mk_h + n * mk_n, mask=n_ok, other=0.0).to(tl.float32)
                mv = tl.load(mv_ptr + b * mv_b + h * mv_h + n * mv_n, mask=n_ok, other=0.0).to(tl.float32)
                if IEEE:
                    qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    qk = tl.dot(q, tl.trans(k))
                qk = tl.where(n_ok[None, :], qk * (mk[None, :] * qk_scale), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = v.to(tl.float32) * mv[:, None]
                if IEEE:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(k.dtype), v.to(k.dtype))
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        else:  # the dense tail: causal for the queries, which are its last Q entries
            T = tl.load(tail_lens_ptr + b)
            limit = T - Q + qi  # last tail position row r may see
            for start in range(0, T, BLOCK_N):
                t = start + offs
                t_ok = t < T
                tile = t_ok[:, None] & d_ok[None, :]
                k = tl.load(tk_ptr + b * tk_b + h * tk_h + t[:, None] * tk_t + d[None, :] * tk_d, mask=tile, other=0.0)
                v = tl.load(tv_ptr + b * tv_b + h * tv_h + t[:, None] * tv_t + d[None, :] * tv_d, mask=tile, other=0.0)
                if IEEE:
                    qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    qk = tl.dot(q, tl.trans(k))
                allowed = t_ok[None, :] & (t[None, :] <= limit[:, None])
                qk = tl.where(allowed, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if IEEE:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        base = (pid * (N_SPLITS + 1) + split) * ROWS_PAD
        tl.store(acc_ptr + (base + rows)[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(m_ptr + base + rows, m_i)
        tl.store(l_ptr + base + rows, l_i)


def merged_attention(q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, scale, *, check: bool = True):
    """Attention of the newest tail tokens over a merged context plus the causal dense tail.

    Args:
        q: ``(B, Hq, Q, D)`` queries, ``Hq = G * Hkv``; query head ``hq`` reads kv head ``hq // G``.
        dir_k, dir_v: ``(B, Hkv, N, D)`` unit directions shared by the two layers of a merged pair.
        mag_k, mag_v: ``(B, Hkv, N)`` this layer's key and value norms of those tokens.
        tail_k, tail_v: ``(B, Hkv, T_cap, D)`` tokens stored exactly; the queries' own keys are the last ``Q`` of the
            ``tail_lens[b]`` valid ones.
        tail_lens: ``(B,)`` int valid tail entries per sequence.
        scale: softmax scale.
        check: validate shapes and lengths (one host sync); pass False on the decode hot path.

    Returns:
        ``(B, Hq, Q, D)`` in ``q``'s dtype. float64 inputs (and CPU tensors without ``KVPRESS_FORCE_TRITON=1``) run
        :func:`reference_merged_attention`.
    """
    if check:
        _validate(q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, scale)
    if not _use_triton(q) or q.dtype not in TRITON_FLOAT_DTYPES:
        return reference_merged_attention(q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, scale)
    ensure_launchable(_merged_split_kernel, q)
    B, Hq, Q, D = q.shape
    Hkv, N = dir_k.shape[1], dir_k.shape[2]
    G = Hq // Hkv
    # The G heads x Q queries of a kv head share every K/V tile; long questions take several row blocks.
    block_m = min(64, max(16, next_pow2(G * Q)))
    row_blocks = triton.cdiv(G * Q, block_m)
    rows_pad = row_blocks * block_m
    block_d = max(16, next_pow2(D))
    block_n = 32 if q.dtype == torch.float32 or block_d > 128 else 64
    # About 4 programs per SM over the merged tokens, each split at least 256 tokens.
    splits_wanted = max(1, 4 * num_sms(q.device) // max(1, B * Hkv))
    chunk = max(256, triton.cdiv(triton.cdiv(max(N, 1), splits_wanted), block_n) * block_n)
    n_splits = triton.cdiv(N, chunk)
    programs = B * Hkv * (n_splits + 1)
    acc = torch.empty(programs, rows_pad, block_d, dtype=torch.float32, device=q.device)
    m = torch.empty(programs, rows_pad, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    ieee = q.dtype == torch.float32 or not q.is_cuda
    _merged_split_kernel[(B * Hkv, n_splits + 1, row_blocks)](
        q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, tail_lens, acc, m, l_sum,
        *q.stride(), *dir_k.stride(), *dir_v.stride(), *mag_k.stride(), *mag_v.stride(),
        *tail_k.stride(), *tail_v.stride(),
        Hkv, N, Q, D, chunk, n_splits, rows_pad, float(scale) * _LOG2E,
        G=G, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    # Merge the splits' softmax states (base-2 logits).
    m = m.view(B * Hkv, n_splits + 1, rows_pad)
    top = m.amax(1, keepdim=True)
    weight = torch.exp2(m - torch.where(top == float("-inf"), 0.0, top))
    total = (weight * l_sum.view_as(m)).sum(1)
    out = (weight[..., None] * acc.view(B * Hkv, n_splits + 1, rows_pad, block_d)).sum(1) / total[..., None]
    out = out[:, : G * Q, :D].reshape(B, Hkv, G, Q, D).reshape(B, Hq, Q, D)
    return out.to(q.dtype)
