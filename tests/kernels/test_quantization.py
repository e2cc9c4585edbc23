import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import (
    QuantizedTensor,
    dequantize,
    quantize_keys,
    quantize_values,
    reference_dequantize,
    reference_quantize_keys,
    reference_quantize_values,
)

from .layouts import DEVICE, DTYPES

QUANTIZERS = {
    "keys": (quantize_keys, reference_quantize_keys, 2),
    "values": (quantize_values, reference_quantize_values, 3),
}
MANTISSA_BITS = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def unpack_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Independent unpacking, one code at a time: (B, H, T, D) int64 codes of a QuantizedTensor (packed along the
    axis the groups do not span: channels for keys, tokens for values)."""
    bits, pack_axis = qt.bits, 5 - qt.axis
    per_word = 32 // bits
    words = qt.packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty(qt.shape, dtype=torch.int64, device=words.device)
    for c in range(qt.shape[pack_axis]):
        word = words.select(pack_axis, c // per_word)
        codes.select(pack_axis, c).copy_((word >> ((c % per_word) * bits)) & ((1 << bits) - 1))
    return codes


def per_element(t: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Broadcast a per-group (scale/zero) tensor to the (B, H, T, D) elements."""
    return t.repeat_interleave(qt.group_size, dim=qt.axis)


def expected_nbytes(shape, dtype, bits, G, axis):
    n_groups = math.prod(shape) // G
    packed_len = shape[5 - axis]  # codes per line along the packing axis
    words = math.prod(shape) // packed_len * math.ceil(packed_len * bits / 32)
    return words * 4 + 2 * n_groups * torch.finfo(dtype).bits // 8


@st.composite
def quant_inputs(draw):
    kind = draw(st.sampled_from(["keys", "values"]))
    bits = draw(st.sampled_from([2, 4, 8]))
    G = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if kind == "keys":  # T in whole groups, any D
        T, D = G * draw(st.integers(0 if G > 1 else 1, max(1, 32 // G))), draw(st.sampled_from([1, 5, 16, 33]))
    else:
        T, D = draw(st.integers(1, 9)), G * draw(st.integers(1, max(2, 32 // G)))
    dtype = draw(st.sampled_from(DTYPES))
    mag = draw(st.sampled_from([1e-2, 1.0, 50.0]))
    strided = draw(st.booleans())
    return kind, bits, G, (B, H, T, D), dtype, mag, strided, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(quant_inputs())
def test_kernel_matches_reference_and_error_bound(inputs):
    kind, bits, G, shape, dtype, mag, strided, seed = inputs
    quantize, reference, axis = QUANTIZERS[kind]
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = shape
    x = (torch.randn(B, H, T, D + 3 * strided, generator=gen) * mag + torch.randn(1, generator=gen) * mag)
    x = x.to(dtype).to(DEVICE)[..., :D]  # a non-contiguous view when strided

    qt, ref = quantize(x, bits, G), reference(x, bits, G)
    assert torch.equal(qt.packed, ref.packed)
    assert torch.equal(qt.scale, ref.scale) and torch.equal(qt.zero, ref.zero)
    out, ref_out = dequantize(qt), reference_dequantize(ref)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref_out)
    assert qt.nbytes() == ref.nbytes() == expected_nbytes(shape, dtype, bits, G, axis)
    if shape[5 - axis] * bits % 32 == 0:  # the packing axis fills whole words: codes * bits / 8 + scale and zero
        assert qt.nbytes() == x.numel() * bits // 8 + 2 * (x.numel() // G) * x.element_size()
    if x.numel() == 0:
        return

    # Independent float64 check of the scheme. zero = group min exactly; the stored scale is (max - min) / levels
    # computed in float32 (two roundings: at most 2^-23 relative below) and rounded up to the dtype (at most one
    # dtype step above).
    levels = (1 << bits) - 1
    x64 = x.double()
    grouped = x64.unflatten(axis, (-1, G))
    zero, scale = qt.zero.double(), qt.scale.double()
    assert torch.equal(zero, grouped.amin(axis + 1))
    exact_scale = (grouped.amax(axis + 1) - zero) / levels
    eps = 2.0 ** -(MANTISSA_BITS[dtype] - 1)
    sub_step = torch.finfo(dtype).tiny * eps  # spacing of subnormals: the scale may be one
    assert (scale >= exact_scale * (1 - 2.0**-23)).all()
    assert (scale <= exact_scale * (1 + eps) * (1 + 2.0**-22) + sub_step).all()

    codes = unpack_codes(qt)
    assert codes.min() >= 0 and codes.max() <= levels
    s, z = per_element(scale, qt), per_element(zero, qt)
    assert (codes[s == 0] == 0).all()
    recon = codes.double() * s + z
    # The bound of round-to-nearest with the stored scale (float32 arithmetic adds a few ulps of the range).
    slack = 1e-6 * (x64.abs() + s * levels)
    assert ((recon - x64).abs() <= s / 2 + slack).all()
    # Codes are the float64 round-to-nearest except within float32 rounding of a tie.
    t = torch.where(s > 0, (x64 - z) / torch.where(s > 0, s, 1.0), 0.0)
    off = codes != torch.floor(t + 0.5)
    assert ((t - torch.floor(t) - 0.5).abs()[off] < 1e-4).all()
    # The returned tensor is that reconstruction rounded to the dtype (through float32).
    assert ((out.double() - recon).abs() <= 2 * eps * recon.abs() + slack + sub_step).all()


@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_are_exact(kind, dtype):
    quantize, reference, axis = QUANTIZERS[kind]
    gen = torch.Generator().manual_seed(1)
    G, shape = 4, (2, 2, 16, 16)
    groups = torch.randn(*shape, generator=gen).to(dtype).unflatten(axis, (-1, G))  # group index at `axis`
    for g in (0, 2):  # constant groups: a random value, then 0 and a large value in some rows
        group = groups.select(axis, g)
        group.copy_(group.narrow(axis, 0, 1).expand_as(group))
    groups.select(axis, 0)[0] = 0.0
    groups.select(axis, 2)[1] = 1000.0
    x = groups.flatten(axis, axis + 1).to(DEVICE)
    is_const = x.unflatten(axis, (-1, G)).amax(axis + 1) == x.unflatten(axis, (-1, G)).amin(axis + 1)
    for bits in (2, 4, 8):
        for q in (quantize(x, bits, G), reference(x, bits, G)):
            mask = per_element(is_const, q)
            assert (q.scale[is_const] == 0).all() and (q.scale[~is_const] > 0).all()
            assert torch.equal(dequantize(q)[mask], x[mask])
            assert (unpack_codes(q)[mask] == 0).all()
    # Group size 1: every group is constant, so the round trip is the identity.
    for bits in (2, 8):
        assert torch.equal(dequantize(quantize(x[:1, :1], bits, 1)), x[:1, :1])


@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("G", [2, 8, 32])
def test_packing_round_trip(kind, bits, G):
    """Data on the exact grid zero + code * scale (scale a power of two, each group spanning all levels) comes back
    bit-exact, codes included."""
    quantize, reference, axis = QUANTIZERS[kind]
    levels = (1 << bits) - 1
    gen = torch.Generator().manual_seed(bits * 100 + G)
    shape = [2, 3, 4, 8] if kind == "keys" else [2, 3, 5, 4]
    shape[axis] = G * (2 if kind == "keys" else 3)
    codes = torch.randint(0, levels + 1, shape, generator=gen)
    # Put both extremes at random positions of every group so that min -> code 0 and max -> code levels.
    grouped = codes.unflatten(axis, (-1, G))
    perm = torch.rand(grouped.shape, generator=gen).argsort(dim=axis + 1)
    grouped.scatter_(axis + 1, perm.narrow(axis + 1, 0, 1), 0)
    grouped.scatter_(axis + 1, perm.narrow(axis + 1, 1, 1), levels)
    codes = grouped.flatten(axis, axis + 1)
    scale = 2.0 ** torch.randint(-6, 0, grouped.narrow(axis + 1, 0, 1).shape, generator=gen).double()
    zero = torch.randint(-4, 5, scale.shape, generator=gen).double() * scale
    x64 = (grouped * scale + zero).flatten(axis, axis + 1)
    for dtype in DTYPES:
        if dtype == torch.bfloat16 and bits == 8:
            continue  # zero + code * scale spans up to 259 steps of the scale: 9 significant bits, over bfloat16's 8
        x = x64.to(dtype).to(DEVICE)
        assert torch.equal(x.double().cpu(), x64)
        for q in (quantize(x, bits, G), reference(x, bits, G)):
            assert torch.equal(unpack_codes(q).cpu(), codes)
            assert torch.equal(q.scale.double().cpu(), scale.squeeze(axis + 1))
            assert torch.equal(dequantize(q), x)


def test_word_layout():
    """Element c of the packing axis (tokens for values, channels for keys) sits in word c // (32 // bits) at bit
    (c % (32 // bits)) * bits: checked on 32 value tokens of 16 channels holding (token + channel) % 4 (two 2-bit words
    per channel; each token's group spans 0..3, so codes equal values) and a key token of 8 channels (one 4-bit word,
    the top bit set; each channel its own group, spanning 0..15)."""
    t, c = torch.arange(32)[:, None], torch.arange(16)[None, :]
    v = ((t + c) % 4).float().view(1, 1, 32, 16).to(DEVICE)
    expected = []
    for w in range(2):
        row = []
        for ch in range(16):
            word = sum(((16 * w + i + ch) % 4) << (2 * i) for i in range(16))
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        expected.append(row)
    for q in (quantize_values(v, 2, 16), reference_quantize_values(v, 2, 16)):
        assert q.packed[0, 0].tolist() == expected
        assert (q.scale == 1.0).all() and (q.zero == 0.0).all()
    row = [15, 0, 1, 2, 3, 4, 5, 14]
    k = torch.tensor([row, [0] * 8, [15] * 8, [0] * 8], dtype=torch.float16).view(1, 1, 4, 8).to(DEVICE)
    for q in (quantize_keys(k, 4, 4), reference_quantize_keys(k, 4, 4)):  # every channel's group spans 0..15
        words = [sum(c << (4 * i) for i, c in enumerate(r)) - (1 << 32) for r in (row, [15] * 8)]
        assert q.packed.flatten().tolist() == [words[0], 0, words[1], 0]


def test_bad_inputs():
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    for fn in (quantize_keys, quantize_values, reference_quantize_keys, reference_quantize_values):
        for bits in (3, 16, 1, True, "4"):
            with pytest.raises(ValueError, match=r"bits must be one of \[2, 4, 8\]"):
                fn(x, bits, 4)
        for gs in (0, -4, 3, 12, 4.0, True):
            with pytest.raises(ValueError, match="group_size must be a positive power of two"):
                fn(x, 4, gs)
        with pytest.raises(ValueError, match="group_size 32 must divide"):
            fn(x, 4, 32)  # T = 8 for keys, D = 16 for values
        with pytest.raises(ValueError, match="dtype"):
            fn(x.double(), 4, 4)
        with pytest.raises(ValueError, match="dtype"):
            fn(x.to(torch.int32), 4, 4)
        with pytest.raises(ValueError, match="4 dimensions"):
            fn(x[0], 4, 4)
    with pytest.raises(ValueError, match=r"group_size 16 must divide k.shape\[2\]"):
        quantize_keys(x, 4, 16)  # T = 8; the same size divides D for values
    quantize_values(x, 4, 16)

    q = quantize_keys(x, 4, 4)
    fields = dict(packed=q.packed, scale=q.scale, zero=q.zero, bits=4, group_size=4, axis=2, shape=q.shape,
                  dtype=q.dtype)  # fmt: skip
    QuantizedTensor(**fields)
    bad = {
        "scale": dict(scale=q.scale.half()),  # dtype mismatch with dtype
        "zero": dict(zero=q.zero.to("meta")),  # device mismatch
        "packed": dict(packed=q.packed.to(torch.int64)),
        "axis": dict(axis=1),
        "bits": dict(bits=3),
        "shape": dict(shape=(1, 2, 16, 16)),  # packed no longer matches
    }
    for name, change in bad.items():
        with pytest.raises(ValueError, match=name):
            QuantizedTensor(**{**fields, **change})
    q.scale = q.scale.double()  # reassigned after construction: dequantize re-validates
    for fn in (dequantize, reference_dequantize):
        with pytest.raises(ValueError, match="scale"):
            fn(q)
        with pytest.raises(ValueError, match="QuantizedTensor"):
            fn(x)
