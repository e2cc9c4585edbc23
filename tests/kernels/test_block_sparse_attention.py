import pytest
import torch

from kvpress_kernels import block_sparse_attention, block_token_mask, mask_to_blocks, reference_block_sparse_attention

from .layouts import DEVICE, DTYPES, TOL_VS_F64, randn

CASES = [  # (B, Hq, Hkv, n, D, block_size)
    (1, 1, 1, 16, 16, 16),
    (2, 4, 2, 70, 32, 16),
    (1, 6, 3, 100, 64, 32),
    (3, 2, 1, 33, 128, 16),
    (1, 8, 8, 130, 64, 64),
]


def dense_f64(q, k, v, mask, scale):
    """Softmax attention in float64 from an explicit (B, Hq, n, n) token mask, one row at a time."""
    B, Hq, n, D = q.shape
    groups = Hq // k.shape[1]
    out = torch.zeros(B, Hq, n, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, h // groups].double().cpu(), v[b, h // groups].double().cpu()
            for i in range(n):
                seen = mask[b, h, i].cpu()
                if seen.any():
                    w = torch.softmax(q[b, h, i].double().cpu() @ kh[seen].T * scale, -1)
                    out[b, h, i] = w @ vh[seen]
    return out


def random_blocks(B, H, n, block_size, gen, with_later=True):
    """Random block lists per query block, including blocks after the query's own (skipped) and empty rows."""
    n_qb = -(-n // block_size)
    mask = torch.rand(B, H, n_qb, n_qb, generator=gen) < 0.5
    if not with_later:
        mask &= torch.ones(n_qb, n_qb, dtype=torch.bool).tril()
    mask[..., 0, :] = False  # a query block that sees nothing
    index, count = mask_to_blocks(mask)
    return index.to(DEVICE), count.to(DEVICE), mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_listed_blocks_against_float64(dtype, case):
    B, Hq, Hkv, n, D, bs = case
    gen = torch.Generator().manual_seed(n + D)
    q, k, v = (
        randn(B, Hq, n, D, dtype=dtype, gen=gen),
        randn(B, Hkv, n, D, dtype=dtype, gen=gen),
        randn(B, Hkv, n, D, dtype=dtype, gen=gen),
    )
    index, count, block_mask = random_blocks(B, Hq, n, bs, gen)
    scale = D**-0.5
    out = block_sparse_attention(q, k, v, index, count, scale, bs)
    assert out.shape == q.shape and out.dtype == dtype
    token_mask = block_token_mask(index.cpu(), count.cpu(), n, bs)
    # The mask itself, from the block mask by hand: listed, not after the query's block, causal.
    n_qb = block_mask.shape[-1]
    for i in (0, n // 2, n - 1):
        for j in range(n):
            want = bool(block_mask[0, 0, i // bs, j // bs]) and j <= i and (j // bs) < n_qb
            assert bool(token_mask[0, 0, i, j]) == want
    expected = dense_f64(q, k, v, token_mask, scale)
    atol, rtol = TOL_VS_F64[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=rtol)
    ref = reference_block_sparse_attention(q, k, v, index, count, scale, bs)
    torch.testing.assert_close(ref.double().cpu(), expected, atol=atol, rtol=rtol)
    assert (out[:, :, :bs].float() == 0).all()  # the first query block sees nothing


@pytest.mark.parametrize("case", CASES[1:3])
def test_every_block_listed_is_causal_attention(case):
    B, Hq, Hkv, n, D, bs = case
    gen = torch.Generator().manual_seed(7)
    q, k, v = (randn(B, h, n, D, dtype=torch.float32, gen=gen) for h in (Hq, Hkv, Hkv))
    n_qb = -(-n // bs)
    index, count = mask_to_blocks(torch.ones(B, Hq, n_qb, n_qb, dtype=torch.bool).tril())
    out = block_sparse_attention(q, k, v, index.to(DEVICE), count.to(DEVICE), D**-0.5, bs)
    groups = Hq // Hkv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double().cpu(), k.double().cpu().repeat_interleave(groups, 1), v.double().cpu().repeat_interleave(groups, 1),
        is_causal=True,
    )  # fmt: skip
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-5, rtol=2e-5)


def test_bad_arguments_are_named():
    q = torch.zeros(1, 2, 20, 16, device=DEVICE)
    k = torch.zeros(1, 1, 20, 16, device=DEVICE)
    index, count = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE), torch.ones(1, 2, 2, dtype=torch.int32,
                                                                                          device=DEVICE)  # fmt: skip
    with pytest.raises(ValueError, match="block_size must be one of 16, 32, 64, 128, got 24"):
        block_sparse_attention(q, k, k, index, count, 1.0, 24)
    with pytest.raises(ValueError, match=r"block_index must have shape \(1, 2, 2, \*\)"):
        block_sparse_attention(q, k, k, index[:, :, :1], count, 1.0, 16)
    with pytest.raises(ValueError, match="k and v must have shape"):
        block_sparse_attention(q, k[:, :, :5], k, index, count, 1.0, 16)
    with pytest.raises(ValueError, match="block_count has dtype torch.int64"):
        block_sparse_attention(q, k, k, index, count.long(), 1.0, 16)
