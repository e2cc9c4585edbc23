"""Ragged quantized segments with corrections: non-uniform levels, sparse outliers, low-rank residuals, pre-RoPE keys.

A `DecomposedSegments` is a `QuantizedSegments` (quantized_segments.py: KIVI groups, keys per channel, values per
token, codes packed across groups) whose element ``x`` at token slot ``t``, channel ``c`` is reconstructed as

    x = levels[code] * scale + zero  +  (a_t . b_block)[c]  +  sparse[t, c]

- ``levels``: ``2**bits`` float32 reconstruction points in ``[0, 2**bits - 1]`` per segment (so that sequences
  calibrated apart can share a batch). Uniform quantization is ``levels = arange(2**bits)``; a non-uniform datatype
  (KVQuant's) stores its calibrated points. Codes pick the
  nearest level of ``(x - zero) / scale``.
- low rank (GEAR): ``a`` ``(slots, r)`` per token slot and ``b`` ``(blocks, r, D)`` per block, a block being the
  groups quantized together (a segment's context, or the groups one flush appended to it). ``a . b`` is a rank-``r``
  approximation of the quantization residual of the block (one power-iteration step, as GEAR).
- sparse outliers: per group, a list of ``(slot in group * D + channel, value)``. In each segment, the elements
  furthest from their vector's median, in units of the vector's median absolute deviation (vectors: a key channel
  over the group's ``G`` tokens, a value token over its ``G`` channels), are left out of the group's min/max, and
  their remainder is stored: ``value = x - (everything above)``. Rows marked exact (attention sinks) put every
  element there.
- pre-RoPE keys (KVQuant): with ``positions`` given, keys are stored un-rotated and reconstructed as
  ``rope(x, positions[t])`` (rotate-half convention, ``inv_freq`` ``(D / 2,)`` and ``rope_scale`` supplied by the
  caller), so that each channel's range is not smeared by the rotation.

Everything here is plain torch: quantizing happens once per compaction or flush, off the decode hot path. Decoding
attention reads this storage in a Triton kernel (decomposed_attention.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._common import INT_DTYPES, check_shape, check_tensor
from .quantization import _round_up_to
from .quantized_segments import (
    QuantizedSegments,
    _segment_of_slots,
    check_params,
    check_segments,
    concat_segments,
    ragged_slots,
    select_segments,
    valid_slots,
)

__all__ = [
    "DecomposedSegments",
    "LowRankFactors",
    "RotaryTable",
    "SparseOutliers",
    "append_decomposed_groups",
    "calibrate_levels",
    "concat_decomposed",
    "decompose_segments",
    "dequantize_decomposed",
    "fit_levels",
    "rotate",
    "select_decomposed",
]


@dataclass(frozen=True)
class RotaryTable:
    """Rotary embedding of a model: ``inv_freq`` ``(D / 2,)`` float32 and the ``scale`` cos/sin are multiplied by."""

    inv_freq: torch.Tensor
    scale: float = 1.0


@dataclass
class SparseOutliers:
    """Per-group lists of exact corrections. ``cu`` ``(n_groups + 1,)`` int32 prefix sums; ``pos`` ``(nnz,)`` int16
    or int32: ``slot in group * D + channel``; ``val`` ``(nnz,)`` in the model dtype."""

    cu: torch.Tensor
    pos: torch.Tensor
    val: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cu, self.pos, self.val))


@dataclass
class LowRankFactors:
    """Rank-r residual: ``a`` ``(n_groups * G, r)`` per slot, ``b`` ``(n_blocks, r, D)`` per block, ``block``
    ``(n_groups,)`` int32 the block of each group (model dtype for ``a`` and ``b``)."""

    a: torch.Tensor
    b: torch.Tensor
    block: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.block))


@dataclass
class DecomposedSegments:
    """Quantized ragged storage plus its corrections (module docstring); each correction is optional.

    Attributes:
        segs: codes (indices into ``*_levels``), scales, zeros and the ragged layout.
        k_levels, v_levels: ``(S, 2**bits)`` float32 reconstruction points of each segment, or None for uniform
            codes.
        k_outliers, v_outliers: sparse exact corrections, or None.
        k_lowrank, v_lowrank: low-rank residual factors, or None.
        positions: ``(n_groups * G,)`` int32 position of every slot when keys are stored pre-RoPE, else None.
    """

    segs: QuantizedSegments
    k_levels: torch.Tensor | None = None
    v_levels: torch.Tensor | None = None
    k_outliers: SparseOutliers | None = None
    v_outliers: SparseOutliers | None = None
    k_lowrank: LowRankFactors | None = None
    v_lowrank: LowRankFactors | None = None
    positions: torch.Tensor | None = None

    def __post_init__(self):
        check_segments(self.segs)
        s = self.segs
        dev, n, G, D = s.device, s.n_groups, s.group_size, s.head_dim
        for name in ("k_levels", "v_levels"):
            t = getattr(self, name)
            if t is not None:
                check_tensor(t, name, ndim=2, dtypes=(torch.float32,), device=dev)
                check_shape(t, name, (s.num_segments, 1 << s.bits))
        for name in ("k_outliers", "v_outliers"):
            o = getattr(self, name)
            if o is not None:
                check_tensor(o.cu, f"{name}.cu", ndim=1, dtypes=(torch.int32,), device=dev)
                check_shape(o.cu, f"{name}.cu", (n + 1,))
                check_tensor(o.pos, f"{name}.pos", ndim=1, dtypes=(torch.int16, torch.int32), device=dev)
                check_tensor(o.val, f"{name}.val", ndim=1, dtypes=(s.dtype,), device=dev)
                check_shape(o.val, f"{name}.val", tuple(o.pos.shape))
        for name in ("k_lowrank", "v_lowrank"):
            lr = getattr(self, name)
            if lr is not None:
                check_tensor(lr.a, f"{name}.a", ndim=2, dtypes=(s.dtype,), device=dev)
                check_shape(lr.a, f"{name}.a", (n * G, None))
                check_tensor(lr.b, f"{name}.b", ndim=3, dtypes=(s.dtype,), device=dev)
                check_shape(lr.b, f"{name}.b", (None, lr.rank, D))
                check_tensor(lr.block, f"{name}.block", ndim=1, dtypes=(torch.int32,), device=dev)
                check_shape(lr.block, f"{name}.block", (n,))
        if self.positions is not None:
            check_tensor(self.positions, "positions", ndim=1, dtypes=(torch.int32,), device=dev)
            check_shape(self.positions, "positions", (n * G,))
            if D % 2:
                raise ValueError(f"pre-RoPE keys need an even head_dim, got {D}")

    def nbytes(self) -> int:
        """Bytes of every tensor: codes, scales, zeros, metadata, levels, outliers, low-rank factors, positions."""
        total = self.segs.nbytes()
        for t in (self.k_levels, self.v_levels, self.positions):
            total += 0 if t is None else t.numel() * t.element_size()
        for part in (self.k_outliers, self.v_outliers, self.k_lowrank, self.v_lowrank):
            total += 0 if part is None else part.nbytes()
        return total


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding (rotate-half convention)


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RotaryTable, inverse: bool = False) -> torch.Tensor:
    """``x`` ``(N, D)`` rotated to ``positions`` ``(N,)`` (``inverse``: un-rotated), computed in float32."""
    half = x.shape[-1] // 2
    theta = positions.float()[:, None] * rope.inv_freq.float().to(x.device)[None, :]
    cos, sin = theta.cos() * rope.scale, theta.sin() * rope.scale
    x1, x2 = x.float()[:, :half], x.float()[:, half:]
    if inverse:  # R(theta)^-1 = R(-theta) / scale**2 applied to scale * R(theta) x gives x
        cos, sin = cos / rope.scale**2, -sin / rope.scale**2
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Non-uniform levels


def fit_levels(normalized: torch.Tensor, bits: int, iters: int = 20, max_samples: int = 1 << 18) -> torch.Tensor:
    """1-d k-means of ``normalized`` values (in ``[0, 2**bits - 1]``): ``(2**bits,)`` float32 sorted levels.

    Starts from the uniform levels, so it never does worse than uniform codes on the samples (k-means only lowers
    the squared error); at most ``max_samples`` evenly strided samples are used.
    """
    n_levels = 1 << bits
    x = normalized.reshape(-1).float()
    if x.numel() > max_samples:
        x = x[:: -(-x.numel() // max_samples)]
    levels = torch.arange(n_levels, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return levels
    for _ in range(iters):
        idx = _nearest(x, levels)
        sums = torch.zeros_like(levels).index_add_(0, idx, x)
        counts = torch.zeros_like(levels).index_add_(0, idx, torch.ones_like(x))
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        levels = levels.sort().values
    return levels


def _nearest(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted ``levels``) of every element of ``t``; ties go to the upper level, as
    ``floor(t + 0.5)`` rounds uniform codes."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(t.contiguous(), mid, right=True)


def _nearest_rows(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`_nearest` with one sorted level table per row: ``t`` ``(R, V, L)``, ``levels`` ``(R, M)``."""
    R, V, L = t.shape
    mid = (levels[:, 1:] + levels[:, :-1]) / 2
    mid = mid[:, None, :].expand(R, V, mid.shape[1]).reshape(R * V, -1)
    return torch.searchsorted(mid.contiguous(), t.reshape(R * V, L).contiguous(), right=True).view(R, V, L)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def _outlier_mask(x, ratio: float, valid, exact, seg_of_row: torch.Tensor, n_seg: int) -> torch.Tensor:
    """``x`` ``(R, V, L)``: R rows of V vectors of length L, row r in segment ``seg_of_row[r]``. In each segment, the
    top ``ratio`` of its valid elements by ``|x - median| / MAD`` of their vector (robust, so that several outliers
    in one vector do not hide each other), plus every element where ``exact``. Padding elements (``~valid``) are
    never chosen. Each segment is ranked on its own, so a sequence's storage does not depend on its batch."""
    mask = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
    if ratio > 0:
        R, V, L = x.shape
        xf = torch.where(valid, x.float(), float("nan"))
        med = xf.nanmedian(-1, keepdim=True).values
        mad = (xf - med).abs().nanmedian(-1, keepdim=True).values  # (R, V, 1)
        # A vector of a few valid elements has a MAD near 0: floor it at a tenth of its segment's typical MAD.
        floor = 0.1 * _segment_medians(mad.view(R, V), seg_of_row, n_seg)[seg_of_row].view(R, 1, 1)
        score = torch.where(valid, (xf - med).abs() / torch.maximum(mad, floor).clamp(min=1e-6), -1.0)
        element_seg = seg_of_row.view(R, 1, 1).expand(R, V, L).reshape(-1)
        budget = torch.round(ratio * torch.bincount(element_seg[valid.reshape(-1)], minlength=n_seg)).long()
        rank = _rank_in_segment(score.reshape(-1), element_seg, n_seg)
        mask.view(-1)[:] = (rank < budget[element_seg]) & valid.reshape(-1)
    if exact is not None:
        mask |= exact & valid
    return mask


def _rank_in_segment(score: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Rank (0 = highest score) of every element among the elements of its segment."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]  # by segment, best first inside each
    counts = torch.bincount(seg, minlength=n_seg)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seg)
    rank[order] = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]]
    return rank


def _segment_medians(values: torch.Tensor, seg_of_row: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Median of the finite ``values`` ``(R, V)`` of each segment's rows: ``(n_seg,)`` (0 where there are none)."""
    flat = values.reshape(-1)
    seg = seg_of_row[:, None].expand_as(values).reshape(-1)
    ok = flat.isfinite()
    flat, seg = flat[ok], seg[ok]
    order = torch.argsort(flat, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]
    counts = torch.bincount(seg, minlength=n_seg)
    starts = torch.cumsum(counts, 0) - counts
    pick = (starts + (counts - 1).clamp(min=0) // 2).clamp(max=max(flat.numel() - 1, 0))
    medians = flat[order][pick] if flat.numel() else torch.zeros(n_seg, device=values.device)
    return torch.where(counts > 0, medians, 0.0)


def _encode(x: torch.Tensor, out: torch.Tensor, levels: torch.Tensor | None, bits: int, dtype: torch.dtype):
    """Quantize ``x`` ``(R, V, L)`` over its last axis with the level table ``levels[r]`` ``(R, M)`` of each row,
    ignoring ``out`` elements (outliers, padding) for the range. ``levels`` None: one table fitted (`fit_levels`) on
    the normalized positions of every element that is not ``out``.

    Returns (codes (R, V, L) int64, scale (R, V), zero (R, V), reconstruction (R, V, L) float32, levels (R, M))."""
    L_max = (1 << bits) - 1
    mn = torch.where(out, float("inf"), x).amin(-1)
    mx = torch.where(out, float("-inf"), x).amax(-1)
    empty = ~torch.isfinite(mn)  # nothing left (a padding token, an exact row): the plain range
    mn, mx = torch.where(empty, x.amin(-1), mn), torch.where(empty, x.amax(-1), mx)
    scale = _round_up_to((mx - mn) / torch.full_like(mx, L_max), dtype)
    zero = mn.to(dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    t = torch.where(s > 0, (x - z) / torch.where(s > 0, s, 1.0), 0.0).clamp(0, L_max)
    if levels is None:
        levels = fit_levels(t[~out & (s > 0)], bits).expand(x.shape[0], -1)
    codes = _nearest_rows(t, levels)
    recon = torch.gather(levels[:, None, :].expand(*t.shape[:2], levels.shape[1]), 2, codes) * s + z
    return codes, scale, zero, recon, levels


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ``(..., n)`` int64 -> ``(..., ceil(n / P))`` int32 words of ``P = 32 // bits`` codes, code j of a word
    at bits ``j * bits`` upward (a partial last word padded with zero codes)."""
    per_word = 32 // bits
    pad = -codes.shape[-1] % per_word
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (codes.reshape(*codes.shape[:-1], -1, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _low_rank(resid: torch.Tensor, seg_of_slot: torch.Tensor, n_seg: int, rank: int, generator: torch.Generator):
    """One power-iteration step per block: ``resid`` ``(slots, D)`` float32 whose rows belong to blocks
    ``seg_of_slot`` (rows of other blocks -1 are ignored). Returns ``a`` ``(slots, r)`` and ``b`` ``(n_seg, r, D)``."""
    D = resid.shape[1]
    omega = torch.randn(D, rank, generator=generator, dtype=torch.float32).to(resid.device)
    y = resid @ omega  # (slots, r): each block's R @ omega, row by row
    ok = seg_of_slot >= 0
    counts = torch.bincount(seg_of_slot[ok], minlength=n_seg)
    longest = int(counts.max()) if n_seg else 0
    # Rows of each block side by side (zero-padded) for a batched QR.
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(torch.where(ok, seg_of_slot, n_seg), stable=True)[: int(ok.sum())]
    rank_in = torch.arange(order.numel(), device=resid.device) - start[seg_of_slot[order]]
    y_pad = resid.new_zeros(n_seg, max(longest, rank), rank)
    r_pad = resid.new_zeros(n_seg, max(longest, rank), D)
    y_pad[seg_of_slot[order], rank_in] = y[order]
    r_pad[seg_of_slot[order], rank_in] = resid[order]
    p = torch.linalg.qr(y_pad).Q  # (n_seg, rows, r) orthonormal columns
    b = p.transpose(1, 2) @ r_pad  # (n_seg, r, D): the block's best fit in span(p)
    a = resid.new_zeros(resid.shape[0], rank)
    a[order] = p[seg_of_slot[order], rank_in]
    return a, b


@dataclass(frozen=True)
class _Options:
    bits: int
    group_size: int
    k_levels: torch.Tensor | None
    v_levels: torch.Tensor | None
    outlier_ratio: float
    rank: int
    rope: RotaryTable | None
    seed: int


def _encode_slots(k, v, valid, seg_of_slot, n_seg, positions, exact, opt: _Options):
    """Encode padded slots ``k, v`` ``(n_groups * G, D)`` (whole groups) of ``n_seg`` segments (``seg_of_slot``; each
    segment's slots here form one low-rank block and use the segment's level tables); ``valid`` marks real tokens.

    Returns the group-ordered storage pieces: dict of tensors for QuantizedSegments fields plus corrections."""
    G, bits, dtype = opt.group_size, opt.bits, k.dtype
    n_slots, D = k.shape
    n = n_slots // G
    dev = k.device
    uniform = torch.arange(1 << bits, dtype=torch.float32, device=dev).expand(n_seg, -1)
    seg_of_group = seg_of_slot[::G]
    kf = k.float()
    if positions is not None:
        kf = rotate(kf, positions, opt.rope, inverse=True)
    vf = v.float()
    exact_slots = None if exact is None else exact[:, None].expand(n_slots, D)

    # Keys: vectors are channels over a group's G tokens -> (n, D, G).
    kx = kf.view(n, G, D).transpose(1, 2)
    k_valid = valid.view(n, G)[:, None, :].expand(n, D, G)
    k_exact = None if exact_slots is None else exact_slots.reshape(n, G, D).transpose(1, 2)
    k_out = _outlier_mask(kx, opt.outlier_ratio, k_valid, k_exact, seg_of_group, n_seg)
    k_lv = _levels_of(opt.k_levels, uniform, seg_of_group)
    k_codes, k_scale, k_zero, k_rec, k_lv = _encode(kx, k_out | ~k_valid, k_lv, bits, dtype)
    k_codes, k_rec, k_out = (t.transpose(1, 2).reshape(n_slots, D) for t in (k_codes, k_rec, k_out))

    # Values: vectors are G channels of one token -> (n_slots, D / G, G).
    vx = vf.view(n_slots, D // G, G)
    v_valid = valid[:, None, None].expand(n_slots, D // G, G)
    v_exact = None if exact_slots is None else exact_slots.reshape(n_slots, D // G, G)
    v_out = _outlier_mask(vx, opt.outlier_ratio, v_valid, v_exact, seg_of_slot, n_seg)
    v_lv = _levels_of(opt.v_levels, uniform, seg_of_slot)
    v_codes, v_scale, v_zero, v_rec, v_lv = _encode(vx, v_out | ~v_valid, v_lv, bits, dtype)
    v_codes, v_rec, v_out = (t.reshape(n_slots, D) for t in (v_codes, v_rec, v_out))

    pieces = {
        "k_packed": _pack(k_codes, bits),
        "k_scale": k_scale,
        "k_zero": k_zero,
        # Values pack along tokens: word row w of a group holds tokens w * P + [0, P) of every channel.
        "v_packed": _pack(v_codes.view(n, G, D).transpose(1, 2), bits).transpose(1, 2).reshape(-1, D),
        "v_scale": v_scale.reshape(n_slots, D // G),
        "v_zero": v_zero.reshape(n_slots, D // G),
        "k_levels": k_lv[0] if isinstance(opt.k_levels, str) else None,  # fitted tables, shared by every segment
        "v_levels": v_lv[0] if isinstance(opt.v_levels, str) else None,
    }
    pieces = {name: None if t is None else t.contiguous() for name, t in pieces.items()}  # row-major for the kernel
    generator = torch.Generator().manual_seed(opt.seed)
    for name, x, rec, out in (("k", kf, k_rec, k_out), ("v", vf, v_rec, v_out)):
        if opt.rank > 0:
            resid = torch.where(out | ~valid[:, None], 0.0, x - rec)
            blocks = torch.where(valid, seg_of_slot, -1)
            a, b = _low_rank(resid, blocks, n_seg, opt.rank, generator)
            a, b = a.to(dtype), b.to(dtype)
            rec = rec + _low_rank_rows(a, b, seg_of_slot)
            pieces[f"{name}_a"], pieces[f"{name}_b"] = a, b
        # Exact remainders of the outliers, after everything else is reconstructed (rounded to the model dtype).
        out = out & valid[:, None]
        flat = out.reshape(n, G * D)
        idx = flat.nonzero()  # (nnz, 2): group, slot-in-group * D + channel, sorted by group
        rows = idx[:, 0] * G + idx[:, 1] // D
        cols = idx[:, 1] % D
        pieces[f"{name}_out_val"] = (x[rows, cols] - rec[rows, cols]).to(dtype)
        pieces[f"{name}_out_pos"] = idx[:, 1].to(torch.int16 if G * D <= 32767 else torch.int32)
        pieces[f"{name}_out_count"] = flat.sum(1)
    return pieces


def _levels_of(levels, uniform: torch.Tensor, seg_of_row: torch.Tensor) -> torch.Tensor | None:
    """Level table of each row: the segment's (``levels`` ``(S, M)``), uniform (None), or None to fit ("fit")."""
    if isinstance(levels, str):
        return None
    return (uniform if levels is None else levels.to(uniform.device))[seg_of_row]


def _low_rank_rows(a: torch.Tensor, b: torch.Tensor, block_of_slot: torch.Tensor) -> torch.Tensor:
    """``a[t] . b[block_of_slot[t]]`` for every slot: ``(slots, D)`` float32.

    One rank at a time: gathering every slot's whole ``(r, D)`` factor at once would hold ``r`` times the layer's
    size (2 GiB in float32 for 128k tokens of 8 heads at rank 4)."""
    block = block_of_slot.long()
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float32, device=a.device)
    for j in range(a.shape[1]):
        out += a[:, j, None].float() * b[block, j].float()
    return out


def _corrections(pieces: dict, n_blocks_b: dict, block_of_group: torch.Tensor | None) -> dict:
    """Wrap encoded pieces (group order) into SparseOutliers / LowRankFactors keyword arguments."""
    out = {}
    for name in ("k", "v"):
        count = pieces[f"{name}_out_count"]
        if count is not None:
            cu = torch.cat([count.new_zeros(1), count.cumsum(0)]).to(torch.int32)
            out[f"{name}_outliers"] = SparseOutliers(cu, pieces[f"{name}_out_pos"], pieces[f"{name}_out_val"])
        if f"{name}_a" in pieces:
            out[f"{name}_lowrank"] = LowRankFactors(pieces[f"{name}_a"], n_blocks_b[name], block_of_group)
    return out


def _per_segment_levels(levels: torch.Tensor | None, name: str, bits: int, n_seg: int, dev) -> torch.Tensor | None:
    """``(2**bits,)`` (shared) or ``(S, 2**bits)`` levels as ``(S, 2**bits)`` on ``dev``."""
    if levels is None:
        return None
    check_tensor(levels, name, dtypes=(torch.float32,))
    if levels.dim() == 1:
        check_shape(levels, name, (1 << bits,))
        levels = levels.expand(n_seg, -1)
    check_shape(levels, name, (n_seg, 1 << bits))
    return levels.to(dev).contiguous()


def _is_fit(levels, name: str) -> bool:
    if isinstance(levels, str):
        if levels != "fit":
            raise ValueError(f"{name} must be a tensor of levels, None (uniform) or 'fit', got {levels!r}")
        return True
    return False


def _check_options(bits, group_size, head_dim, outlier_ratio, rank, positions, rope, n_rows, dev):
    check_params(bits, group_size, head_dim)
    if not 0.0 <= float(outlier_ratio) < 1.0:
        raise ValueError(f"outlier_ratio must be in [0, 1), got {outlier_ratio!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= head_dim:
        raise ValueError(f"rank must be an int in [0, head_dim = {head_dim}], got {rank!r}")
    if positions is not None:
        check_tensor(positions, "positions", ndim=1, dtypes=INT_DTYPES, device=dev)
        check_shape(positions, "positions", (n_rows,))
        if not isinstance(rope, RotaryTable):
            raise ValueError("pre-RoPE keys (positions given) need rope, a RotaryTable of the model")
        check_shape(rope.inv_freq, "rope.inv_freq", (head_dim // 2,))


def decompose_segments(
    seg_k: torch.Tensor,
    seg_v: torch.Tensor,
    seg_lens: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    k_levels: torch.Tensor | None = None,
    v_levels: torch.Tensor | None = None,
    outlier_ratio: float = 0.0,
    exact_rows: torch.Tensor | None = None,
    rank: int = 0,
    positions: torch.Tensor | None = None,
    rope: RotaryTable | None = None,
    seed: int = 0,
) -> DecomposedSegments:
    """Quantize ragged segments with corrections; each segment's context is one low-rank block.

    Args:
        seg_k, seg_v: (N, D) float16/bfloat16/float32 rows of S segments back to back; keys post-RoPE.
        seg_lens: (S,) int lengths summing to N.
        bits: 2, 4 or 8. group_size: a power of two >= 16 dividing D.
        k_levels, v_levels: (2**bits,) float32 sorted levels in [0, 2**bits - 1] shared by every segment, or
            (S, 2**bits) one table per segment; None: uniform codes; "fit": one table fitted (`fit_levels`) on
            these tokens' own normalized positions in their groups' ranges (outliers and exact rows left out).
        outlier_ratio: share of the elements kept exactly as sparse outliers (per-vector standardized ranking).
        exact_rows: optional (N,) bool rows stored exactly (attention sinks).
        rank: rank of the residual approximation per block (0: none).
        positions: optional (N,) int positions: keys are then stored pre-RoPE (needs ``rope``).
        rope: the model's rotary table (with ``positions``).
        seed: seed of the power iteration's random start.

    Returns:
        DecomposedSegments (``ctx_len = seg_lens``); corrections present only when asked for.
    """
    slots = ragged_slots(seg_k, seg_v, seg_lens, bits, group_size)
    dev, dtype = seg_k.device, seg_k.dtype
    N, D = seg_k.shape
    _check_options(bits, group_size, D, outlier_ratio, rank, positions, rope, N, dev)
    k_fit, v_fit = (_is_fit(lv, name) for lv, name in ((k_levels, "k_levels"), (v_levels, "v_levels")))
    if not k_fit:
        k_levels = _per_segment_levels(k_levels, "k_levels", bits, seg_lens.numel(), dev)
    if not v_fit:
        v_levels = _per_segment_levels(v_levels, "v_levels", bits, seg_lens.numel(), dev)
    if exact_rows is not None:
        check_tensor(exact_rows, "exact_rows", ndim=1, dtypes=(torch.bool,), device=dev)
        check_shape(exact_rows, "exact_rows", (N,))
    G, lens, n_groups, cu_groups, seg, rows = (
        group_size,
        slots.lens,
        slots.n_groups,
        slots.cu_groups,
        slots.seg,
        slots.rows,
    )
    valid = slots.off < lens[seg]
    opt = _Options(bits, G, k_levels, v_levels, float(outlier_ratio), rank, rope, seed)
    pos = None if positions is None else positions.long()[rows]
    exact = None if exact_rows is None else exact_rows[rows]
    pieces = _encode_slots(seg_k[rows], seg_v[rows], valid, seg, lens.numel(), pos, exact, opt)
    _drop_unused_outliers(pieces, outlier_ratio, exact_rows)
    if k_fit:
        k_levels = _per_segment_levels(pieces["k_levels"], "k_levels", bits, lens.numel(), dev)
    if v_fit:
        v_levels = _per_segment_levels(pieces["v_levels"], "v_levels", bits, lens.numel(), dev)
    i32 = {"dtype": torch.int32}
    segs = QuantizedSegments(
        pieces["k_packed"], pieces["k_scale"], pieces["k_zero"], pieces["v_packed"], pieces["v_scale"],
        pieces["v_zero"], cu_groups.to(**i32), lens.to(**i32), n_groups.to(**i32), bits, G, D, dtype,
    )  # fmt: skip
    block_of_group = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), n_groups).to(**i32)
    corrections = _corrections(pieces, {"k": pieces.get("k_b"), "v": pieces.get("v_b")}, block_of_group)
    return DecomposedSegments(
        segs, k_levels=k_levels, v_levels=v_levels, positions=None if pos is None else pos.to(**i32), **corrections,
    )  # fmt: skip


def _drop_unused_outliers(pieces: dict, outlier_ratio: float, exact_rows) -> None:
    if outlier_ratio == 0 and exact_rows is None:
        for name in ("k", "v"):
            pieces[f"{name}_out_count"] = None


def append_decomposed_groups(
    ds: DecomposedSegments,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    *,
    outlier_ratio: float = 0.0,
    positions: torch.Tensor | None = None,
    rope: RotaryTable | None = None,
    seed: int = 0,
) -> DecomposedSegments:
    """Encode ``n`` whole groups per segment as ``ds`` does and append them after each segment's groups.

    Args:
        ds: current storage (not modified). Its levels, rank and pre-RoPE mode are reused.
        new_k, new_v: (S, n * G, D) full-precision tokens (keys post-RoPE) of ``ds``'s dtype.
        outlier_ratio: as in `decompose_segments` (the owner keeps it).
        positions: (S, n * G) int positions of the new tokens; required iff ``ds`` stores pre-RoPE keys.
        rope: the rotary table (with positions).
        seed: seed of the power iteration.

    Returns:
        New DecomposedSegments; the appended groups of each segment form one new low-rank block.
    """
    check_segments(ds.segs)
    segs = ds.segs
    S, G, D, dev, dtype = segs.num_segments, segs.group_size, segs.head_dim, segs.device, segs.dtype
    check_tensor(new_k, "new_k", ndim=3, dtypes=(dtype,), device=dev)
    check_tensor(new_v, "new_v", ndim=3, dtypes=(dtype,), device=dev)
    check_shape(new_k, "new_k", (S, None, D))
    check_shape(new_v, "new_v", tuple(new_k.shape))
    if new_k.shape[1] % G:
        raise ValueError(f"new_k.shape[1] = {new_k.shape[1]} tokens must be a multiple of group_size = {G}")
    if (positions is None) != (ds.positions is None):
        raise ValueError("positions must be given exactly when the storage holds pre-RoPE keys")
    rank = 0 if ds.k_lowrank is None else ds.k_lowrank.rank
    n_new = new_k.shape[1]
    flat_pos = None if positions is None else positions.reshape(-1)
    _check_options(segs.bits, G, D, outlier_ratio, rank, flat_pos, rope, S * n_new, dev)
    n = n_new // G
    old = segs.n_groups
    opt = _Options(segs.bits, G, ds.k_levels, ds.v_levels, float(outlier_ratio), rank, rope, seed)
    n_old_blocks = 0 if ds.k_lowrank is None else ds.k_lowrank.b.shape[0]
    seg_of_slot = torch.arange(S, device=dev).repeat_interleave(n_new)
    valid = torch.ones(S * n_new, dtype=torch.bool, device=dev)
    pieces = _encode_slots(new_k.reshape(-1, D), new_v.reshape(-1, D), valid, seg_of_slot, S,
                           None if flat_pos is None else flat_pos.long(), None, opt)  # fmt: skip
    if ds.k_outliers is None:
        pieces["k_out_count"] = pieces["v_out_count"] = None

    cu = segs.cu_groups.long()
    new_cu = cu + torch.arange(S + 1, device=dev) * n
    seg_of_old = torch.repeat_interleave(torch.arange(S, device=dev), cu[1:] - cu[:-1], output_size=old)
    dest_old = torch.arange(old, device=dev) + seg_of_old * n
    dest_new = ((new_cu[1:] - n)[:, None] + torch.arange(n, device=dev)).reshape(-1)
    total = old + S * n

    def merge(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
        out = a.new_empty((total, rows, *a.shape[1:]))
        out.index_copy_(0, dest_old, a.reshape(old, rows, *a.shape[1:]))
        out.index_copy_(0, dest_new, b.reshape(S * n, rows, *b.shape[1:]))
        return out.reshape(total * rows, *a.shape[1:])

    W = segs.words_per_group
    fields = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero")
    merged = [merge(getattr(segs, f), pieces[f], r) for f, r in zip(fields, (G, 1, 1, W, G, G))]
    new_segs = QuantizedSegments(*merged, new_cu.to(torch.int32), segs.ctx_len, segs.ctx_groups, segs.bits, G, D,
                                 dtype)  # fmt: skip
    extra = {}
    if ds.positions is not None:
        extra["positions"] = merge(ds.positions[:, None], flat_pos.to(torch.int32)[:, None], G).reshape(-1)
    for name in ("k", "v"):
        lr = getattr(ds, f"{name}_lowrank")
        if lr is not None:
            new_block = (n_old_blocks + torch.arange(S, device=dev)).repeat_interleave(n).to(torch.int32)
            extra[f"{name}_lowrank"] = LowRankFactors(
                merge(lr.a, pieces[f"{name}_a"], G), torch.cat([lr.b, pieces[f"{name}_b"]]),
                merge(lr.block[:, None], new_block[:, None], 1).reshape(-1),
            )  # fmt: skip
        o = getattr(ds, f"{name}_outliers")
        if o is not None:
            extra[f"{name}_outliers"] = _merge_outliers(o, pieces, name, dest_old, dest_new, total)
    return dataclasses.replace(ds, segs=new_segs, **extra)


def _merge_outliers(o: SparseOutliers, pieces: dict, name: str, dest_old, dest_new, total: int) -> SparseOutliers:
    """Old and new per-group outlier lists, reordered to the merged group order."""
    old_counts = (o.cu[1:] - o.cu[:-1]).long()
    new_counts = pieces[f"{name}_out_count"].long()
    counts = torch.zeros(total, dtype=torch.long, device=o.cu.device)
    counts[dest_old], counts[dest_new] = old_counts, new_counts
    group_of_entry = torch.cat([dest_old.repeat_interleave(old_counts), dest_new.repeat_interleave(new_counts)])
    order = torch.argsort(group_of_entry, stable=True)
    pos = torch.cat([o.pos, pieces[f"{name}_out_pos"].to(o.pos.dtype)])[order]
    val = torch.cat([o.val, pieces[f"{name}_out_val"]])[order]
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return SparseOutliers(cu, pos, val)


def _reconstruct_slots(ds: DecomposedSegments, rope: RotaryTable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's key (post-RoPE) and value, float32 ``(n_groups * G, D)``."""
    s = ds.segs
    G, D, bits, n = s.group_size, s.head_dim, s.bits, s.n_groups
    per_word, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per_word, device=s.device, dtype=torch.int64) * bits
    uniform = torch.arange(1 << bits, dtype=torch.float32, device=s.device)
    seg, _ = _segment_of_slots(s.cu_groups, n, G)
    k_lv = uniform.expand(s.num_segments, -1) if ds.k_levels is None else ds.k_levels
    v_lv = uniform.expand(s.num_segments, -1) if ds.v_levels is None else ds.v_levels
    kw = s.k_packed.long() & 0xFFFFFFFF  # (slots, ceil(D / P))
    k_codes = ((kw[..., None] >> shifts) & mask).reshape(n * G, -1)[:, :D]
    vw = s.v_packed.long().view(n, s.words_per_group, D) & 0xFFFFFFFF  # (n, W, D)
    v_codes = ((vw[:, :, None, :] >> shifts[None, None, :, None]) & mask).reshape(n, -1, D)[:, :G].reshape(n * G, D)
    k_lv, v_lv = k_lv[seg], v_lv[seg]  # (slots, 2**bits): the table of each slot's segment
    k = torch.gather(k_lv, 1, k_codes) * s.k_scale.float().repeat_interleave(G, 0) + s.k_zero.float().repeat_interleave(
        G, 0
    )
    v = torch.gather(v_lv, 1, v_codes) * s.v_scale.float().repeat_interleave(G, 1) + s.v_zero.float().repeat_interleave(
        G, 1
    )
    out = []
    for name, x in (("k", k), ("v", v)):
        lr = getattr(ds, f"{name}_lowrank")
        if lr is not None:
            x = x + _low_rank_rows(lr.a, lr.b, lr.block.long().repeat_interleave(G))
        o = getattr(ds, f"{name}_outliers")
        if o is not None:
            group = torch.repeat_interleave(torch.arange(n, device=s.device), (o.cu[1:] - o.cu[:-1]).long(),
                                            output_size=o.pos.shape[0])  # fmt: skip
            p = o.pos.long()
            x = x.index_put((group * G + p // D, p % D), o.val.float(), accumulate=True)
        out.append(x)
    k, v = out
    if ds.positions is not None:
        if rope is None:
            raise ValueError("this storage holds pre-RoPE keys: pass rope, the model's RotaryTable")
        k = rotate(k, ds.positions, rope)
    return k, v


def dequantize_decomposed(ds: DecomposedSegments, rope: RotaryTable | None = None):
    """The valid tokens as plain ragged rows, keys post-RoPE: ``(seg_k, seg_v, seg_lens)``, rows in ``segs.dtype``
    (each element reconstructed in float32, then rounded once) and ``(S,)`` int64 lengths."""
    if not isinstance(ds, DecomposedSegments):
        raise ValueError(f"ds must be a DecomposedSegments, got {type(ds).__name__}")  # noqa: TRY004
    ds.__post_init__()
    k, v = _reconstruct_slots(ds, rope)
    valid, lens = valid_slots(ds.segs)
    dtype = ds.segs.dtype
    return k[valid].to(dtype), v[valid].to(dtype), lens


def calibrate_levels(
    seg_k: torch.Tensor,
    seg_v: torch.Tensor,
    seg_lens: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    outlier_ratio: float = 0.0,
    positions: torch.Tensor | None = None,
    rope: RotaryTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-uniform levels for keys and values fitted (`fit_levels`) on these tokens' own normalized codes.

    Each element is placed in ``[0, 2**bits - 1]`` by its group's range, as `decompose_segments` would place it
    (outliers excluded, keys un-rotated when ``positions`` is given), and the levels are the 1-d k-means of those
    points: ``(k_levels, v_levels)``, each ``(2**bits,)`` float32. (`decompose_segments` with ``"fit"`` levels does
    the same while encoding.)
    """
    ds = decompose_segments(seg_k, seg_v, seg_lens, bits, group_size, k_levels="fit", v_levels="fit",
                            outlier_ratio=outlier_ratio, positions=positions, rope=rope)  # fmt: skip
    return ds.k_levels[0].clone(), ds.v_levels[0].clone()


def _ranges(cu: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(cu[i], cu[i + 1])`` for every ``i`` of ``items`` (cpu long)."""
    counts = cu[items + 1] - cu[items]
    starts = torch.repeat_interleave(cu[items] - torch.cumsum(counts, 0) + counts, counts)
    return starts + torch.arange(int(counts.sum()))


def select_decomposed(ds: DecomposedSegments, segments: torch.Tensor) -> DecomposedSegments:
    """The segments numbered ``segments`` (long, in that order) of ``ds``, as new storage (only the low-rank blocks
    they use are kept)."""
    s = ds.segs
    G, dev = s.group_size, s.device
    segments = segments.to("cpu", torch.long)
    groups = _ranges(s.cu_groups.to("cpu", torch.long), segments)
    slots = (groups[:, None] * G + torch.arange(G)).flatten().to(dev)
    dev_groups, dev_segments = groups.to(dev), segments.to(dev)
    extra = {}
    for name in ("k", "v"):
        lv = getattr(ds, f"{name}_levels")
        extra[f"{name}_levels"] = None if lv is None else lv[dev_segments]
        lr = getattr(ds, f"{name}_lowrank")
        if lr is not None:
            used, block = torch.unique(lr.block[dev_groups].long(), return_inverse=True)
            extra[f"{name}_lowrank"] = LowRankFactors(lr.a[slots], lr.b[used], block.to(torch.int32))
        o = getattr(ds, f"{name}_outliers")
        if o is not None:
            cu = o.cu.to("cpu", torch.long)
            entries = _ranges(cu, groups).to(dev)
            counts = cu[groups + 1] - cu[groups]
            cu_new = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dev, torch.int32)
            extra[f"{name}_outliers"] = SparseOutliers(cu_new, o.pos[entries], o.val[entries])
        else:
            extra[f"{name}_outliers"] = None
    positions = None if ds.positions is None else ds.positions[slots]
    return DecomposedSegments(select_segments(s, segments), positions=positions, **extra)


def concat_decomposed(parts: list[DecomposedSegments]) -> DecomposedSegments:
    """The segments of every part, in order, as one storage. Parts must use the same corrections (levels, outliers,
    low-rank rank, pre-RoPE keys); their level tables and low-rank blocks stay their own."""
    first = parts[0]

    def layout(p):
        return tuple(
            (getattr(p, f"{n}_levels") is not None, getattr(p, f"{n}_outliers") is not None,
             None if getattr(p, f"{n}_lowrank") is None else getattr(p, f"{n}_lowrank").rank)
            for n in ("k", "v")
        ) + (p.positions is not None,)  # fmt: skip

    for p in parts:
        if layout(p) != layout(first):
            raise ValueError(
                "storages to stack must use the same corrections (levels, outliers, low-rank rank, pre-RoPE keys); "
                f"got {layout(p)} and {layout(first)}"
            )
    extra = {}
    for name in ("k", "v"):
        if getattr(first, f"{name}_levels") is not None:
            extra[f"{name}_levels"] = torch.cat([getattr(p, f"{name}_levels") for p in parts])
        if getattr(first, f"{name}_lowrank") is not None:
            lrs = [getattr(p, f"{name}_lowrank") for p in parts]
            offsets = torch.tensor([0] + [lr.b.shape[0] for lr in lrs[:-1]]).cumsum(0).tolist()
            extra[f"{name}_lowrank"] = LowRankFactors(
                torch.cat([lr.a for lr in lrs]), torch.cat([lr.b for lr in lrs]),
                torch.cat([lr.block + off for lr, off in zip(lrs, offsets)]),
            )  # fmt: skip
        if getattr(first, f"{name}_outliers") is not None:
            os_ = [getattr(p, f"{name}_outliers") for p in parts]
            counts = torch.cat([(o.cu[1:] - o.cu[:-1]).long() for o in os_])
            cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            pos_dtype = torch.int32 if any(o.pos.dtype == torch.int32 for o in os_) else torch.int16
            extra[f"{name}_outliers"] = SparseOutliers(
                cu, torch.cat([o.pos.to(pos_dtype) for o in os_]), torch.cat([o.val for o in os_])
            )
    positions = torch.cat([p.positions for p in parts]) if first.positions is not None else None
    return DecomposedSegments(concat_segments([p.segs for p in parts]), positions=positions, **extra)
