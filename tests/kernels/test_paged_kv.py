import pytest
import torch

from kvpress_kernels import PagedKV

from .layouts import DEVICE, DTYPES, randn
from .paged_layouts import build_paged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("lengths", [[1], [37, 5], [16, 33, 64]])
def test_buffer_and_bounds_match_the_tokens(dtype, page_size, lengths):
    B, Hkv, D = len(lengths), 2, 8
    paged, dense_k, dense_v, _, _ = build_paged(3, B, Hkv, 1, D, dtype, lengths, page_size)
    assert paged.lengths.tolist() == lengths and paged.capacity % page_size == 0
    for b, n in enumerate(lengths):
        assert torch.equal(paged.keys[b, :, :n], dense_k[b, :, :n])
        assert torch.equal(paged.values[b, :, :n], dense_v[b, :, :n])
        for p in range(paged.page_min.shape[2]):
            rows = dense_k[b, :, p * page_size : min((p + 1) * page_size, n)].double()
            if rows.shape[1] == 0:  # no token yet: empty bounds
                assert torch.isinf(paged.page_min[b, :, p]).all() and (paged.page_min[b, :, p] > 0).all()
                assert torch.isinf(paged.page_max[b, :, p]).all() and (paged.page_max[b, :, p] < 0).all()
            else:
                assert torch.equal(paged.page_min[b, :, p].double(), rows.min(1).values)
                assert torch.equal(paged.page_max[b, :, p].double(), rows.max(1).values)


def test_grow_keeps_tokens_and_bounds_and_appends_continue():
    paged, dense_k, _, _, _ = build_paged(1, 2, 1, 1, 4, torch.float32, [7, 7], 4, slack_pages=0)
    before = {f: getattr(paged, f).clone() for f in ("keys", "values", "page_min", "page_max")}
    paged.grow(21)
    assert paged.capacity == 24 and paged.page_min.shape[2] == 6
    for f, old in before.items():
        assert torch.equal(getattr(paged, f)[:, :, : old.shape[2]], old)
    assert torch.isinf(paged.page_min[:, :, 2:]).all()
    new = torch.randn(2, 1, 9, 4).to(DEVICE)
    paged.append(new, new)
    assert paged.lengths.tolist() == [16, 16]
    keys = torch.cat([dense_k, new], 2)
    torch.testing.assert_close(paged.page_max[:, :, :4], keys.unflatten(2, (4, 4)).amax(3), rtol=0, atol=0)


def test_memory_bytes_counts_buffers_and_bounds():
    k = torch.zeros(1, 2, 10, 8, dtype=torch.bfloat16)
    paged = PagedKV.from_dense(k, k, 4, capacity=16)
    # keys + values: 2 * 2 heads * 16 slots * 8; bounds: 2 * 2 heads * 4 pages * 8 (bf16); lengths: one int32.
    assert paged.memory_bytes() == (2 * 2 * 16 * 8 + 2 * 2 * 4 * 8) * 2 + 4


@pytest.mark.parametrize("page_size", [0, 3, 12, "16"])
def test_page_size_is_validated(page_size):
    k = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="page_size"):
        PagedKV.from_dense(k, k, page_size)


def test_appends_read_lengths_from_the_device_only():
    gen = torch.Generator().manual_seed(0)
    k = randn(1, 1, 5, 4, dtype=torch.float32, gen=gen)
    paged = PagedKV.from_dense(k, k, 4, capacity=8)
    paged.lengths.fill_(2)  # the device lengths decide where tokens go, not the buffer's history
    new = torch.ones(1, 1, 1, 4, device=DEVICE)
    paged.append(new, new)
    assert torch.equal(paged.keys[0, 0, 2], new[0, 0, 0]) and paged.lengths.tolist() == [3]
