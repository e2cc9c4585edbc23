import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import AttentionConfig, append_tail, reference_varlen_attention, varlen_attention

from .layouts import DEVICE, DTYPES, TOL_VS_F64, assert_close, build_layout, dense_attention_f64

# Kernel vs the torch reference (float32 softmax, output rounded to the dtype): both round the output once.
TOL_VS_REF = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


@st.composite
def layouts(draw, decode: bool):
    B = draw(st.integers(1, 4))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    D = draw(st.sampled_from([64, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    S = draw(st.integers(1, 40))
    seg_lens = draw(st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, S)), min_size=B * Hkv,
                             max_size=B * Hkv))  # fmt: skip
    Q = 1 if decode else draw(st.integers(2, 6))
    q_lens = draw(st.none() | st.lists(st.integers(0 if not decode else 1, Q), min_size=B, max_size=B))
    prior = draw(st.lists(st.integers(0, 5), min_size=B, max_size=B))
    scale_mult = draw(st.sampled_from([1.0, 6.0]))  # 6x: peaky softmax, exercises the running max
    config = draw(st.sampled_from([None, AttentionConfig(split_tokens=8, block_n=16),
                                   AttentionConfig(split_tokens=3, block_n=16, combine_rows=1)]))  # fmt: skip
    seed = draw(st.integers(0, 2**31 - 1))
    lay = build_layout(seed, B, Hkv, G, D, dtype, S, seg_lens, prior, Q, q_lens, scale_mult=scale_mult)
    return lay, config


def _check(lay, config):
    dtype = lay.q.dtype
    out = varlen_attention(*lay.args(), config=config)
    ref = reference_varlen_attention(*lay.args())
    dense = dense_attention_f64(lay)
    assert out.shape == lay.q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    atol, rtol = TOL_VS_REF[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    assert_close(out, dense, dtype, "kernel vs dense float64")
    assert_close(ref, dense, dtype, "reference vs dense float64")
    if lay.q_lens is not None:  # padding query rows are exactly 0
        for b, n in enumerate(lay.q_lens.tolist()):
            assert (out[b, :, n:] == 0).all()


@settings(max_examples=25, deadline=None)
@given(layouts(decode=True))
def test_decode_matches_reference_and_dense(case):
    _check(*case)


@settings(max_examples=20, deadline=None)
@given(layouts(decode=False))
def test_question_block_matches_reference_and_dense(case):
    _check(*case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_decode_loop(dtype):
    """Compress once, then 16 decode steps: append one token per sequence, attend, compare every step."""
    B, Hkv, G, D, S = 2, 2, 4, 64, 24
    lay = build_layout(7, B, Hkv, G, D, dtype, S, [0, 1, 24, 9], prior_tail=[0, 3], Q=1, slack=24)
    gen = torch.Generator().manual_seed(1)
    config = AttentionConfig(split_tokens=16, block_n=16)
    for step in range(16):
        if step:
            k = torch.randn(B, Hkv, 1, D, generator=gen).to(dtype).to(DEVICE)
            v = torch.randn(B, Hkv, 1, D, generator=gen).to(dtype).to(DEVICE)
            T = lay.tail_lens.tolist()
            lay.tail_lens = append_tail(lay.tail_k, lay.tail_v, lay.tail_lens, k, v)
            for b in range(B):
                lay.new_k[b, :, T[b]], lay.new_v[b, :, T[b]] = k[b, :, 0], v[b, :, 0]
            lay.q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(dtype).to(DEVICE)
        if step % 6 == 5:  # capacity grows geometrically elsewhere: emulate a regrow (copy of the tail only)
            lay.tail_k = torch.cat([lay.tail_k, torch.full_like(lay.tail_k, float("nan"))], dim=2)
            lay.tail_v = torch.cat([lay.tail_v, torch.full_like(lay.tail_v, float("nan"))], dim=2)
            lay.new_k = torch.cat([lay.new_k, torch.zeros_like(lay.new_k)], dim=2)
            lay.new_v = torch.cat([lay.new_v, torch.zeros_like(lay.new_v)], dim=2)
        out = varlen_attention(*lay.args(), config=config if step % 2 else None, check=step % 3 == 0)
        assert_close(out, dense_attention_f64(lay), dtype, f"step {step}")


@pytest.mark.parametrize("D", [16, 256])
def test_other_head_dims(D):
    lay = build_layout(3, 2, 2, 2, D, torch.float16, 20, [5, 0, 20, 1], [2, 0], Q=3, q_lens=[3, 1])
    _check(lay, AttentionConfig(split_tokens=8, block_n=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_query_rows(dtype):
    """G * Q = 80 rows: several row blocks per kv head (64 rows for half types, 32 for fp32)."""
    lay = build_layout(9, 2, 1, 8, 64, dtype, 16, [16, 2], [0, 4], Q=10, q_lens=[10, 7])
    _check(lay, AttentionConfig(split_tokens=12, block_n=16))


def test_non_contiguous_query_and_heuristic_splits():
    """q as transformers produces it ((B, Q, Hq, D) transposed); default launch heuristic with many splits."""
    lay = build_layout(5, 1, 2, 4, 64, torch.bfloat16, 40, [40, 33], [30], Q=2)
    lay.q = lay.q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not lay.q.is_contiguous()
    _check(lay, AttentionConfig(programs_per_sm=16))


def test_float64_and_cpu_dispatch_use_reference(monkeypatch):
    lay = build_layout(2, 2, 1, 2, 64, torch.float32, 10, [3, 10], [1, 2], Q=2, q_lens=[2, 1])
    lay64 = build_layout(2, 2, 1, 2, 64, torch.float32, 10, [3, 10], [1, 2], Q=2, q_lens=[2, 1])
    for name in ("q", "seg_k", "seg_v", "tail_k", "tail_v"):
        setattr(lay64, name, getattr(lay64, name).double())
    out64 = varlen_attention(*lay64.args())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, dense_attention_f64(lay64), atol=1e-12, rtol=1e-12)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KVPRESS_FORCE_TRITON", "0")
        assert torch.equal(varlen_attention(*lay.args()), reference_varlen_attention(*lay.args()))


def test_empty_query_block():
    lay = build_layout(2, 1, 1, 2, 64, torch.float32, 10, [3], [2], Q=1)
    lay.q = lay.q[:, :, :0]
    assert varlen_attention(*lay.args()).shape == (1, 2, 0, 64)


def _args():
    return list(build_layout(4, 2, 2, 2, 64, torch.float32, 8, [3, 0, 8, 1], [1, 0], Q=2, q_lens=[2, 1]).args())


def _set(args, i, value):
    args = list(args)
    args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.mark.parametrize("fn", [varlen_attention, reference_varlen_attention])
@pytest.mark.parametrize(
    "i, value, match",
    [
        (0, lambda t: t[0], "q must have 4 dimensions"),
        (0, lambda t: t[:, :3], "not a multiple of the 2 kv heads"),
        (0, lambda t: t.int(), "q has dtype"),
        (1, lambda t: t.half(), "seg_k has dtype"),
        (1, lambda t: t[:, :32], "seg_k must have shape"),
        (2, lambda t: t[:-1], "seg_v must have shape"),
        (3, lambda t: t[:-1], "cu_seqlens must have shape"),
        (3, lambda t: t.float(), "cu_seqlens has dtype"),
        (4, lambda t: t[:1], "tail_k must have shape"),
        (5, lambda t: t.to("meta"), "tail_v is on meta"),
        (6, lambda t: t[None], "tail_lens must have 1 dimensions"),
        (7, float("nan"), "scale must be a finite"),
        (8, lambda t: t[:1], "q_lens must have shape"),
    ],
)
def test_attention_bad_shapes(fn, i, value, match):
    with pytest.raises(ValueError, match=match):
        fn(*_set(_args(), i, value))


@pytest.mark.parametrize(
    "i, value, match",
    [
        (3, lambda t: t.flip(0), "cu_seqlens must be non-decreasing"),
        (3, lambda t: t - 1, "cu_seqlens must be non-decreasing"),
        (8, lambda t: t + 1, "q_lens must lie in"),
        (6, lambda t: t + 100, "tail_lens must lie in"),
        (6, lambda t: t * 0, "tail_lens\\[b\\] must be >= the number of valid queries"),
    ],
)
def test_attention_bad_values(i, value, match):
    with pytest.raises(ValueError, match=match):
        varlen_attention(*_set(_args(), i, value))


def test_reference_matches_formula_on_tiny_case():
    """Hand-checkable: one sequence, one head, 1 kept token + 2 tail tokens, 2 queries."""
    D = 64
    k = torch.zeros(3, D)
    k[:, 0] = torch.tensor([0.0, 1.0, 2.0])
    v = torch.eye(3, D)
    q = torch.zeros(1, 1, 2, D)
    q[..., 0] = 1.0
    seg_k, seg_v, cu = k[:1], v[:1], torch.tensor([0, 1], dtype=torch.int32)
    tail_k, tail_v = k[None, None, 1:], v[None, None, 1:]
    tail_lens = torch.tensor([2], dtype=torch.int32)
    args = (q.to(DEVICE), seg_k.to(DEVICE), seg_v.to(DEVICE), cu.to(DEVICE), tail_k.to(DEVICE), tail_v.to(DEVICE),
            tail_lens.to(DEVICE), 1.0)  # fmt: skip
    for out in (varlen_attention(*args), reference_varlen_attention(*args)):
        out = out.cpu().double()
        w0 = torch.tensor([1.0, math.e]) / (1 + math.e)  # query 0 sees seg token (score 0) and tail 0 (score 1)
        w1 = torch.tensor([1.0, math.e, math.e**2]) / (1 + math.e + math.e**2)
        torch.testing.assert_close(out[0, 0, 0, :3], torch.cat([w0, torch.zeros(1)]).double())
        torch.testing.assert_close(out[0, 0, 1, :3], w1.double())
