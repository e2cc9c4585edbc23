import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import compact_segments, reference_compact_segments

from .layouts import DEVICE, DTYPES


def _loop_compaction(src, indices, lengths):
    """Independent per-segment gather."""
    B, H = src.shape[:2]
    parts, cu = [], [0]
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            parts.append(src[b, h, indices[b, h, :n].long()])
            cu.append(cu[-1] + n)
    return torch.cat(parts), torch.tensor(cu, dtype=torch.int32)


@st.composite
def compaction_inputs(draw):
    B, H = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    S = draw(st.integers(1, 40))
    K = draw(st.integers(0, S + 4))  # K may exceed S: indices may repeat positions
    D = draw(st.sampled_from([64, 128, 16, 256]))
    dtype = draw(st.sampled_from(DTYPES))
    lengths = draw(st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, K)).map(lambda n: min(n, K)),
                            min_size=B * H, max_size=B * H))  # fmt: skip
    seed = draw(st.integers(0, 2**31 - 1))
    transpose = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    if transpose:  # non-contiguous (B, H, S, D) view of a (B, S, H, D) buffer, as transformers produces
        src = torch.randn(B, S, H, D, generator=gen).to(dtype).transpose(1, 2)
    else:
        src = torch.randn(B, H, S, D, generator=gen).to(dtype)
    indices = torch.randint(0, S, (B, H, K), generator=gen)
    lengths_t = torch.tensor(lengths, dtype=torch.int64).view(B, H)
    # Garbage past the lengths must be ignored.
    past = torch.arange(K)[None, None, :] >= lengths_t[..., None]
    indices = torch.where(past, torch.randint(-50, 50 + S, (B, H, K), generator=gen) * 997, indices)
    return src.to(DEVICE), indices.to(DEVICE), lengths_t


@settings(max_examples=25, deadline=None)
@given(compaction_inputs(), st.sampled_from([torch.int64, torch.int32]))
def test_compaction_matches_reference_and_loop(inputs, index_dtype):
    src, indices, lengths = inputs
    indices = indices.to(index_dtype)
    flat, cu = compact_segments(src, indices, lengths)
    ref_flat, ref_cu = reference_compact_segments(src, indices, lengths)
    loop_flat, loop_cu = _loop_compaction(src, indices, lengths)
    assert flat.shape == (int(lengths.sum()), src.shape[-1]) and flat.dtype == src.dtype and flat.is_contiguous()
    assert cu.dtype == torch.int32 and cu.shape == (lengths.numel() + 1,)
    assert torch.equal(flat, ref_flat) and torch.equal(cu, ref_cu)
    assert torch.equal(flat.cpu(), loop_flat.cpu()) and torch.equal(cu.cpu(), loop_cu)


def test_compaction_all_empty():
    src = torch.randn(2, 2, 5, 64, device=DEVICE)
    indices = torch.zeros(2, 2, 3, dtype=torch.long, device=DEVICE)
    flat, cu = compact_segments(src, indices, torch.zeros(2, 2, dtype=torch.int32))
    assert flat.shape == (0, 64) and cu.tolist() == [0, 0, 0, 0, 0]


def _args():
    src = torch.randn(2, 3, 8, 64, device=DEVICE)
    indices = torch.arange(8, device=DEVICE).expand(2, 3, 8).clone()
    lengths = torch.full((2, 3), 4)
    return src, indices, lengths


@pytest.mark.parametrize("fn", [compact_segments, reference_compact_segments])
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s, i, n: (s[0], i, n), "src must have 4 dimensions"),
        (lambda s, i, n: (s, i.float(), n), "indices has dtype"),
        (lambda s, i, n: (s, i[:, :2], n), "indices must have shape"),
        (lambda s, i, n: (s, i, n[:1]), "lengths must have shape"),
        (lambda s, i, n: (s, i, n.float()), "lengths has dtype"),
        (lambda s, i, n: (s, i.to("meta"), n), "indices is on meta"),
        (lambda s, i, n: (s, i, n + 5), "lengths must lie in"),
        (lambda s, i, n: (s, i, n - 5), "lengths must lie in"),
        (lambda s, i, n: (s, i + 5, n), "indices must lie in"),
        (lambda s, i, n: (s, i - 1, n), "indices must lie in"),
    ],
)
def test_compaction_bad_inputs(fn, mutate, match):
    with pytest.raises(ValueError, match=match):
        fn(*mutate(*_args()))


def test_compaction_ignores_out_of_range_garbage_past_lengths():
    src, indices, lengths = _args()
    indices[..., 4:] = 10**6  # beyond lengths: not validated, not read
    flat, _ = compact_segments(src, indices, lengths)
    assert torch.equal(flat, src[:, :, :4].reshape(-1, 64))
