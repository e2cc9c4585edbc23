"""Append new tokens' keys/values to the dense per-sequence tail buffer, in place, in O(new tokens)."""

import torch

from ._common import INT_DTYPES, check_shape, check_tensor, ensure_launchable, next_pow2, tl, triton, use_triton

__all__ = ["append_tail", "reference_append_tail"]


def _validate(tail_k, tail_v, tail_lens, new_k, new_v, new_lens):
    """Check shapes/dtypes/devices; return (tail_lens, new_lens) as int32 on the buffers' device."""
    check_tensor(tail_k, "tail_k", ndim=4)
    dev = tail_k.device
    check_tensor(tail_v, "tail_v", ndim=4, dtypes=(tail_k.dtype,), device=dev)
    check_tensor(new_k, "new_k", ndim=4, dtypes=(tail_k.dtype,), device=dev)
    check_tensor(new_v, "new_v", ndim=4, dtypes=(tail_k.dtype,), device=dev)
    check_tensor(tail_lens, "tail_lens", ndim=1, dtypes=INT_DTYPES, device=dev)
    B, H, _, D = tail_k.shape
    check_shape(tail_v, "tail_v", tuple(tail_k.shape))
    check_shape(new_k, "new_k", (B, H, None, D))
    check_shape(new_v, "new_v", tuple(new_k.shape))
    check_shape(tail_lens, "tail_lens", (B,))
    if new_lens is not None:
        check_tensor(new_lens, "new_lens", ndim=1, dtypes=INT_DTYPES, device=dev)
        check_shape(new_lens, "new_lens", (B,))
        new_lens = new_lens.to(torch.int32)
    return tail_lens.to(torch.int32), new_lens


def _check_values(tail_k, tail_lens, new_k, new_lens):
    """Data checks (one host sync): lengths in range and no capacity overflow."""
    cap, Q = tail_k.shape[2], new_k.shape[2]
    n_new = new_lens if new_lens is not None else torch.full_like(tail_lens, Q)
    flags = torch.stack([
        (tail_lens < 0).any(),
        ((n_new < 0) | (n_new > Q)).any(),
        (tail_lens.long() + n_new > cap).any(),
    ]).tolist()  # fmt: skip
    if flags[0]:
        raise ValueError("tail_lens must be >= 0")
    if flags[1]:
        raise ValueError(f"new_lens must lie in [0, {Q}] (Q = new_k.shape[2])")
    if flags[2]:
        raise ValueError(
            f"tail_k/tail_v capacity {cap} would overflow: max tail_lens + new tokens = "
            f"{int((tail_lens.long() + n_new).max())}; grow the tail buffers first"
        )


def _new_lengths(tail_lens, new_lens, Q):
    return tail_lens + (new_lens if new_lens is not None else Q)


def reference_append_tail(tail_k, tail_v, tail_lens, new_k, new_v, new_lens=None, check: bool = True):
    """Torch reference of `append_tail` (same arguments, same results)."""
    tail_lens, new_lens = _validate(tail_k, tail_v, tail_lens, new_k, new_v, new_lens)
    if check:
        _check_values(tail_k, tail_lens, new_k, new_lens)
    B, _, Q, _ = new_k.shape
    n_new = new_lens if new_lens is not None else torch.full_like(tail_lens, Q)
    j = torch.arange(Q, device=tail_k.device)
    bi, ji = torch.nonzero(j[None, :] < n_new[:, None], as_tuple=True)  # valid (sequence, new token) pairs
    pos = tail_lens[bi].long() + ji
    # Advanced indices separated by a slice put the pair dimension first: both sides are (pairs, Hkv, D).
    tail_k[bi, :, pos] = new_k[bi, :, ji]
    tail_v[bi, :, pos] = new_v[bi, :, ji]
    return _new_lengths(tail_lens, new_lens, Q)


if triton is not None:

    @triton.jit
    def _append_kernel(
        tk_ptr, tv_ptr, tlen_ptr, nk_ptr, nv_ptr, nlen_ptr,
        tk_b, tk_h, tk_t, tk_d, tv_b, tv_h, tv_t, tv_d,
        nk_b, nk_h, nk_q, nk_d, nv_b, nv_h, nv_q, nv_d,
        H, Q, D,
        HAS_NEW_LENS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (token block, segment b * H + h): copy up to BLOCK_Q new rows of keys and values.
        qb = tl.program_id(0)
        seg = tl.program_id(1)
        b = (seg // H).to(tl.int64)
        h = (seg % H).to(tl.int64)
        start = tl.load(tlen_ptr + b)
        if HAS_NEW_LENS:
            n = tl.load(nlen_ptr + b)
        else:
            n = Q
        j = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        mask = (j < n)[:, None] & (d < D)[None, :]
        pos = (start + j).to(tl.int64)
        rows = tl.load(nk_ptr + b * nk_b + h * nk_h + j[:, None] * nk_q + d[None, :] * nk_d, mask=mask)
        tl.store(tk_ptr + b * tk_b + h * tk_h + pos[:, None] * tk_t + d[None, :] * tk_d, rows, mask=mask)
        rows = tl.load(nv_ptr + b * nv_b + h * nv_h + j[:, None] * nv_q + d[None, :] * nv_d, mask=mask)
        tl.store(tv_ptr + b * tv_b + h * tv_h + pos[:, None] * tv_t + d[None, :] * tv_d, rows, mask=mask)


def append_tail(tail_k, tail_v, tail_lens, new_k, new_v, new_lens=None, check: bool = True):
    """Write new tokens into the tail buffers in place.

    Args:
        tail_k, tail_v: (B, Hkv, T_cap, D) tail buffers, modified in place (never reallocated).
        tail_lens: (B,) int valid tail entries per sequence before the append.
        new_k, new_v: (B, Hkv, Q, D) new keys/values (same dtype and device as the tail).
        new_lens: optional (B,) int; only the first new_lens[b] of the Q rows of sequence b are written
            (right-padded batch). Default: all Q.
        check: validate lengths and capacity (one host sync). Pass False on the decode hot path when the caller
            tracks capacity itself.

    Returns:
        (B,) int32 new lengths tail_lens + new_lens (a new tensor; `tail_lens` is not modified).
        Row j < new_lens[b] of sequence b lands at tail position tail_lens[b] + j for every kv head.

    Raises:
        ValueError: bad shapes/dtypes/devices, or tail_lens + new_lens > T_cap (when check=True).
    """
    tail_lens, new_lens = _validate(tail_k, tail_v, tail_lens, new_k, new_v, new_lens)
    if not use_triton(tail_k):
        return reference_append_tail(tail_k, tail_v, tail_lens, new_k, new_v, new_lens, check=check)
    ensure_launchable(_append_kernel, tail_k)
    if check:
        _check_values(tail_k, tail_lens, new_k, new_lens)
    B, H, Q, D = new_k.shape
    if Q > 0 and B * H > 0:
        block_d = next_pow2(D)
        block_q = max(1, min(64, 8192 // block_d, next_pow2(Q)))
        grid = (triton.cdiv(Q, block_q), B * H)
        _append_kernel[grid](
            tail_k, tail_v, tail_lens, new_k, new_v, new_lens if new_lens is not None else tail_lens,
            *tail_k.stride(), *tail_v.stride(), *new_k.stride(), *new_v.stride(),
            H, Q, D,
            HAS_NEW_LENS=new_lens is not None, BLOCK_Q=block_q, BLOCK_D=block_d,
        )  # fmt: skip
    return _new_lengths(tail_lens, new_lens, Q)
