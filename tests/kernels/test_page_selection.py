import pytest
import torch

from kvpress_kernels import page_scores, reference_page_scores, reference_select_pages, select_pages

from .layouts import DEVICE, DTYPES
from .paged_layouts import build_paged

CASES = [  # (B, Hkv, G, D, lengths, page_size)
    (1, 1, 1, 16, [1], 4),
    (2, 2, 4, 64, [70, 9], 16),
    (3, 1, 8, 32, [33, 64, 5], 8),
    (1, 2, 3, 128, [200], 32),
]


def bound_f64(q, dense_k, lengths, page_size, Hkv, n_pages):
    """max over the group's heads of sum_c max(q_c lo_c, q_c hi_c), bounds taken from the dense tokens."""
    B, Hq, D = q.shape
    G = Hq // Hkv
    out = torch.full((B, Hkv, n_pages), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for p in range(-(-lengths[b] // page_size)):
                rows = dense_k[b, h, p * page_size : min((p + 1) * page_size, lengths[b])].double().cpu()
                lo, hi = rows.min(0).values, rows.max(0).values
                qs = q[b, h * G : (h + 1) * G].double().cpu()
                out[b, h, p] = torch.maximum(qs * lo, qs * hi).sum(1).max()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("recent", [0, 1, 2])
def test_scores_bound_every_key_and_match_float64(dtype, case, recent):
    B, Hkv, G, D, lengths, page_size = case
    paged, dense_k, _, q, _ = build_paged(sum(lengths) + 7 * recent, B, Hkv, G, D, dtype, lengths, page_size)
    scores = page_scores(q, paged, recent).cpu()
    ref = reference_page_scores(q, paged, recent).cpu()
    n_pages = paged.page_min.shape[2]
    expected = bound_f64(q, dense_k, lengths, page_size, Hkv, n_pages)
    assert scores.shape == (B, Hkv, n_pages) and scores.dtype == torch.float32
    for b, n in enumerate(lengths):
        last = -(-n // page_size)
        forced = slice(max(0, last - recent), last)
        assert (scores[b, :, forced] == float("inf")).all() and (ref[b, :, forced] == float("inf")).all()
        assert (scores[b, :, last:] == float("-inf")).all() and (ref[b, :, last:] == float("-inf")).all()
        scored = slice(0, max(0, last - recent))
        torch.testing.assert_close(scores[b, :, scored].double(), expected[b, :, scored], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ref[b, :, scored].double(), expected[b, :, scored], rtol=1e-5, atol=1e-4)
        # An upper bound: no key of the page scores higher with any query head of the group.
        for h in range(Hkv):
            logits = q[b, h * G : (h + 1) * G].double().cpu() @ dense_k[b, h, :n].double().cpu().T  # (G, n)
            per_page = torch.nn.functional.pad(logits.max(0).values, (0, last * page_size - n), value=-1e30)
            assert (per_page.view(last, page_size).max(1).values[scored] <= expected[b, h, scored] + 1e-9).all()


def test_select_pages_takes_the_best_and_forced_pages():
    B, Hkv, G, D, page_size = 2, 2, 2, 32, 4
    paged, _, _, q, _ = build_paged(5, B, Hkv, G, D, torch.float32, [40, 13], page_size)
    scores = page_scores(q, paged, recent_pages=1)
    chosen = select_pages(scores, 3)
    assert chosen.shape == (B, Hkv, 3) and chosen.dtype == torch.int32
    for b in range(B):
        for h in range(Hkv):
            picked = scores[b, h, chosen[b, h].long()]
            rest = scores[b, h][~torch.isin(torch.arange(scores.shape[-1], device=scores.device), chosen[b, h].long())]
            assert picked.min() >= rest.max()
    assert (chosen[0] == 9).any(-1).all()  # the last page of the first sequence (tokens 36..39) is always read
    with pytest.raises(ValueError, match="n_pages"):
        select_pages(scores, 0)


def test_q_shape_and_recent_pages_are_validated():
    paged, _, _, q, _ = build_paged(0, 1, 2, 2, 16, torch.float32, [8], 4)
    with pytest.raises(ValueError, match="q must have shape"):
        page_scores(q[:, :3], paged)
    with pytest.raises(ValueError, match="recent_pages"):
        page_scores(q, paged, recent_pages=-1)


def _ties(n: int, seed: int) -> torch.Tensor:
    """Scores with many exact ties, both infinities and signed zeros: the cut often falls inside a tie."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([float("-inf"), -3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 7.0, float("inf")])
    return pool[torch.randint(0, len(pool), (n,), generator=g)]


@pytest.mark.parametrize(
    "shape, k, kind",
    [((1, 1, 1), 1, "normal"), ((2, 3, 37), 5, "normal"), ((1, 2, 64), 64, "normal"), ((3, 1, 300), 17, "ties"),
     ((2, 2, 1000), 256, "normal"), ((1, 1, 129), 128, "ties"), ((1, 8, 8192), 256, "normal")],
)  # fmt: skip
def test_select_pages_kernel_picks_a_top_set_in_increasing_order(shape, k, kind):
    """Against torch.topk: the picked scores are the k largest (as multisets, ties at the cut allowed anywhere), the
    pages are distinct, in range and increasing, and among equal scores at the cut the first pages are taken."""
    g = torch.Generator().manual_seed(k)
    n = shape[-1]
    if kind == "ties":
        scores = torch.stack([_ties(n, seed) for seed in range(shape[0] * shape[1])]).view(shape)
    else:
        scores = torch.randn(shape, generator=g)
        scores.view(-1, n)[:, -1] = float("inf")  # a forced page
        scores.view(-1, n)[:, :2] = float("-inf")  # past a sequence's last page
    scores = scores.to(DEVICE)
    chosen = select_pages(scores, k)
    assert chosen.shape == shape[:-1] + (k,) and chosen.dtype == torch.int32
    ref = reference_select_pages(scores, k)
    for row, want, got in zip(scores.view(-1, n).cpu(), ref.view(-1, k).cpu(), chosen.view(-1, k).cpu()):
        assert bool((got[1:] > got[:-1]).all()) and 0 <= int(got.min()) and int(got.max()) < n
        assert torch.equal(row[got.long()].sort().values, row[want.long()].sort().values)
        cut = row[got.long()].min()
        ties = (row == cut).nonzero().flatten()
        taken = ties[torch.isin(ties, got.long())]
        assert torch.equal(taken, ties[: len(taken)])  # the first of the equal pages
