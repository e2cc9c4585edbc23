"""Asymmetric group quantization of keys/values with codes bit-packed into int32 words (KIVI layout).

A group is ``group_size`` consecutive elements along one axis of a (B, H, T, D) tensor:

- keys, per channel (``axis=2``): G consecutive tokens of one channel;
- values, per token (``axis=3``): G consecutive channels of one token.

Each group stores ``scale = (max - min) / (2**bits - 1)`` and ``zero = min`` in the input dtype, and each element the
code ``q = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)`` (``q = 0`` when ``scale == 0``); dequantization is
``q * scale + zero``. ``zero`` is an input element, so it is stored exactly. ``scale`` is rounded *up* when narrowed to
the storage dtype, so the codes never clamp and every element satisfies ``|x - (q * scale + zero)| <= scale / 2``
(exact arithmetic with the stored scale; the returned tensor then rounds that value to the input dtype). Constant
groups (``max == min``) are reproduced exactly.

Packing: ``P = 32 // bits`` codes per int32 word (16 / 8 / 4 for 2 / 4 / 8 bits), packed along the axis the groups
do *not* span: keys along channels, values along tokens. Element ``c`` of that axis sits in word ``c // P`` at bits
``(c % P) * bits`` upward; a partial last word is padded with zero codes. Packed shapes: keys ``(B, H, T, ceil(D / P))``,
values ``(B, H, ceil(T / P), D)``; scale/zero: keys ``(B, H, T // G, D)``, values ``(B, H, T, D // G)``.

Why across groups: attention reduces over channels (``q . k``) and over tokens (``p @ v``), and a matrix-multiply
fragment holds a few consecutive elements of the reduction axis per thread. Packed along that axis, a thread's words
unpack exactly into its own fragment, with no exchange through shared memory (quantized_attention.py). Key
groups (whole token rows) and value tokens (whole words of ``P`` tokens) are appended without rewriting old words.

``quantize_keys``/``quantize_values``/``dequantize`` run the Triton kernels for CUDA tensors (or on CPU when
``KVPRESS_FORCE_TRITON=1`` together with ``TRITON_INTERPRET=1``) and the torch references otherwise; both compute in
float32 with the same operations, so codes are bit-identical and dequantized values equal.
"""

from dataclasses import dataclass

import torch

from ._common import check_tensor, ensure_launchable, next_pow2, tl, triton, use_triton

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "quantize_keys",
    "quantize_values",
    "reference_dequantize",
    "reference_quantize_keys",
    "reference_quantize_values",
]

BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KEY_AXIS, VALUE_AXIS = 2, 3  # tokens (per-channel keys), channels (per-token values)


def words_per_group(bits: int, group_size: int) -> int:
    """int32 words spanned by ``group_size`` codes along the packing axis, ``32 // bits`` codes a word:
    ceil(group_size / (32 // bits)) (the word rows of a group of ``group_size`` value tokens)."""
    return -(-group_size // (32 // bits))


@dataclass
class QuantizedTensor:
    """A (B, H, T, D) tensor stored as packed codes plus per-group scale and zero (layout: module docstring).

    Attributes:
        packed: int32 words, P = 32 // bits codes each; (B, H, T, ceil(D / P)) for ``axis=2``, (B, H, ceil(T / P), D)
            for ``axis=3``.
        scale, zero: per-group parameters in ``dtype``; (B, H, T // G, D) for ``axis=2``, (B, H, T, D // G) for
            ``axis=3``.
        bits: code width, one of 2, 4, 8.
        group_size: G, elements per group along ``axis``.
        axis: 2 (groups of tokens, keys) or 3 (groups of channels, values).
        shape: (B, H, T, D) of the original tensor.
        dtype: the original dtype, returned by ``dequantize``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: int
    shape: tuple
    dtype: torch.dtype

    def __post_init__(self):
        _check_params(self.bits, self.group_size)
        if self.axis not in (KEY_AXIS, VALUE_AXIS):
            raise ValueError(f"axis must be {KEY_AXIS} (keys, groups of tokens) or {VALUE_AXIS} (values, groups of "
                             f"channels), got {self.axis!r}")  # fmt: skip
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {self.dtype}")
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 4:
            raise ValueError(f"shape must be (B, H, T, D), got {self.shape}")
        if self.shape[self.axis] % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide shape[{self.axis}] = {self.shape[self.axis]}")
        check_tensor(self.packed, "packed", ndim=4, dtypes=(torch.int32,))
        dev = self.packed.device
        check_tensor(self.scale, "scale", ndim=4, dtypes=(self.dtype,), device=dev)
        check_tensor(self.zero, "zero", ndim=4, dtypes=(self.dtype,), device=dev)
        packed_shape, param_shape = _storage_shapes(self.shape, self.bits, self.group_size, self.axis)
        for name, t, want in (("packed", self.packed, packed_shape), ("scale", self.scale, param_shape),
                              ("zero", self.zero, param_shape)):  # fmt: skip
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")

    def nbytes(self) -> int:
        """Bytes of storage: packed words plus scale and zero (the original tensor's shape/dtype are metadata)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _check_params(bits, group_size) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}, got {bits!r}")
    is_int = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not is_int or group_size < 1 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a positive power of two (1, 2, 4, ...), got {group_size!r}")


def _storage_shapes(shape, bits, group_size, axis):
    """(packed shape, scale/zero shape) for a tensor of `shape` grouped along `axis`, packed along the other one."""
    packed, params = list(shape), list(shape)
    other = VALUE_AXIS + KEY_AXIS - axis
    packed[other] = words_per_group(bits, shape[other])
    params[axis] = shape[axis] // group_size
    return tuple(packed), tuple(params)


def _validate_input(x, name, bits, group_size, axis):
    _check_params(bits, group_size)
    check_tensor(x, name, ndim=4, dtypes=FLOAT_DTYPES)
    if x.shape[axis] % group_size:
        what = "T (tokens)" if axis == KEY_AXIS else "D (channels)"
        raise ValueError(f"group_size {group_size} must divide {name}.shape[{axis}] = {what} = {x.shape[axis]}")


def _validate_quantized(qt):
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    qt.__post_init__()  # fields may have been reassigned since construction


def _grouped(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(R, N, C) view of a (B, H, T, D) tensor with the group axis as N: keys (B*H, T, D), values (B*H, D, T)."""
    if axis == VALUE_AXIS:
        t = t.transpose(2, 3)
    return t.flatten(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Torch references


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 s >= 0 narrowed to `dtype`, rounded toward +inf (next representable value above when rounding down)."""
    if dtype == torch.float32:
        return s
    n = s.to(dtype)
    low = n.float() < s
    # For finite positive floats, the bit pattern + 1 is the next value up.
    bumped = (n.view(torch.int16) + 1).view(dtype)
    return torch.where(low, bumped, n)


def _reference_quantize(x: torch.Tensor, bits: int, group_size: int, axis: int) -> QuantizedTensor:
    B, H = x.shape[:2]
    g = _grouped(x, axis)  # (R, N, C)
    R, N, C = g.shape
    levels = (1 << bits) - 1
    per_word = 32 // bits
    cw = words_per_group(bits, C)
    xf = g.float().reshape(R, N // group_size, group_size, C)
    mn, mx = xf.amin(dim=2), xf.amax(dim=2)  # (R, groups, C)
    # Divide by a tensor: a scalar divisor may become a multiplication by its reciprocal (not correctly rounded).
    scale = _round_up_to((mx - mn) / torch.full_like(mx, levels), x.dtype)
    zero = mn.to(x.dtype)
    s = scale.float()[:, :, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.floor((xf - zero.float()[:, :, None]) / safe + 0.5).clamp(0, levels)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes)).to(torch.int64)
    # Pad the packing axis to whole words with zero codes, then OR the codes of a word into its bit fields.
    codes = torch.nn.functional.pad(codes.reshape(R, N, C), (0, cw * per_word - C))
    shifts = (torch.arange(per_word, device=x.device, dtype=torch.int64) * bits).view(1, 1, 1, per_word)
    words = (codes.reshape(R, N, cw, per_word) << shifts).sum(dim=3)  # < 2**32, disjoint bit fields
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32
    words = words.reshape(B, H, N, cw)
    scale, zero = scale.reshape(B, H, N // group_size, C), zero.reshape(B, H, N // group_size, C)
    if axis == VALUE_AXIS:
        words, scale, zero = (t.transpose(2, 3).contiguous() for t in (words, scale, zero))
    return QuantizedTensor(words.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size, axis,
                           tuple(x.shape), x.dtype)  # fmt: skip


def reference_quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Torch reference of `quantize_keys` (same arguments, same result)."""
    _validate_input(k, "k", bits, group_size, KEY_AXIS)
    return _reference_quantize(k, bits, group_size, KEY_AXIS)


def reference_quantize_values(v: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Torch reference of `quantize_values` (same arguments, same result)."""
    _validate_input(v, "v", bits, group_size, VALUE_AXIS)
    return _reference_quantize(v, bits, group_size, VALUE_AXIS)


def reference_dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Torch reference of `dequantize` (same argument, same result)."""
    _validate_quantized(qt)
    G, bits, axis = qt.group_size, qt.bits, qt.axis
    per_word = 32 // bits
    words = _grouped(qt.packed, axis).to(torch.int64) & 0xFFFFFFFF  # (R, N, words along C), unsigned
    R, N, cw = words.shape
    C = qt.shape[VALUE_AXIS + KEY_AXIS - axis]
    n_groups = N // G
    shifts = (torch.arange(per_word, device=words.device, dtype=torch.int64) * bits).view(1, 1, 1, per_word)
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(R, n_groups, G, cw * per_word)[..., :C]
    s = _grouped(qt.scale, axis).float()[:, :, None]
    z = _grouped(qt.zero, axis).float()[:, :, None]
    # Two separately rounded float32 operations (no fused multiply-add), as in the kernel.
    out = (codes.float() * s + z).to(qt.dtype).reshape(R, n_groups * G, C)
    B, H = qt.shape[:2]
    out = out.reshape(B, H, n_groups * G, C)
    return (out.transpose(2, 3) if axis == VALUE_AXIS else out).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    @triton.jit
    def _narrow(x, OUT_DTYPE: tl.constexpr, BF16: tl.constexpr):
        """float32 -> OUT_DTYPE, round to nearest even (as torch). bfloat16 is rounded with integer ops because the
        CPU interpreter's float32 -> bfloat16 cast truncates."""
        if BF16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(OUT_DTYPE)

    @triton.jit
    def _quantize_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr,
        x_r, x_n, x_c, w_r, w_n, w_c, s_r, s_n, s_c,
        n_groups, C,
        GROUP: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_W: tl.constexpr,
        OUT_DTYPE: tl.constexpr, BITS_DTYPE: tl.constexpr, NARROW: tl.constexpr, BF16: tl.constexpr,
    ):  # fmt: skip
        # Program (row r * n_groups + group, word block): quantize the group's BLOCK_W * PER_WORD columns and pack
        # them. The tile is (GROUP, BLOCK_W words, PER_WORD codes): min/max reduce axis 0, packing reduces axis 2.
        pid = tl.program_id(0)
        r = (pid // n_groups).to(tl.int64)
        grp = (pid % n_groups).to(tl.int64)
        i = tl.arange(0, GROUP)[:, None, None]
        wc = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        j = tl.arange(0, PER_WORD)
        c = wc[:, None] * PER_WORD + j[None, :]  # (BLOCK_W, PER_WORD) column of each code
        cmask = c < C
        mask = cmask[None, :, :]
        x = tl.load(x_ptr + r * x_r + (grp * GROUP + i) * x_n + c[None, :, :] * x_c, mask=mask, other=0.0)
        x = x.to(tl.float32)
        mn = tl.min(tl.where(mask, x, float("inf")), axis=0)  # (BLOCK_W, PER_WORD)
        mx = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        s = tl.div_rn(mx - mn, ((1 << BITS) - 1) * 1.0)
        if NARROW:  # round the stored scale up, so no code clamps and the error stays within scale / 2
            n = _narrow(s, OUT_DTYPE, BF16)
            bumped = (n.to(BITS_DTYPE, bitcast=True) + 1).to(OUT_DTYPE, bitcast=True)
            n = tl.where(n.to(tl.float32) < s, bumped, n)
        else:
            n = s.to(OUT_DTYPE)
        z = mn.to(OUT_DTYPE)
        tl.store(s_ptr + r * s_r + grp * s_n + c * s_c, n, mask=cmask)
        tl.store(z_ptr + r * s_r + grp * s_n + c * s_c, z, mask=cmask)
        sf = n.to(tl.float32)[None, :, :]
        zf = z.to(tl.float32)[None, :, :]
        t = tl.div_rn(x - zf, tl.where(sf > 0, sf, 1.0))
        q = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), ((1 << BITS) - 1) * 1.0)
        q = tl.where(mask & (sf > 0), q, 0.0).to(tl.uint32)
        words = tl.sum(q << (j.to(tl.uint32) * BITS)[None, None, :], axis=2).to(tl.uint32)  # disjoint: sum == OR
        i2 = tl.arange(0, GROUP)[:, None]
        tl.store(w_ptr + r * w_r + (grp * GROUP + i2) * w_n + wc[None, :] * w_c, words.to(tl.int32, bitcast=True),
                 mask=(wc * PER_WORD < C)[None, :])  # fmt: skip

    @triton.jit
    def _dequantize_kernel(
        w_ptr, s_ptr, z_ptr, o_ptr,
        w_r, w_n, w_c, s_r, s_n, s_c, o_r, o_n, o_c,
        n_groups, C,
        GROUP: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_W: tl.constexpr,
        OUT_DTYPE: tl.constexpr, BF16: tl.constexpr,
    ):  # fmt: skip
        # Program (row r * n_groups + group, word block): unpack the group's words and rescale.
        pid = tl.program_id(0)
        r = (pid // n_groups).to(tl.int64)
        grp = (pid % n_groups).to(tl.int64)
        i = tl.arange(0, GROUP)[:, None]
        wc = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        j = tl.arange(0, PER_WORD)
        c = wc[:, None] * PER_WORD + j[None, :]  # (BLOCK_W, PER_WORD)
        cmask = c < C
        words = tl.load(w_ptr + r * w_r + (grp * GROUP + i) * w_n + wc[None, :] * w_c,
                        mask=(wc * PER_WORD < C)[None, :], other=0)  # fmt: skip
        codes = (words.to(tl.uint32, bitcast=True)[:, :, None] >> (j.to(tl.uint32) * BITS)[None, None, :])
        codes = codes & ((1 << BITS) - 1)
        s = tl.load(s_ptr + r * s_r + grp * s_n + c * s_c, mask=cmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r * s_r + grp * s_n + c * s_c, mask=cmask, other=0.0)
        out = codes.to(tl.float32) * s[None, :, :] + z.to(tl.float32)[None, :, :]
        o = o_ptr + r * o_r + (grp * GROUP + i[:, :, None]) * o_n + c[None, :, :] * o_c
        tl.store(o, _narrow(out, OUT_DTYPE, BF16), mask=cmask[None, :, :])


def _block_w(C: int, bits: int, group_size: int) -> int:
    """Words per program: the packing axis' words, capped at ~4096 codes per tile."""
    per_word = 32 // bits
    return max(1, min(next_pow2(words_per_group(bits, C)), 4096 // (group_size * per_word)))


def _quantize(x: torch.Tensor, bits: int, group_size: int, axis: int) -> QuantizedTensor:
    if not use_triton(x):
        return _reference_quantize(x, bits, group_size, axis)
    ensure_launchable(_quantize_kernel, x)
    packed_shape, param_shape = _storage_shapes(tuple(x.shape), bits, group_size, axis)
    packed = torch.empty(packed_shape, dtype=torch.int32, device=x.device)
    scale = torch.empty(param_shape, dtype=x.dtype, device=x.device)
    zero = torch.empty(param_shape, dtype=x.dtype, device=x.device)
    gx, gw, gs = _grouped(x, axis), _grouped(packed, axis), _grouped(scale, axis)
    R, N, C = gx.shape
    n_groups = N // group_size
    if gx.numel() > 0:
        block_w = _block_w(C, bits, group_size)
        grid = (R * n_groups, triton.cdiv(words_per_group(bits, C), block_w))
        _quantize_kernel[grid](
            gx, gw, gs, _grouped(zero, axis),
            *gx.stride(), *gw.stride(), *gs.stride(),
            n_groups, C,
            GROUP=group_size, BITS=bits, PER_WORD=32 // bits, BLOCK_W=block_w,
            OUT_DTYPE=_TL_DTYPES[x.dtype], BITS_DTYPE=tl.int16 if x.dtype != torch.float32 else tl.int32,
            NARROW=x.dtype != torch.float32, BF16=x.dtype == torch.bfloat16,
        )  # fmt: skip
    return QuantizedTensor(packed, scale, zero, bits, group_size, axis, tuple(x.shape), x.dtype)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Quantize keys per channel: each group is `group_size` consecutive tokens of one channel (KIVI keys).

    Args:
        k: (B, H, T, D) float16/bfloat16/float32 keys; T must be a multiple of `group_size`.
        bits: 2, 4 or 8 bits per code.
        group_size: tokens per group, a positive power of two.

    Returns:
        QuantizedTensor with ``axis=2``: packed (B, H, T, ceil(D * bits / 32)) int32 (codes packed along
        channels), scale/zero (B, H, T // G, D) in k's dtype.

    Raises:
        ValueError: bits not in {2, 4, 8}, bad group_size, or k not a 4-d float16/bfloat16/float32 tensor.
    """
    _validate_input(k, "k", bits, group_size, KEY_AXIS)
    return _quantize(k, bits, group_size, KEY_AXIS)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Quantize values per token: each group is `group_size` consecutive channels of one token (KIVI values).

    Args:
        v: (B, H, T, D) float16/bfloat16/float32 values; D must be a multiple of `group_size`.
        bits: 2, 4 or 8 bits per code.
        group_size: channels per group, a positive power of two.

    Returns:
        QuantizedTensor with ``axis=3``: packed (B, H, ceil(T * bits / 32), D) int32 (codes packed along tokens),
        scale/zero (B, H, T, D // G) in v's dtype.

    Raises:
        ValueError: bits not in {2, 4, 8}, bad group_size, or v not a 4-d float16/bfloat16/float32 tensor.
    """
    _validate_input(v, "v", bits, group_size, VALUE_AXIS)
    return _quantize(v, bits, group_size, VALUE_AXIS)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Unpack and rescale: a new contiguous (B, H, T, D) tensor of ``qt.dtype`` on the storage's device.

    Each element is ``q * scale + zero`` computed in float32 (two rounded operations, never fused) and rounded to
    ``qt.dtype``.

    Raises:
        ValueError: `qt` is not a QuantizedTensor, or its fields disagree (shapes, dtypes, devices).
    """
    _validate_quantized(qt)
    if not use_triton(qt.packed):
        return reference_dequantize(qt)
    ensure_launchable(_dequantize_kernel, qt.packed)
    G, bits, axis = qt.group_size, qt.bits, qt.axis
    out = torch.empty(qt.shape, dtype=qt.dtype, device=qt.packed.device)
    gw, gs, go = _grouped(qt.packed, axis), _grouped(qt.scale, axis), _grouped(out, axis)
    R, N, C = go.shape
    n_groups = N // G
    if go.numel() > 0:
        block_w = _block_w(C, bits, G)
        grid = (R * n_groups, triton.cdiv(words_per_group(bits, C), block_w))
        _dequantize_kernel[grid](
            gw, gs, _grouped(qt.zero, axis), go,
            *gw.stride(), *gs.stride(), *go.stride(),
            n_groups, C,
            GROUP=G, BITS=bits, PER_WORD=32 // bits, BLOCK_W=block_w,
            OUT_DTYPE=_TL_DTYPES[qt.dtype], BF16=qt.dtype == torch.bfloat16,
            enable_fp_fusion=False,  # q * scale + zero rounded twice, exactly like the reference
        )  # fmt: skip
    return out
