import pytest
import torch

from kvpress_kernels import a_shape_blocks, block_sparse_blocks, mask_to_blocks, vertical_slash_blocks


def listed(index: torch.Tensor, count: torch.Tensor) -> list[list[list[set]]]:
    """Per (batch row, head, query block): the set of listed key blocks."""
    B, H, n_qb, _ = index.shape
    return [[[set(index[b, h, i, : int(count[b, h, i])].tolist()) for i in range(n_qb)] for h in range(H)]
            for b in range(B)]  # fmt: skip


def test_mask_to_blocks_lists_increasing_indices():
    mask = torch.tensor([[[[True, False, True], [False, False, False], [True, True, True]]]])
    index, count = mask_to_blocks(mask)
    assert count.tolist() == [[[2, 0, 3]]] and index.dtype == torch.int32
    assert index[0, 0, 0, :2].tolist() == [0, 2] and index[0, 0, 2].tolist() == [0, 1, 2]


@pytest.mark.parametrize("n, bs, sink, local", [(100, 16, 1, 2), (64, 16, 0, 1), (200, 32, 2, 3), (10, 16, 1, 4)])
def test_a_shape_is_sinks_plus_a_local_band(n, bs, sink, local):
    index, count = a_shape_blocks(2, 3, n, bs, sink, local)
    got = listed(index, count)
    for i in range(-(-n // bs)):
        want = {j for j in range(i + 1) if j < sink or j > i - local}
        assert all(got[b][h][i] == want for b in range(2) for h in range(3))


def _vs_reference(q, k, scale, bs, n_vertical, n_slash, last_q):
    """Float64 loops: scores of columns and diagonals from the last queries' softmax, their top sets, and the blocks
    each query block's rows meet."""
    B, Hq, n, _ = q.shape
    groups = Hq // k.shape[1]
    last_q = min(last_q, n)
    out = []
    for b in range(B):
        per_head = []
        for h in range(Hq):
            vert, slash = [0.0] * n, [0.0] * n
            kh = k[b, h // groups].double()
            for p in range(n - last_q, n):
                w = torch.softmax(q[b, h, p].double() @ kh[: p + 1].T * scale, -1)
                for j in range(p + 1):
                    vert[j] += float(w[j])
                    slash[p - j] += float(w[j])
            vert[0] = slash[0] = float("inf")
            cols = set(sorted(range(n), key=lambda j: -vert[j])[:n_vertical])
            diags = set(sorted(range(n), key=lambda o: -slash[o])[:n_slash])
            blocks = []
            for i in range(-(-n // bs)):
                kept = {c // bs for c in cols if c // bs <= i}
                for r in range(i * bs, (i + 1) * bs):
                    kept |= {(r - o) // bs for o in diags if 0 <= r - o and (r - o) // bs <= i}
                blocks.append(kept)
            per_head.append(blocks)
        out.append(per_head)
    return out


@pytest.mark.parametrize(
    "B, Hq, Hkv, n, bs, n_vertical, n_slash, last_q",
    [(1, 2, 1, 80, 16, 5, 3, 16), (2, 4, 2, 150, 32, 8, 4, 64), (1, 1, 1, 40, 16, 40, 40, 64)],
)
def test_vertical_slash_lists_the_blocks_of_the_top_columns_and_diagonals(B, Hq, Hkv, n, bs, n_vertical, n_slash,
                                                                           last_q):  # fmt: skip
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(B, Hq, n, 16, generator=gen), torch.randn(B, Hkv, n, 16, generator=gen)
    index, count = vertical_slash_blocks(q, k, 0.25, bs, n_vertical, n_slash, last_q)
    assert listed(index, count) == _vs_reference(q, k, 0.25, bs, n_vertical, n_slash, last_q)
    if n_vertical >= n:  # every column: every causal block
        assert listed(index, count)[0][0] == [set(range(i + 1)) for i in range(-(-n // bs))]


@pytest.mark.parametrize("B, Hq, Hkv, n, bs, top", [(1, 2, 1, 90, 16, 2), (2, 4, 2, 200, 32, 3), (1, 1, 1, 33, 16, 9)])
def test_block_sparse_takes_the_top_pooled_blocks_and_the_diagonal(B, Hq, Hkv, n, bs, top):
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(B, Hq, n, 16, generator=gen), torch.randn(B, Hkv, n, 16, generator=gen)
    got = listed(*block_sparse_blocks(q, k, bs, top))
    n_qb, groups = -(-n // bs), Hq // Hkv
    for b in range(B):
        for h in range(Hq):
            for i in range(n_qb):
                q_mean = q[b, h, i * bs : (i + 1) * bs].double().mean(0)
                scores = {j: float(q_mean @ k[b, h // groups, j * bs : (j + 1) * bs].double().mean(0))
                          for j in range(i)}  # fmt: skip
                want = {i} | set(sorted(scores, key=lambda j: -scores[j])[: top - 1])
                assert got[b][h][i] == want
