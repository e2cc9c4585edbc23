import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import (
    AttentionConfig,
    QuantizedSegments,
    append_segment_groups,
    dequantize_segments,
    quantize_segments,
    quantized_varlen_attention,
    reference_quantized_varlen_attention,
)
from kvpress_kernels.quantized_segments import valid_slots

from .layouts import DEVICE, DTYPES, TOL_VS_F64

# Kernel vs the torch reference on the same dequantized tokens: both round the output once (as varlen_attention).
TOL_VS_REF = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def randn(*shape, dtype, gen, mag=1.0):
    return (torch.randn(*shape, generator=gen) * mag).to(dtype).to(DEVICE)


def build(seed, B, Hkv, G, D, dtype, bits, GS, ctx_lens, appended, tail_lens, Q, q_lens=None, mag=1.0, slack=2):
    """Quantized context (ctx_lens per segment, then `appended` whole groups per segment), a NaN-padded tail and
    queries. Returns (args, full) where full holds the full-precision tokens per segment for the dense checks."""
    gen = torch.Generator().manual_seed(seed)
    S = B * Hkv
    k = randn(sum(ctx_lens), D, dtype=dtype, gen=gen, mag=mag)
    v = randn(sum(ctx_lens), D, dtype=dtype, gen=gen)
    segs = quantize_segments(k, v, torch.tensor(ctx_lens, device=DEVICE), bits, GS)
    starts = [sum(ctx_lens[:s]) for s in range(S)]
    full = [[k[a : a + n], v[a : a + n]] for a, n in zip(starts, ctx_lens)]
    for n in appended:
        nk, nv = randn(S, n * GS, D, dtype=dtype, gen=gen, mag=mag), randn(S, n * GS, D, dtype=dtype, gen=gen)
        segs = append_segment_groups(segs, nk, nv)
        for s in range(S):
            full[s] = [torch.cat([full[s][0], nk[s]]), torch.cat([full[s][1], nv[s]])]
    cap = max(tail_lens) + slack
    tail_k = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=DEVICE)
    tail_v = torch.full_like(tail_k, float("nan"))
    for b, t in enumerate(tail_lens):  # capacity past tail_lens stays NaN: the kernel must never read it
        tail_k[b, :, :t] = randn(Hkv, t, D, dtype=dtype, gen=gen, mag=mag)
        tail_v[b, :, :t] = randn(Hkv, t, D, dtype=dtype, gen=gen)
    q = randn(B, Hkv * G, Q, D, dtype=dtype, gen=gen)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE) if q_lens is not None else None
    tail_lens_t = torch.tensor(tail_lens, dtype=torch.int32, device=DEVICE)
    return (q, segs, tail_k, tail_v, tail_lens_t, D**-0.5, q_lens_t), full


def attention_f64(args, seg_tokens):
    """Independent float64 attention: query i < Qb of sequence b sees its kv head's `seg_tokens[s]` (keys, values)
    and tail positions 0 .. T_b - Qb + i; padding queries give 0."""
    q, _, tail_k, tail_v, tail_lens, scale, q_lens = args
    B, Hq, Q, D = q.shape
    Hkv = tail_k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Q, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        T = int(tail_lens[b])
        Qb = int(q_lens[b]) if q_lens is not None else Q
        for h in range(Hkv):
            sk, sv = seg_tokens[b * Hkv + h]
            keys = torch.cat([sk, tail_k[b, h, :T]]).double()
            vals = torch.cat([sv, tail_v[b, h, :T]]).double()
            i = torch.arange(Qb, device=q.device)[:, None]
            visible = torch.cat([torch.ones(Qb, sk.shape[0], dtype=torch.bool, device=q.device),
                                 torch.arange(T, device=q.device)[None, :] <= T - Qb + i], dim=1)  # fmt: skip
            scores = (q[b, h * G : (h + 1) * G, :Qb].double() @ keys.T) * scale
            out[b, h * G : (h + 1) * G, :Qb] = torch.softmax(scores.masked_fill(~visible, -torch.inf), -1) @ vals
    return out


def dequantized_tokens(segs):
    k, v, lens = dequantize_segments(segs, reference=True)
    bounds = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).tolist()
    return [(k[a:e], v[a:e]) for a, e in itertools.pairwise(bounds)]


@st.composite
def cases(draw, decode: bool):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    D = draw(st.sampled_from([64, 128]))
    GS = draw(st.sampled_from([g for g in (32, 64, 128) if D % g == 0]))
    bits = draw(st.sampled_from([2, 4, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    special = st.sampled_from([0, 1, GS - 1, GS, GS + 1])
    ctx = draw(st.lists(st.one_of(special, st.integers(0, 2 * GS + 5)), min_size=B * Hkv, max_size=B * Hkv))
    appended = draw(st.lists(st.integers(0, 2), max_size=2))
    Q = 1 if decode else draw(st.integers(2, 4))
    q_lens = draw(st.none() | st.lists(st.integers(1 if decode else 0, Q), min_size=B, max_size=B))
    prior = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    tail = [p + (q_lens[b] if q_lens is not None else Q) for b, p in enumerate(prior)]
    config = draw(st.sampled_from([None, AttentionConfig(split_tokens=16, block_n=16),
                                   AttentionConfig(split_tokens=40, block_n=32, combine_rows=1)]))  # fmt: skip
    seed = draw(st.integers(0, 2**31 - 1))
    return (seed, B, Hkv, G, D, dtype, bits, GS, ctx, appended, tail, Q, q_lens), config


def _check(params, config):
    args, _ = build(*params)
    dtype = args[0].dtype
    out = quantized_varlen_attention(*args, config=config)
    ref = reference_quantized_varlen_attention(*args)
    dense = attention_f64(args, dequantized_tokens(args[1]))
    assert out.shape == args[0].shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL_VS_REF[dtype][0], rtol=TOL_VS_REF[dtype][1])
    atol, rtol = TOL_VS_F64[dtype]
    torch.testing.assert_close(out.double(), dense, atol=atol, rtol=rtol)
    torch.testing.assert_close(ref.double(), dense, atol=atol, rtol=rtol)
    q_lens = args[6]
    if q_lens is not None:  # padding query rows are exactly 0
        for b, n in enumerate(q_lens.tolist()):
            assert (out[b, :, n:] == 0).all()


@settings(max_examples=12, deadline=None)
@given(cases(decode=True))
def test_decode_matches_reference_and_float64(case):
    _check(*case)


@settings(max_examples=8, deadline=None)
@given(cases(decode=False))
def test_question_block_matches_reference_and_float64(case):
    _check(*case)


def quantization_bound(args, full):
    """Bound on |attention(quantized) - attention(full precision)| per output row, from |dk| <= s_k / 2 and
    |dv| <= s_v / 2 per element: logits move by at most eps = scale * sum_d |q_d| s_k / 2, so the weights change by
    at most (exp(2 eps) - 1) in total and the output by max |dv| + (exp(2 eps) - 1) * max |v|."""
    q, segs, tail_k, tail_v, tail_lens, scale, _ = args
    B, Hq, Q, _ = q.shape
    Hkv = tail_k.shape[1]
    G, GS = Hq // Hkv, segs.group_size
    k_all, v_all = dequantize_segments(segs, reference=True)[:2]
    bound = torch.zeros(B, Hq, Q, 1, dtype=torch.float64, device=q.device)
    # Per-element key / value scales of every valid token, segment by segment (same order as dequantize_segments).
    valid, lens = valid_slots(segs)
    ks = segs.k_scale.double().repeat_interleave(GS, 0)[valid]  # (N, D)
    vs = segs.v_scale.double().repeat_interleave(GS, 1)[valid]
    starts = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).tolist()
    for b in range(B):
        T = int(tail_lens[b])
        for h in range(Hkv):
            s = b * Hkv + h
            a, e = starts[s], starts[s + 1]
            v_max = torch.cat([full[s][1].double().abs().flatten(), tail_v[b, h, :T].double().abs().flatten()]).max()
            qs = q[b, h * G : (h + 1) * G].double().abs()  # (G, Q, D)
            eps = (scale * qs @ (ks[a:e] / 2).T).amax(-1) if e > a else torch.zeros(G, Q, device=q.device)
            dv = (vs[a:e] / 2).max() if e > a else 0.0
            bound[b, h * G : (h + 1) * G, :, 0] = dv + torch.expm1(2 * eps) * v_max
    assert k_all.shape[0] == starts[-1] and v_all.shape[0] == starts[-1]
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_close_to_full_precision_within_quantization_bound(bits, dtype):
    """The quantized attention stays within the bound implied by scale / 2 per element of the full-precision dense
    attention (float64 on the original tokens); 8 bits is also close in absolute terms."""
    params = (11 + bits, 2, 2, 4, 64, dtype, bits, 32, [0, 31, 70, 96], [1], [5, 3], 2, [2, 1])
    args, full = build(*params, mag=0.3)
    out = quantized_varlen_attention(*args, config=AttentionConfig(split_tokens=48, block_n=16))
    exact = attention_f64(args, [tuple(t) for t in full])
    bound = quantization_bound(args, full)
    atol, rtol = TOL_VS_F64[dtype]
    err = (out.double() - exact).abs()
    q_ok = torch.arange(2, device=DEVICE)[None, :] < args[6][:, None]  # padding rows are 0 in both
    assert (err <= bound + atol + rtol * exact.abs())[q_ok[:, None, :, None].expand_as(err)].all()
    if bits == 8:  # the bound is informative (not vacuous) at 8 bits, and the error small
        assert bound.max() < 0.5 and err.max() < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_loop_with_appended_groups(dtype):
    """A cache-like sequence: decode steps grow the tail; every G tokens the oldest group is flushed into the
    segments (append_segment_groups) and the tail shifts. Outputs stay equal to the float64 reference."""
    B, Hkv, G, D, GS, bits = 2, 2, 2, 64, 16, 4
    args, _ = build(5, B, Hkv, G, D, dtype, bits, GS, [3, 0, 40, 33], [], [1, 1], 1, slack=2 * GS)
    q, segs, tail_k, tail_v, tail_lens, scale, _ = args
    gen = torch.Generator().manual_seed(2)
    for step in range(2 * GS + 2):
        out = quantized_varlen_attention(q, segs, tail_k, tail_v, tail_lens, scale, check=step % 5 == 0,
                                         config=AttentionConfig(split_tokens=24, block_n=16) if step % 2 else None)
        dense = attention_f64((q, segs, tail_k, tail_v, tail_lens, scale, None), dequantized_tokens(segs))
        torch.testing.assert_close(out.double(), dense, atol=TOL_VS_F64[dtype][0], rtol=TOL_VS_F64[dtype][1])
        if int(tail_lens.min()) > GS:  # flush one group of every segment, keep the newer tokens in the tail
            new_k = tail_k[:, :, :GS].reshape(B * Hkv, GS, D)
            new_v = tail_v[:, :, :GS].reshape(B * Hkv, GS, D)
            segs = append_segment_groups(segs, new_k.contiguous(), new_v.contiguous())
            tail_k = torch.cat([tail_k[:, :, GS:], torch.full_like(tail_k[:, :, :GS], float("nan"))], dim=2)
            tail_v = torch.cat([tail_v[:, :, GS:], torch.full_like(tail_v[:, :, :GS], float("nan"))], dim=2)
            tail_lens = tail_lens - GS
        t = tail_lens.tolist()
        for b in range(B):
            tail_k[b, :, t[b]] = randn(Hkv, D, dtype=dtype, gen=gen)
            tail_v[b, :, t[b]] = randn(Hkv, D, dtype=dtype, gen=gen)
        tail_lens = tail_lens + 1
        q = randn(B, Hkv * G, 1, D, dtype=dtype, gen=gen)
    assert segs.n_groups > sum(-(-n // GS) for n in [3, 0, 40, 33])  # groups were appended


def test_cpu_dispatch_uses_reference(monkeypatch):
    args, _ = build(3, 1, 2, 2, 64, torch.float16, 4, 64, [10, 64], [1], [3], 2)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KVPRESS_FORCE_TRITON", "0")
        assert torch.equal(quantized_varlen_attention(*args), reference_quantized_varlen_attention(*args))
    empty = (args[0][:, :, :0],) + args[1:6]
    assert quantized_varlen_attention(*empty).shape == (1, 4, 0, 64)


def _args():
    return list(build(4, 2, 2, 2, 64, torch.float32, 4, 32, [3, 0, 40, 33], [1], [2, 1], 2, [2, 1])[0])


def _set(args, i, value):
    args = list(args)
    args[i] = value(args[i]) if callable(value) else value
    return args


def _segs_with(**changes):
    def change(segs):
        fields = {f: getattr(segs, f) for f in QuantizedSegments.__dataclass_fields__}
        fields.update({k: v(fields[k]) if callable(v) else v for k, v in changes.items()})
        return _raw(fields)

    return change


def _raw(fields):
    """A QuantizedSegments with possibly inconsistent data (constructed without __post_init__ data checks)."""
    segs = object.__new__(QuantizedSegments)
    segs.__dict__.update(fields)
    return segs


@pytest.mark.parametrize("fn", [quantized_varlen_attention, reference_quantized_varlen_attention])
@pytest.mark.parametrize(
    "i, value, match",
    [
        (0, lambda t: t.half(), "q has dtype torch.float16, expected the dtype of segs"),
        (0, lambda t: t[..., :32], "segs.head_dim = 64 must equal q.shape\\[3\\] = 32"),
        (0, lambda t: t[:, :3], "not a multiple of the 2 kv heads"),
        (1, lambda s: s.k_packed, "segs must be a QuantizedSegments"),
        (1, _segs_with(bits=5), "bits must be one of \\[2, 3, 4, 8\\]"),
        (1, _segs_with(group_size=48), "group_size must be a power of two >= 16"),
        (1, _segs_with(k_scale=lambda t: t[:-1]), "k_packed must have shape"),
        (2, lambda t: t[:1], "tail_k must have shape"),
        (2, lambda t: t[:, :1], "segs has 4 segments, expected batch \\* kv_heads = 2"),
        (4, lambda t: t[None], "tail_lens must have 1 dimensions"),
        (5, float("inf"), "scale must be a finite"),
        (6, lambda t: t[:1], "q_lens must have shape"),
    ],
)
def test_bad_shapes(fn, i, value, match):
    args = _args()
    if i == 2 and "segments" in match:  # one kv head everywhere in the tail: shapes agree, segment count does not
        args[0], args[3] = args[0][:, :2], args[3][:, :1]
    with pytest.raises(ValueError, match=match):
        fn(*_set(args, i, value))


@pytest.mark.parametrize(
    "i, value, match",
    [
        (1, _segs_with(ctx_groups=lambda t: t + 1), "ctx_groups = ceil\\(ctx_len / group_size\\)"),
        (1, _segs_with(cu_groups=lambda t: t.flip(0)), "cu_groups must be non-decreasing"),
        (4, lambda t: t + 100, "tail_lens must lie in"),
        (6, lambda t: t + 1, "q_lens must lie in"),
    ],
)
def test_bad_values(i, value, match):
    with pytest.raises(ValueError, match=match):
        quantized_varlen_attention(*_set(_args(), i, value))


def test_bad_config_and_usable_after_errors():
    args = _args()
    with pytest.raises(ValueError, match="config.block_n must be a power of two >= 16"):
        quantized_varlen_attention(*args, config=AttentionConfig(block_n=8))
    out = quantized_varlen_attention(*args)
    torch.testing.assert_close(out, reference_quantized_varlen_attention(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "dtype, bits, GS", [(torch.float32, 2, 32), (torch.bfloat16, 4, 16), (torch.float16, 8, 32), (torch.bfloat16, 8, 16)]
)
def test_head_dim_not_a_power_of_two(dtype, bits, GS):
    """D = 96: channel tiles padded to 128 and 3 or 6 value groups, each owning one replica of the query rows (the
    codes enter the dot products as 2**MANT + c, or converted exactly for float32 and 8-bit bfloat16)."""
    _check((21 + bits, 2, 1, 4, 96, dtype, bits, GS, [70, 5], [1], [3, 6], 2, [2, 1]), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_rows_over_several_row_blocks(dtype):
    """G * Q = 32 rows times D / group_size = 4 replicas exceed one program's rows: each split runs several row
    blocks; key tiles of 32 slots hold two scale groups, and split_tokens is re-aligned to them."""
    _check((7, 1, 2, 8, 64, dtype, 4, 16, [45, 130], [1], [9], 4, None), AttentionConfig(split_tokens=40, block_n=32))
