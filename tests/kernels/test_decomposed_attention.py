"""decomposed_attention: the Triton kernel against its torch reference and a float64 dense attention, for every
combination of corrections (levels, outliers, low rank, pre-RoPE keys), GQA ratios, dtypes and ragged lengths."""

import pytest
import torch

from kvpress_kernels import (
    RotaryTable,
    append_decomposed_groups,
    decompose_segments,
    decomposed_attention,
    dequantize_decomposed,
    fit_levels,
    reference_decomposed_attention,
)

from .layouts import DEVICE, TOL_VS_F64
from .test_quantized_attention import TOL_VS_REF, attention_f64

FEATURES = {
    "uniform": {},
    "levels": {"levels": True},
    "outliers+sinks": {"outlier_ratio": 0.02, "sinks": True},
    "gear": {"outlier_ratio": 0.02, "rank": 4},
    "kvquant": {"levels": True, "outlier_ratio": 0.01, "sinks": True, "rope": True},
}


def build(seed, B, Hkv, G, D, dtype, bits, GS, ctx_lens, appended, tail_lens, Q, features, q_lens=None):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    S = B * Hkv
    n = sum(ctx_lens)
    k, v = randn(n, D), randn(n, D)
    rope = positions = exact = k_levels = v_levels = None
    if features.get("rope"):
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        rope = RotaryTable(inv_freq.to(DEVICE), 1.1)
        positions = torch.cat([torch.sort(torch.randperm(3 * max(ctx_lens) + 1, generator=gen)[:c]).values
                               for c in ctx_lens]).to(DEVICE)  # fmt: skip
    if features.get("sinks"):
        exact = torch.zeros(n, dtype=torch.bool, device=DEVICE)
        starts = torch.tensor([0] + ctx_lens[:-1]).cumsum(0)
        exact[starts[torch.tensor(ctx_lens) > 0].to(DEVICE)] = True
    if features.get("levels"):
        k_levels = fit_levels(torch.rand(4096, generator=gen) ** 2 * ((1 << bits) - 1), bits)
        v_levels = fit_levels(torch.rand(4096, generator=gen) * ((1 << bits) - 1), bits)
    options = {"outlier_ratio": features.get("outlier_ratio", 0.0), "rank": features.get("rank", 0)}
    ds = decompose_segments(k, v, torch.tensor(ctx_lens, device=DEVICE), bits, GS, k_levels=k_levels,
                            v_levels=v_levels, exact_rows=exact, positions=positions, rope=rope, **options)  # fmt: skip
    next_pos = 3 * max(ctx_lens) + 1
    for a in appended:
        new_pos = None
        if rope is not None:
            new_pos = (next_pos + torch.arange(a * GS)).expand(S, -1).to(DEVICE)
            next_pos += a * GS
        ds = append_decomposed_groups(ds, randn(S, a * GS, D), randn(S, a * GS, D),
                                      outlier_ratio=options["outlier_ratio"], positions=new_pos, rope=rope)  # fmt: skip
    cap = max(tail_lens) + 2
    tail_k = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=DEVICE)
    tail_v = torch.full_like(tail_k, float("nan"))
    for b, t in enumerate(tail_lens):  # capacity past tail_lens stays NaN: never read
        tail_k[b, :, :t] = randn(Hkv, t, D)
        tail_v[b, :, :t] = randn(Hkv, t, D)
    q = randn(B, Hkv * G, Q, D)
    q_lens_t = None if q_lens is None else torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    return (q, ds, tail_k, tail_v, torch.tensor(tail_lens, dtype=torch.int32, device=DEVICE), D**-0.5, q_lens_t), rope


def per_segment(ds, rope):
    k, v, lens = dequantize_decomposed(ds, rope)
    starts = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    return [(k[a:b], v[a:b]) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


def check(args, rope, config=None):
    q, ds, tail_k, tail_v, tail_lens, scale, q_lens = args
    out = decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope, config=config)
    ref = reference_decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, q_lens, rope)
    atol, rtol = TOL_VS_REF[q.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    atol, rtol = TOL_VS_F64[q.dtype]
    want = attention_f64((q, None, tail_k, tail_v, tail_lens, scale, q_lens), per_segment(ds, rope))
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    assert not out.isnan().any()
    return out


@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_references(name, dtype):
    """One query per sequence (decode), GQA 4, ragged contexts with a partial last group, one flush appended."""
    args, rope = build(1, 2, 2, 4, 64, dtype, 4, 32, [45, 1, 70, 32], [1], [3, 1], 1, FEATURES[name])
    check(args, rope)


@pytest.mark.parametrize("name", ["uniform", "kvquant", "gear"])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_bits_gqa_and_question_blocks(name, bits):
    """Several query tokens (a question), padding queries, GQA 1 and 3 and empty segments."""
    args, rope = build(2, 2, 3, 3, 32, torch.float32, bits, 16, [0, 17, 33, 2, 0, 16], [], [5, 4], 4,
                       FEATURES[name], q_lens=[4, 2])  # fmt: skip
    check(args, rope)
    args, rope = build(3, 1, 2, 1, 64, torch.bfloat16, bits, 64, [100, 64], [1, 1], [2], 2, FEATURES[name])
    check(args, rope)


def test_splits_and_outlier_chunks():
    """Long segments split over several programs (split-K merge) and groups holding more outliers than one chunk
    of the scatter dot."""
    from kvpress_kernels import AttentionConfig

    args, rope = build(4, 1, 2, 2, 32, torch.float32, 4, 32, [300, 129], [], [1], 1,
                       {"outlier_ratio": 0.08, "rank": 2, "rope": True})  # fmt: skip
    counts = args[1].k_outliers.cu.diff()
    assert int(counts.max()) > 16  # more than one chunk of outliers in some group
    check(args, rope, config=AttentionConfig(split_tokens=64))


def test_empty_context_and_single_token():
    args, rope = build(5, 2, 1, 2, 32, torch.float16, 4, 32, [0, 1], [], [1, 1], 1, FEATURES["kvquant"])
    check(args, rope)


def test_corrections_lower_the_attention_error_on_outlier_data():
    """Against attention over the exact keys and values: sparse outliers bring 2-bit attention much closer, with or
    without the low-rank term (whose own gain, on the reconstruction, is tested with the storage)."""
    gen = torch.Generator().manual_seed(0)
    n, D = 256, 64
    k = torch.randn(n, D, generator=gen)
    k[:, 5] *= 20  # an outlier channel, as real keys have
    k[torch.rand(n, D, generator=gen) < 0.01] *= 15
    v = torch.randn(n, D, generator=gen)
    k, v = k.to(DEVICE), v.to(DEVICE)
    q = torch.randn(1, 2, 1, D, generator=gen).to(DEVICE)
    tail = torch.zeros(1, 1, 1, D, device=DEVICE)
    lens = torch.tensor([n], device=DEVICE)
    tail_lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    exact = attention_f64((q, None, tail, tail, tail_lens, D**-0.5, None), [(k, v)])

    def error(**opts):
        ds = decompose_segments(k, v, lens, 2, 32, **opts)
        out = decomposed_attention(q, ds, tail, tail, tail_lens, D**-0.5)
        return float((out.double() - exact).norm())

    plain, dense_sparse, gear = error(), error(outlier_ratio=0.02), error(outlier_ratio=0.02, rank=4)
    assert dense_sparse < 0.7 * plain and gear < 0.7 * plain


def test_bad_arguments():
    args, rope = build(6, 1, 1, 1, 32, torch.float32, 4, 32, [32], [], [1], 1, FEATURES["kvquant"])
    q, ds, tail_k, tail_v, tail_lens, scale, q_lens = args
    with pytest.raises(ValueError, match="rope"):
        decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale)
    with pytest.raises(ValueError, match="DecomposedSegments"):
        decomposed_attention(q, ds.segs, tail_k, tail_v, tail_lens, scale, rope=rope)
    with pytest.raises(ValueError, match="dtype"):
        decomposed_attention(q.double(), ds, tail_k, tail_v, tail_lens, scale, rope=rope)
