"""Gather each (sequence, kv-head)'s kept tokens of a dense cache into ragged flat storage."""

import torch

from ._common import INT_DTYPES, check_shape, check_tensor, ensure_launchable, next_pow2, tl, triton, use_triton

__all__ = ["compact_segments", "reference_compact_segments"]


def _validate(src, indices, lengths):
    """Check shapes/dtypes/devices; return (indices, lengths as int32 on src's device)."""
    check_tensor(src, "src", ndim=4)
    check_tensor(indices, "indices", ndim=3, dtypes=(torch.int32, torch.int64), device=src.device)
    check_tensor(lengths, "lengths", ndim=2, dtypes=INT_DTYPES)
    B, H, S, D = src.shape
    check_shape(indices, "indices", (B, H, None))
    check_shape(lengths, "lengths", (B, H))
    return lengths.to(device=src.device, dtype=torch.int32)


def _check_values(src, indices, lengths):
    """Data checks (one host sync): lengths within [0, K], kept indices within [0, S). Returns the total N."""
    B, H, S, _ = src.shape
    K = indices.shape[-1]
    kept = torch.arange(K, device=src.device) < lengths[..., None].long()
    bad_idx = (((indices < 0) | (indices >= S)) & kept).any()
    bad_len = ((lengths < 0) | (lengths > K)).any()
    total = lengths.long().clamp(0, K).sum()
    bad_len, bad_idx, total = torch.stack([bad_len.long(), bad_idx.long(), total]).tolist()
    if bad_len:
        raise ValueError(f"lengths must lie in [0, {K}] (K = indices.shape[-1]), got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")
    if bad_idx:
        raise ValueError(f"indices must lie in [0, {S}) (S = src.shape[2]) for the first lengths[b, h] entries")
    return int(total)


def reference_compact_segments(src: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor):
    """Torch reference of `compact_segments` (same arguments, same results)."""
    lengths = _validate(src, indices, lengths)
    _check_values(src, indices, lengths)
    B, H, S, D = src.shape
    K = indices.shape[-1]
    kept = torch.arange(K, device=src.device) < lengths[..., None].long()
    safe = torch.where(kept, indices.long(), 0)
    rows = src.gather(2, safe[..., None].expand(B, H, K, D))  # (B, H, K, D)
    flat = rows[kept]  # boolean mask walks b, h, k in row-major order == segment order s = b * H + h
    cu = torch.zeros(B * H + 1, dtype=torch.int32, device=src.device)
    cu[1:] = torch.cumsum(lengths.reshape(-1), 0)
    return flat.contiguous(), cu


if triton is not None:

    @triton.jit
    def _compact_kernel(
        src_ptr, idx_ptr, len_ptr, cu_ptr, out_ptr,
        s_b, s_h, s_s, s_d, i_b, i_h, i_k,
        H, D,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (token block, segment): copy up to BLOCK_T kept rows of segment seg = b * H + h.
        tb = tl.program_id(0)
        seg = tl.program_id(1)
        b = seg // H
        h = seg % H
        n = tl.load(len_ptr + seg)
        start = tl.load(cu_ptr + seg)
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < n
        idx = tl.load(idx_ptr + b.to(tl.int64) * i_b + h * i_h + t * i_k, mask=t_ok, other=0)
        d = tl.arange(0, BLOCK_D)
        mask = t_ok[:, None] & (d < D)[None, :]
        src_row = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + idx.to(tl.int64) * s_s
        rows = tl.load(src_ptr + src_row[:, None] + d[None, :] * s_d, mask=mask)
        out_row = (start + t).to(tl.int64) * D
        tl.store(out_ptr + out_row[:, None] + d[None, :], rows, mask=mask)


def compact_segments(src: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor):
    """Gather kept tokens of a dense cache into flat ragged storage.

    Args:
        src: (B, Hkv, S, D) dense keys or values (any float dtype, any strides).
        indices: (B, Hkv, K) int64/int32 token positions in [0, S); entries past lengths[b, h] are ignored.
        lengths: (B, Hkv) integer count of kept tokens per segment, in [0, K] (may live on the CPU).

    Returns:
        flat: (N, D) contiguous, N = lengths.sum(); rows cu[s]:cu[s+1] are src[b, h, indices[b, h, :lengths[b, h]]]
            in that order, for segment s = b * Hkv + h.
        cu_seqlens: (B * Hkv + 1,) int32 prefix sums of lengths.

    Call once for keys and once for values (same indices/lengths give the same cu_seqlens). One host sync: the
    output size N is data dependent, and the index-range check rides on the same sync.
    """
    lengths = _validate(src, indices, lengths)
    if not use_triton(src):
        return reference_compact_segments(src, indices, lengths)
    ensure_launchable(_compact_kernel, src)
    total = _check_values(src, indices, lengths)
    B, H, S, D = src.shape
    K = indices.shape[-1]
    cu = torch.zeros(B * H + 1, dtype=torch.int32, device=src.device)
    cu[1:] = torch.cumsum(lengths.reshape(-1), 0)
    flat = torch.empty(total, D, dtype=src.dtype, device=src.device)
    if total == 0:
        return flat, cu
    block_d = next_pow2(D)
    block_t = max(1, min(64, 8192 // block_d, next_pow2(K)))  # ~8K elements per program keeps registers modest
    grid = (triton.cdiv(K, block_t), B * H)
    _compact_kernel[grid](
        src, indices, lengths.contiguous(), cu, flat,
        *src.stride(), *indices.stride(),
        H, D,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return flat, cu
