import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import append_tail, reference_append_tail

from .layouts import DEVICE, DTYPES


def _buffers(B, H, cap, D, dtype, gen):
    k = torch.randn(B, H, cap, D, generator=gen).to(dtype).to(DEVICE)
    return k, torch.randn(B, H, cap, D, generator=gen).to(dtype).to(DEVICE)


@st.composite
def append_inputs(draw):
    B, H = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([64, 128, 32]))
    dtype = draw(st.sampled_from(DTYPES))
    Q = draw(st.integers(0, 9))
    padded = draw(st.booleans())
    new_lens = draw(st.lists(st.integers(0, Q), min_size=B, max_size=B)) if padded else None
    lens = draw(st.lists(st.integers(0, 12), min_size=B, max_size=B))
    n = new_lens or [Q] * B
    cap = max(l + m for l, m in zip(lens, n)) + draw(st.integers(0, 3))
    return B, H, D, dtype, Q, lens, new_lens, cap, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(append_inputs())
def test_append_matches_reference(inputs):
    B, H, D, dtype, Q, lens, new_lens, cap, seed = inputs
    gen = torch.Generator().manual_seed(seed)
    tail_k, tail_v = _buffers(B, H, cap, D, dtype, gen)
    new_k, new_v = _buffers(B, H, Q, D, dtype, gen)
    tail_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    nl = torch.tensor(new_lens, dtype=torch.int64, device=DEVICE) if new_lens is not None else None
    ref_k, ref_v = tail_k.clone(), tail_v.clone()
    before_k, before_v = tail_k.clone(), tail_v.clone()

    out = append_tail(tail_k, tail_v, tail_lens, new_k, new_v, nl)
    ref = reference_append_tail(ref_k, ref_v, tail_lens, new_k, new_v, nl)
    n = new_lens if new_lens is not None else [Q] * B
    assert out.dtype == torch.int32 and out.tolist() == ref.tolist() == [l + m for l, m in zip(lens, n)]
    assert tail_lens.tolist() == lens  # input lengths untouched
    assert torch.equal(tail_k, ref_k) and torch.equal(tail_v, ref_v)
    # Independent check: written rows equal the new tokens, every other row kept its old bytes.
    for b in range(B):
        lo, hi = lens[b], lens[b] + n[b]
        assert torch.equal(tail_k[b, :, lo:hi], new_k[b, :, : n[b]])
        assert torch.equal(tail_v[b, :, lo:hi], new_v[b, :, : n[b]])
        for buf, old in ((tail_k, before_k), (tail_v, before_v)):
            assert torch.equal(buf[b, :, :lo], old[b, :, :lo]) and torch.equal(buf[b, :, hi:], old[b, :, hi:])


def test_many_successive_appends():
    """60 appends of 1-3 tokens (ragged across the batch) rebuild exactly the concatenated token stream."""
    B, H, D, cap = 3, 2, 64, 200
    gen = torch.Generator().manual_seed(0)
    tail_k = torch.full((B, H, cap, D), float("nan"), device=DEVICE)
    tail_v = torch.full((B, H, cap, D), float("nan"), device=DEVICE)
    tail_lens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    stream_k = [[] for _ in range(B)]
    stream_v = [[] for _ in range(B)]
    for step in range(60):
        Q = 1 + step % 3
        new_k = torch.randn(B, H, Q, D, generator=gen).to(DEVICE)
        new_v = torch.randn(B, H, Q, D, generator=gen).to(DEVICE)
        new_lens = torch.randint(0, Q + 1, (B,), generator=gen).to(DEVICE) if step % 2 else None
        tail_lens = append_tail(tail_k, tail_v, tail_lens, new_k, new_v, new_lens, check=step % 5 != 0)
        for b in range(B):
            m = int(new_lens[b]) if new_lens is not None else Q
            stream_k[b].append(new_k[b, :, :m])
            stream_v[b].append(new_v[b, :, :m])
    for b in range(B):
        expect_k, expect_v = torch.cat(stream_k[b], dim=1), torch.cat(stream_v[b], dim=1)
        assert int(tail_lens[b]) == expect_k.shape[1]
        assert torch.equal(tail_k[b, :, : expect_k.shape[1]], expect_k)
        assert torch.equal(tail_v[b, :, : expect_v.shape[1]], expect_v)
        assert torch.isnan(tail_k[b, :, expect_k.shape[1] :]).all()


def _args():
    B, H, cap, D, Q = 2, 2, 6, 64, 3
    return (torch.zeros(B, H, cap, D, device=DEVICE), torch.zeros(B, H, cap, D, device=DEVICE),
            torch.tensor([1, 3], dtype=torch.int32, device=DEVICE),
            torch.ones(B, H, Q, D, device=DEVICE), torch.ones(B, H, Q, D, device=DEVICE), None)  # fmt: skip


def _set(args, i, value):
    args = list(args)
    args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.mark.parametrize("fn", [append_tail, reference_append_tail])
@pytest.mark.parametrize(
    "i, value, match",
    [
        (0, lambda t: t[0], "tail_k must have 4 dimensions"),
        (1, lambda t: t[:, :, :4], "tail_v must have shape"),
        (1, lambda t: t.half(), "tail_v has dtype"),
        (2, lambda t: t[:1], "tail_lens must have shape"),
        (2, lambda t: t.float(), "tail_lens has dtype"),
        (3, lambda t: t[:, :1], "new_k must have shape"),
        (3, lambda t: t.to("meta"), "new_k is on meta"),
        (4, lambda t: t[..., :32], "new_v must have shape"),
        (5, torch.tensor([1, 4], device=DEVICE), "new_lens must lie in"),
        (5, torch.tensor([1], device=DEVICE), "new_lens must have shape"),
        (2, lambda t: t + 2, "capacity 6 would overflow"),
        (2, lambda t: t - 2, "tail_lens must be >= 0"),
    ],
)
def test_append_bad_inputs(fn, i, value, match):
    with pytest.raises(ValueError, match=match):
        fn(*_set(_args(), i, value))


def test_append_capacity_with_new_lens_fits():
    args = _set(_args(), 5, torch.tensor([3, 3], device=DEVICE))
    assert append_tail(*args).tolist() == [4, 6]  # exactly full is fine
