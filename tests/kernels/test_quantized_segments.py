import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import (
    QuantizedSegments,
    append_segment_groups,
    dequantize_segments,
    quantize_segments,
    reference_dequantize,
    reference_quantize_keys,
    reference_quantize_values,
)

from .layouts import DEVICE, DTYPES


def ragged(lens, D, dtype, gen, mag=1.0):
    """(N, D) random keys and values for segments of `lens` tokens, plus the (S,) int64 lengths."""
    n = sum(lens)
    k = (torch.randn(n, D, generator=gen) * mag + torch.randn(1, generator=gen) * mag).to(dtype).to(DEVICE)
    v = (torch.randn(n, D, generator=gen) * mag).to(dtype).to(DEVICE)
    return k, v, torch.tensor(lens, dtype=torch.int64, device=DEVICE)


def expected_segment(k, v, bits, G):
    """Independent quantization of one segment's tokens (T, D): padded to whole groups with its last row."""
    T = k.shape[0]
    pad = -T % G
    kp = torch.cat([k, k[-1:].expand(pad, -1)]) if T else k
    vp = torch.cat([v, v[-1:].expand(pad, -1)]) if T else v
    return reference_quantize_keys(kp[None, None], bits, G), reference_quantize_values(vp[None, None], bits, G)


def segment_groups(segs, s):
    """Storage slices (k_packed, k_scale, k_zero, v_packed, v_scale, v_zero) of segment s's groups."""
    lo, hi = segs.cu_groups[s].item(), segs.cu_groups[s + 1].item()
    W, G = segs.words_per_group, segs.group_size
    return (segs.k_packed[lo * G : hi * G], segs.k_scale[lo:hi], segs.k_zero[lo:hi],
            segs.v_packed[lo * W : hi * W], segs.v_scale[lo * G : hi * G], segs.v_zero[lo * G : hi * G])  # fmt: skip


def flat(qk, qv):
    return tuple(t[0, 0] for t in (qk.packed, qk.scale, qk.zero, qv.packed, qv.scale, qv.zero))


def assert_storage_equal(actual, expected):
    for name, a, e in zip(("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero"), actual, expected):
        assert torch.equal(a, e), name


def assert_within_bound(out, x, scale_per_element, dtype, what):
    """|dequantized - x| <= scale / 2 (exact arithmetic) plus rounding: to dtype (an ulp of out), in the float32
    ``q * scale + zero`` itself (an ulp of each of its terms, which are at most |x| + scale apart from out), and in the
    float32 ``(x - zero) / scale`` that picks the code (an ulp of a code of up to 255, times the scale: near a
    half-step the other code may win)."""
    ulp = torch.finfo(dtype).eps * out.double().abs()
    fp32 = torch.finfo(torch.float32).eps * (out.double().abs() + x.double().abs() + scale_per_element.double())
    code = torch.finfo(torch.float32).eps * 255 * scale_per_element.double()
    bound = scale_per_element.double() / 2 + ulp + 2 * fp32 + code + 1e-30
    err = (out.double() - x.double()).abs()
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item()}"


def per_element_scales(qk, qv, G):
    """(T, D) key scale and value scale of each element of a (1, 1, T, D) quantization."""
    return qk.scale[0, 0].repeat_interleave(G, dim=0), qv.scale[0, 0].repeat_interleave(G, dim=1)


def expected_nbytes(lens_groups, D, bits, G, dtype):
    n = sum(lens_groups)
    S = len(lens_groups)
    W = math.ceil(G * bits / 32)
    es = torch.finfo(dtype).bits // 8
    keys = n * W * D * 4 + 2 * n * D * es
    values = n * G * (D // G) * W * 4 + 2 * n * G * (D // G) * es
    return keys + values + 4 * (S + 1) + 8 * S


@st.composite
def segment_cases(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    D = draw(st.sampled_from([64, 128]))
    G = draw(st.sampled_from([g for g in (16, 32, 64, 128) if D % g == 0]))
    S = draw(st.integers(1, 5))
    special = [0, 1, G - 1, G, G + 1, 2 * G + 3]
    lens = draw(st.lists(st.one_of(st.sampled_from(special), st.integers(0, 3 * G)), min_size=S, max_size=S))
    dtype = draw(st.sampled_from(DTYPES))
    mag = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    appends = draw(st.lists(st.integers(0, 2), max_size=2))
    return bits, D, G, lens, dtype, mag, appends, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(segment_cases())
def test_quantize_append_dequantize_match_per_segment_reference(case):
    """Storage equals each segment quantized on its own (bit for bit), appended groups land after each segment's
    groups, and dequantized valid tokens are within scale / 2 of the originals."""
    bits, D, G, lens, dtype, mag, appends, seed = case
    gen = torch.Generator().manual_seed(seed)
    k, v, seg_lens = ragged(lens, D, dtype, gen, mag)
    segs = quantize_segments(k, v, seg_lens, bits, G)
    S = len(lens)
    groups = [-(-n // G) for n in lens]
    assert segs.cu_groups.tolist() == [0] + torch.tensor(groups).cumsum(0).tolist()
    assert segs.ctx_len.tolist() == lens and segs.ctx_groups.tolist() == groups
    assert segs.nbytes() == expected_nbytes(groups, D, bits, G, dtype)

    starts = [sum(lens[:s]) for s in range(S)]
    # Per segment: (full-precision tokens, expected storage parts, per-element key/value scales) in order.
    history = []
    for s in range(S):
        ks, vs = k[starts[s] : starts[s] + lens[s]], v[starts[s] : starts[s] + lens[s]]
        qk, qv = expected_segment(ks, vs, bits, G)
        sk, sv = per_element_scales(qk, qv, G)
        history.append([(ks, vs, flat(qk, qv), sk[: lens[s]], sv[: lens[s]])])

    for n in appends:
        nk = torch.randn(S, n * G, D, generator=gen).mul(mag).to(dtype).to(DEVICE)
        nv = torch.randn(S, n * G, D, generator=gen).mul(mag).to(dtype).to(DEVICE)
        old_cu = segs.cu_groups.clone()
        segs = append_segment_groups(segs, nk, nv)
        assert segs.cu_groups.tolist() == (old_cu + torch.arange(S + 1, device=DEVICE) * n).tolist()
        groups = [g + n for g in groups]
        assert segs.nbytes() == expected_nbytes(groups, D, bits, G, dtype)
        for s in range(S):
            qk, qv = expected_segment(nk[s], nv[s], bits, G)
            sk, sv = per_element_scales(qk, qv, G)
            history[s].append((nk[s], nv[s], flat(qk, qv), sk, sv))
    assert segs.ctx_len.tolist() == lens and segs.ctx_groups.tolist() == [-(-n // G) for n in lens]

    out_k, out_v, out_lens = dequantize_segments(segs)
    ref_k, ref_v, ref_lens = dequantize_segments(segs, reference=True)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v) and torch.equal(out_lens, ref_lens)
    assert out_lens.tolist() == [sum(h[0].shape[0] for h in hist) for hist in history]
    row = 0
    for s in range(S):
        parts = segment_groups(segs, s)
        expected_parts = [torch.cat(p) for p in zip(*(h[2] for h in history[s]))]
        assert_storage_equal(parts, expected_parts)
        for xk, xv, _, sk, sv in history[s]:
            T = xk.shape[0]
            assert_within_bound(out_k[row : row + T], xk, sk, dtype, f"keys of segment {s}")
            assert_within_bound(out_v[row : row + T], xv, sv, dtype, f"values of segment {s}")
            row += T
    assert row == out_k.shape[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_padding_keeps_partial_group_parameters_and_exact_constant_groups(bits):
    """A partial group's scale/zero are those of its valid tokens: padding with the last row adds no range."""
    G, D = 32, 64
    gen = torch.Generator().manual_seed(bits)
    k, v, seg_lens = ragged([5, G + 7], D, torch.float32, gen)
    k[:5] = 3.25  # a constant partial group is reproduced exactly
    segs = quantize_segments(k, v, seg_lens, bits, G)
    torch.testing.assert_close(segs.k_zero[0], k[:5].amin(0), rtol=0, atol=0)
    torch.testing.assert_close(segs.k_scale[0], torch.zeros(D, device=DEVICE), rtol=0, atol=0)
    part = k[5 + G :]  # valid tokens of segment 1's second (partial) group
    torch.testing.assert_close(segs.k_zero[2], part.amin(0), rtol=0, atol=0)
    levels = (1 << bits) - 1
    torch.testing.assert_close(segs.k_scale[2].double(), ((part.amax(0) - part.amin(0)) / levels).double())
    out_k = dequantize_segments(segs)[0]
    assert torch.equal(out_k[:5], k[:5])


def test_storage_layout_matches_quantize_of_concatenated_groups():
    """Whole-group segments are laid out exactly as quantize_keys/values of their concatenation (B = H = 1)."""
    G, D, bits = 64, 128, 4
    gen = torch.Generator().manual_seed(3)
    k, v, seg_lens = ragged([G, 2 * G, 0, G], D, torch.bfloat16, gen)
    segs = quantize_segments(k, v, seg_lens, bits, G)
    qk, qv = reference_quantize_keys(k[None, None], bits, G), reference_quantize_values(v[None, None], bits, G)
    assert_storage_equal((segs.k_packed, segs.k_scale, segs.k_zero, segs.v_packed, segs.v_scale, segs.v_zero),
                         flat(qk, qv))  # fmt: skip
    torch.testing.assert_close(dequantize_segments(segs)[0], reference_dequantize(qk)[0, 0], rtol=0, atol=0)


def test_append_to_empty_storage_and_zero_groups():
    G, D = 16, 64
    gen = torch.Generator().manual_seed(5)
    k, v, seg_lens = ragged([0, 0, 0], D, torch.float16, gen)
    segs = quantize_segments(k, v, seg_lens, 8, G)
    assert segs.n_groups == 0 and segs.cu_groups.tolist() == [0, 0, 0, 0]
    same = append_segment_groups(segs, k.new_zeros(3, 0, D), v.new_zeros(3, 0, D))
    assert same.cu_groups.tolist() == [0, 0, 0, 0]
    nk = torch.randn(3, G, D, generator=gen).half().to(DEVICE)
    nv = torch.randn(3, G, D, generator=gen).half().to(DEVICE)
    grown = append_segment_groups(segs, nk, nv)
    out_k, out_v, lens = dequantize_segments(grown)
    assert lens.tolist() == [G, G, G]
    qk, qv = reference_quantize_keys(nk.reshape(1, 1, 3 * G, D), 8, G), reference_quantize_values(nv[None], 8, G)
    torch.testing.assert_close(out_k, reference_dequantize(qk)[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out_v, reference_dequantize(qv).reshape(3 * G, D), rtol=0, atol=0)


def _segs():
    gen = torch.Generator().manual_seed(0)
    k, v, lens = ragged([3, 40], 64, torch.float32, gen)
    return k, v, lens


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "bits must be one of \\[2, 4, 8\\]"),
        ({"bits": True}, "bits must be one of"),
        ({"group_size": 48}, "group_size must be a power of two >= 16 dividing head_dim = 64"),
        ({"group_size": 8}, "group_size must be a power of two >= 16"),
        ({"group_size": 128}, "accepted: \\[16, 32, 64\\]"),
        ({"seg_lens": lambda t: t + 1}, "seg_lens must be >= 0 and sum to seg_k.shape\\[0\\] = 43"),
        ({"seg_lens": lambda t: t * torch.tensor([-1, 2], device=DEVICE)}, "seg_lens must be >= 0"),
        ({"seg_lens": lambda t: t.float()}, "seg_lens has dtype"),
        ({"seg_v": lambda t: t[:, :32]}, "seg_v must have shape"),
        ({"seg_v": lambda t: t.half()}, "seg_v has dtype"),
        ({"seg_k": lambda t: t.int()}, "seg_k has dtype"),
        ({"seg_k": lambda t: t[None]}, "seg_k must have 2 dimensions"),
    ],
)
def test_quantize_segments_bad_input(kwargs, match):
    k, v, lens = _segs()
    args = {"seg_k": k, "seg_v": v, "seg_lens": lens, "bits": 4, "group_size": 32}
    for name, value in kwargs.items():
        args[name] = value(args[name]) if callable(value) else value
    with pytest.raises(ValueError, match=match):
        quantize_segments(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda k, v: (k[:1], v[:1]), "new_k must have shape \\(2, \\*, 64\\)"),
        (lambda k, v: (k[:, :20], v[:, :20]), "multiple of group_size = 32"),
        (lambda k, v: (k, v[:, :32]), "new_v must have shape"),
        (lambda k, v: (k.half(), v.half()), "new_k has dtype"),
        (lambda k, v: (k[..., :32], v[..., :32]), "new_k must have shape"),
    ],
)
def test_append_bad_input_leaves_storage_usable(change, match):
    k, v, lens = _segs()
    segs = quantize_segments(k, v, lens, 2, 32)
    nk, nv = torch.randn(2, 64, 64, device=DEVICE), torch.randn(2, 64, 64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        append_segment_groups(segs, *change(nk, nv))
    grown = append_segment_groups(segs, nk, nv)
    assert dequantize_segments(grown)[2].tolist() == [3 + 64, 40 + 64]


def test_inconsistent_fields_are_rejected():
    k, v, lens = _segs()
    segs = quantize_segments(k, v, lens, 4, 32)
    fields = {f: getattr(segs, f) for f in QuantizedSegments.__dataclass_fields__}
    for name, value, match in [
        ("k_packed", segs.k_packed[1:], "k_packed must have shape"),
        ("v_scale", segs.v_scale.half(), "v_scale has dtype"),
        ("ctx_len", segs.ctx_len.long(), "ctx_len has dtype"),
        ("cu_groups", segs.cu_groups[:-1], "ctx_len must have shape"),
        ("group_size", 64, "k_packed must have shape"),
        ("bits", 5, "bits must be one of"),
        ("dtype", torch.float64, "dtype must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantizedSegments(**{**fields, name: value})
    with pytest.raises(ValueError, match="segs must be a QuantizedSegments"):
        dequantize_segments(fields)
