"""Ragged KV storage quantized in groups: keys per channel, values per token (KIVI), for the head-variable cache.

Segment ``s = b * kv_heads + h`` owns whole groups of ``G = group_size`` token slots. Its context (``ctx_len[s]``
tokens, as compressed by a press) fills ``ctx_groups[s] = ceil(ctx_len[s] / G)`` groups; the slots
``[ctx_len, ctx_groups * G)`` of its last, partial group are padding (a copy of its last valid token, so that group's
min/max, hence scale/zero, are those of its valid tokens). Groups appended later (tokens flushed from the
full-precision tail, always whole groups) follow from slot ``ctx_groups * G`` on. Groups never cross segments, and
all segments' groups sit back to back in one set of tensors, segment ``s`` at groups
``cu_groups[s]:cu_groups[s + 1]``.

Each group's storage is that of ``quantize_keys`` / ``quantize_values`` (quantization.py) on a
``(1, 1, n_groups * G, D)`` view; codes are packed across groups (keys along channels, values along tokens), with
``P = 32 // bits`` codes per int32 word and ``W = G / P`` word rows per group of value tokens:

- keys: ``k_packed (n_groups * G, D / P)``, one row per token slot; ``k_scale, k_zero (n_groups, D)``;
- values: ``v_packed (n_groups * W, D)``, group g's tokens in word rows ``g * W:(g + 1) * W``; ``v_scale, v_zero
  (n_groups * G, D // G)``.

``group_size`` is a power of two >= 16 that divides ``head_dim``, so a group's tokens fill whole words at every bit
width (2, 4, 8), a key row fills whole words, and value groups tile a token.
"""

import dataclasses
from dataclasses import dataclass

import torch

from ._common import INT_DTYPES, check_shape, check_tensor
from .quantization import (
    BITS,
    FLOAT_DTYPES,
    KEY_AXIS,
    VALUE_AXIS,
    QuantizedTensor,
    dequantize,
    quantize_keys,
    quantize_values,
    reference_dequantize,
    words_per_group,
)

__all__ = [
    "QuantizedSegments",
    "append_segment_groups",
    "concat_segments",
    "dequantize_segments",
    "quantize_segments",
    "select_segments",
]

MIN_GROUP_SIZE = 16  # 16 * 2 bits = one int32 word: smaller groups would leave words partly empty
# Code widths the storage holds. 3-bit codes (10 a word, 2 bits unused) are written and read by the decomposed
# storage and its kernel (decomposed_segments.py, decomposed_attention.py); KIVI's quantizer and fused kernel take
# BITS (2, 4, 8), whose codes tile a word exactly.
SEGMENT_BITS = (2, 3, 4, 8)


@dataclass
class QuantizedSegments:
    """Ragged quantized keys/values (layout: module docstring). S segments, ``n_groups`` groups in all.

    Token slot t of segment s (0 <= t < groups_s * G) is valid iff ``t < ctx_len[s]`` or ``t >= ctx_groups[s] * G``.

    Attributes:
        k_packed: (n_groups * G, D * bits / 32) int32 key codes (quantized per channel), one row per token slot.
        k_scale, k_zero: (n_groups, D) in ``dtype``.
        v_packed: (n_groups * W, D) int32 value codes (quantized per token), W = G * bits / 32 word rows per group.
        v_scale, v_zero: (n_groups * G, D // G) in ``dtype``.
        cu_groups: (S + 1,) int32 prefix sums of the groups of each segment.
        ctx_len: (S,) int32 valid context tokens per segment.
        ctx_groups: (S,) int32 groups holding the context, ceil(ctx_len / G).
        bits: 2, 4 or 8. group_size: G. head_dim: D. dtype: float16, bfloat16 or float32 (the model's).
    """

    k_packed: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    cu_groups: torch.Tensor
    ctx_len: torch.Tensor
    ctx_groups: torch.Tensor
    bits: int
    group_size: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self):
        check_params(self.bits, self.group_size, self.head_dim)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {self.dtype}")
        check_tensor(self.k_packed, "k_packed", ndim=2, dtypes=(torch.int32,))
        dev = self.k_packed.device
        check_tensor(self.k_scale, "k_scale", ndim=2, dtypes=(self.dtype,), device=dev)
        n, D, G, W = self.n_groups, self.head_dim, self.group_size, self.words_per_group
        check_tensor(self.cu_groups, "cu_groups", ndim=1, dtypes=(torch.int32,), device=dev)
        S = self.cu_groups.shape[0] - 1
        if S < 0:
            raise ValueError("cu_groups must have S + 1 >= 1 entries")
        expected = {
            "k_packed": ((n * G, words_per_group(self.bits, D)), torch.int32), "k_scale": ((n, D), self.dtype),
            "k_zero": ((n, D), self.dtype), "v_packed": ((n * W, D), torch.int32), "v_scale": ((n * G, D // G), self.dtype),
            "v_zero": ((n * G, D // G), self.dtype), "ctx_len": ((S,), torch.int32),
            "ctx_groups": ((S,), torch.int32),
        }  # fmt: skip
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            check_tensor(t, name, ndim=len(shape), dtypes=(dtype,), device=dev)
            check_shape(t, name, shape)

    @property
    def n_groups(self) -> int:
        """Groups of all segments together (k_scale rows)."""
        return self.k_scale.shape[0]

    @property
    def num_segments(self) -> int:
        return self.cu_groups.shape[0] - 1

    @property
    def words_per_group(self) -> int:
        """Word rows of v_packed per group: group_size * bits / 32."""
        return words_per_group(self.bits, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.k_packed.device

    def nbytes(self) -> int:
        """Bytes of every tensor: packed codes, scales, zeros and the int32 metadata."""
        tensors = (self.k_packed, self.k_scale, self.k_zero, self.v_packed, self.v_scale, self.v_zero, self.cu_groups,
                   self.ctx_len, self.ctx_groups)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)


def check_params(bits, group_size, head_dim, accepted_bits=SEGMENT_BITS) -> None:
    """ValueError unless bits is one of ``accepted_bits`` and group_size is a power of two >= 16 dividing head_dim."""
    if isinstance(bits, bool) or bits not in accepted_bits:
        raise ValueError(f"bits must be one of {list(accepted_bits)}, got {bits!r}")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    accepted = [g for g in (16, 32, 64, 128, 256, 512) if head_dim % g == 0]
    is_int = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not is_int or group_size < MIN_GROUP_SIZE or group_size & (group_size - 1) or head_dim % group_size:
        raise ValueError(f"group_size must be a power of two >= {MIN_GROUP_SIZE} dividing head_dim = {head_dim} "
                         f"(accepted: {accepted}), got {group_size!r}")  # fmt: skip


def check_segments(segs) -> None:
    """ValueError unless `segs` is a QuantizedSegments whose fields (possibly reassigned) still agree."""
    if not isinstance(segs, QuantizedSegments):
        # The library reports every bad argument as a ValueError.
        raise ValueError(f"segs must be a QuantizedSegments, got {type(segs).__name__}")  # noqa: TRY004
    segs.__post_init__()


def _segment_of_slots(cu_groups: torch.Tensor, n_groups: int, group_size: int):
    """(segment, offset inside the segment) of every token slot, both (n_groups * G,) int64; no host sync."""
    cu = cu_groups.long()
    S = cu.shape[0] - 1
    seg_of_group = torch.repeat_interleave(torch.arange(S, device=cu.device), cu[1:] - cu[:-1], output_size=n_groups)
    slot = torch.arange(n_groups * group_size, device=cu.device)
    seg = seg_of_group.repeat_interleave(group_size)
    return seg, slot - cu[seg] * group_size


def _from_quantized(qk: QuantizedTensor, qv: QuantizedTensor):
    """(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero) as 2-d tensors from a (1, 1, T, D) quantization."""
    return tuple(t[0, 0] for t in (qk.packed, qk.scale, qk.zero, qv.packed, qv.scale, qv.zero))


@dataclass
class RaggedSlots:
    """Where the rows of ragged segments go in whole groups of slots: ``lens`` ``(S,)`` long, ``n_groups`` ``(S,)``
    groups per segment, ``cu_groups`` ``(S + 1,)`` their prefix sums, ``total`` groups in all, and per slot its
    segment ``seg``, offset ``off`` and source row ``rows`` (padding slots repeat their segment's last row)."""

    lens: torch.Tensor
    n_groups: torch.Tensor
    cu_groups: torch.Tensor
    total: int
    seg: torch.Tensor
    off: torch.Tensor
    rows: torch.Tensor


def ragged_slots(seg_k: torch.Tensor, seg_v: torch.Tensor, seg_lens: torch.Tensor, bits: int,
                 group_size: int) -> RaggedSlots:  # fmt: skip
    """Validate ragged rows (``seg_k, seg_v`` ``(N, D)``, ``seg_lens`` ``(S,)``, bits, group size) and lay them out
    in whole groups (one host sync)."""
    check_tensor(seg_k, "seg_k", ndim=2, dtypes=FLOAT_DTYPES)
    dev, dtype = seg_k.device, seg_k.dtype
    check_tensor(seg_v, "seg_v", ndim=2, dtypes=(dtype,), device=dev)
    check_shape(seg_v, "seg_v", tuple(seg_k.shape))
    check_tensor(seg_lens, "seg_lens", ndim=1, dtypes=INT_DTYPES, device=dev)
    N, D = seg_k.shape
    check_params(bits, group_size, D)
    G = group_size
    lens = seg_lens.long()
    n_groups = (lens + G - 1) // G
    cu_groups = torch.cat([n_groups.new_zeros(1), n_groups.cumsum(0)])
    total, bad_sum, negative = torch.stack([cu_groups[-1], lens.sum() != N, (lens < 0).any()]).tolist()  # one sync
    if negative or bad_sum:
        raise ValueError(f"seg_lens must be >= 0 and sum to seg_k.shape[0] = {N}, got {seg_lens.tolist()}")
    seg, off = _segment_of_slots(cu_groups, total, G)
    starts = lens.cumsum(0) - lens
    rows = starts[seg] + torch.minimum(off, lens[seg] - 1)  # padding slots repeat the segment's last row
    return RaggedSlots(lens, n_groups, cu_groups, total, seg, off, rows)


def quantize_segments(seg_k: torch.Tensor, seg_v: torch.Tensor, seg_lens: torch.Tensor, bits: int,
                      group_size: int) -> QuantizedSegments:  # fmt: skip
    """Quantize ragged segments: each padded to whole groups by repeating its last valid row.

    Args:
        seg_k, seg_v: (N, D) float16/bfloat16/float32 rows of S segments, back to back.
        seg_lens: (S,) int lengths (>= 0) summing to N; empty segments own no groups.
        bits: 2, 4 or 8. group_size: a power of two >= 16 dividing D.

    Returns:
        QuantizedSegments with ``ctx_len = seg_lens`` and ``ctx_groups = ceil(seg_lens / group_size)``.

    Raises:
        ValueError: bad bits/group_size, shapes, dtypes, or lengths that are negative or do not sum to N.
    """
    _kivi_bits(bits)
    slots = ragged_slots(seg_k, seg_v, seg_lens, bits, group_size)
    G, D, total, rows = group_size, seg_k.shape[1], slots.total, slots.rows
    k_pad = seg_k[rows].view(1, 1, total * G, D)
    v_pad = seg_v[rows].view(1, 1, total * G, D)
    tensors = _from_quantized(quantize_keys(k_pad, bits, G), quantize_values(v_pad, bits, G))
    i32 = {"dtype": torch.int32}
    return QuantizedSegments(*tensors, slots.cu_groups.to(**i32), slots.lens.to(**i32), slots.n_groups.to(**i32),
                             bits, G, D, seg_k.dtype)  # fmt: skip


def _kivi_bits(bits) -> None:
    if bits not in BITS:
        raise ValueError(
            f"bits must be one of {list(BITS)} for KIVI groups (quantize_segments, quantized_varlen_attention), got "
            f"{bits!r}; 3-bit codes are stored by decompose_segments and read by decomposed_attention"
        )


def append_segment_groups(segs: QuantizedSegments, new_k: torch.Tensor, new_v: torch.Tensor) -> QuantizedSegments:
    """Quantize ``n`` new whole groups per segment and append them after each segment's groups.

    Args:
        segs: the current storage (not modified; the result shares none of its group tensors).
        new_k, new_v: (S, n * G, D) full-precision tokens of ``segs.dtype``, the same count for every segment
            (n may be 0).

    Returns:
        New QuantizedSegments: segment s holds its old groups, then the n new ones; ``ctx_len`` / ``ctx_groups``
        unchanged. Each storage tensor is written with one index copy; no host sync (so it may be captured).

    Raises:
        ValueError: shapes, dtype or device that do not match ``segs``, or a token count not a multiple of G.
    """
    check_segments(segs)
    _kivi_bits(segs.bits)
    S, G, D, dev = segs.num_segments, segs.group_size, segs.head_dim, segs.device
    check_tensor(new_k, "new_k", ndim=3, dtypes=(segs.dtype,), device=dev)
    check_tensor(new_v, "new_v", ndim=3, dtypes=(segs.dtype,), device=dev)
    check_shape(new_k, "new_k", (S, None, D))
    check_shape(new_v, "new_v", tuple(new_k.shape))
    if new_k.shape[1] % G:
        raise ValueError(f"new_k.shape[1] = {new_k.shape[1]} tokens must be a multiple of group_size = {G}")
    n = new_k.shape[1] // G
    old = segs.n_groups
    total = old + S * n
    new_parts = _from_quantized(quantize_keys(new_k.reshape(1, 1, S * n * G, D), segs.bits, G),
                                quantize_values(new_v.reshape(1, 1, S * n * G, D), segs.bits, G))  # fmt: skip
    cu = segs.cu_groups.long()
    step = torch.arange(S + 1, device=dev) * n
    new_cu = cu + step
    # Old group g of segment s moves up by the s * n new groups inserted before it; segment s's new groups take the
    # last n places of its range.
    seg_of_old = torch.repeat_interleave(torch.arange(S, device=dev), cu[1:] - cu[:-1], output_size=old)
    dest_old = torch.arange(old, device=dev) + seg_of_old * n
    dest_new = ((new_cu[1:] - n)[:, None] + torch.arange(n, device=dev)).reshape(-1)
    old_parts = (segs.k_packed, segs.k_scale, segs.k_zero, segs.v_packed, segs.v_scale, segs.v_zero)
    W = segs.words_per_group
    merged = []
    for a, b, rows in zip(old_parts, new_parts, (G, 1, 1, W, G, G)):  # storage rows per group
        out = a.new_empty((total, rows, a.shape[1]))
        out.index_copy_(0, dest_old, a.view(old, rows, a.shape[1]))
        out.index_copy_(0, dest_new, b.reshape(S * n, rows, b.shape[1]))
        merged.append(out.view(total * rows, a.shape[1]))
    return QuantizedSegments(*merged, new_cu.to(torch.int32), segs.ctx_len, segs.ctx_groups, segs.bits, G, D,
                             segs.dtype)  # fmt: skip


def _dequantize_all(segs: QuantizedSegments, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token slot, gaps included: (n_groups * G, D) keys and values of ``segs.dtype``."""
    shape = (1, 1, segs.n_groups * segs.group_size, segs.head_dim)
    qk = QuantizedTensor(segs.k_packed[None, None], segs.k_scale[None, None], segs.k_zero[None, None], segs.bits,
                         segs.group_size, KEY_AXIS, shape, segs.dtype)  # fmt: skip
    qv = QuantizedTensor(segs.v_packed[None, None], segs.v_scale[None, None], segs.v_zero[None, None], segs.bits,
                         segs.group_size, VALUE_AXIS, shape, segs.dtype)  # fmt: skip
    fn = reference_dequantize if reference else dequantize
    return fn(qk)[0, 0], fn(qv)[0, 0]


def valid_slots(segs: QuantizedSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_groups * G,) bool mask of valid token slots, and the (S,) int64 valid tokens per segment."""
    G = segs.group_size
    seg, off = _segment_of_slots(segs.cu_groups, segs.n_groups, G)
    ctx_len, ctx_groups = segs.ctx_len.long(), segs.ctx_groups.long()
    valid = (off < ctx_len[seg]) | (off >= ctx_groups[seg] * G)
    cu = segs.cu_groups.long()
    lens = ctx_len + (cu[1:] - cu[:-1] - ctx_groups) * G
    return valid, lens


def dequantize_segments(segs: QuantizedSegments, *, reference: bool = False):
    """The valid tokens as plain ragged rows (the gap slots dropped).

    Args:
        segs: quantized storage.
        reference: dequantize with the torch reference instead of the dispatching kernel (same values).

    Returns:
        (seg_k, seg_v, seg_lens): (N, D) keys and values of ``segs.dtype`` and (S,) int64 lengths summing to N,
        segment by segment in token order.
    """
    check_segments(segs)
    k, v = _dequantize_all(segs, reference)
    valid, lens = valid_slots(segs)
    return k[valid], v[valid], lens


def _prefix_sums(counts: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device=device, dtype=torch.int32)


def select_segments(segs: QuantizedSegments, segments: torch.Tensor) -> QuantizedSegments:
    """The segments numbered ``segments`` (cpu long, in that order) of ``segs``, as new storage."""
    cu = segs.cu_groups.to("cpu", torch.long)
    segments = segments.to("cpu", torch.long)
    groups = torch.cat(
        [torch.arange(int(cu[s]), int(cu[s + 1])) for s in segments.tolist()] + [torch.zeros(0, dtype=torch.long)]
    )
    w, g = words_per_group(segs.bits, segs.group_size), segs.group_size
    device = segs.k_packed.device
    slot_rows = (groups[:, None] * g + torch.arange(g)).flatten().to(device)  # key codes, value scales: per slot
    v_word_rows = (groups[:, None] * w + torch.arange(w)).flatten().to(device)  # value codes: w word rows per group
    groups, dev_segments = groups.to(device), segments.to(device)
    return dataclasses.replace(
        segs,
        k_packed=segs.k_packed[slot_rows],
        k_scale=segs.k_scale[groups],
        k_zero=segs.k_zero[groups],
        v_packed=segs.v_packed[v_word_rows],
        v_scale=segs.v_scale[slot_rows],
        v_zero=segs.v_zero[slot_rows],
        cu_groups=_prefix_sums((cu[1:] - cu[:-1])[segments], device),
        ctx_len=segs.ctx_len[dev_segments],
        ctx_groups=segs.ctx_groups[dev_segments],
    )


def concat_segments(parts: list[QuantizedSegments]) -> QuantizedSegments:
    """The segments of every part, in order, as one storage (all parts share bits, group size, head dim, dtype)."""
    first = parts[0]
    for p in parts:
        if (p.bits, p.group_size, p.head_dim, p.dtype) != (first.bits, first.group_size, first.head_dim, first.dtype):
            raise ValueError(
                "quantized layers to stack must share bits, group_size, head_dim and dtype; got "
                f"{(p.bits, p.group_size, p.head_dim, p.dtype)} and "
                f"{(first.bits, first.group_size, first.head_dim, first.dtype)}"
            )
    counts = torch.cat([(p.cu_groups[1:] - p.cu_groups[:-1]).to("cpu", torch.long) for p in parts])
    return dataclasses.replace(
        first,
        **{name: torch.cat([getattr(p, name) for p in parts]) for name in _GROUP_FIELDS},
        cu_groups=_prefix_sums(counts, first.cu_groups.device),
    )


_GROUP_FIELDS = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "ctx_len", "ctx_groups")
