import pytest
import torch

from kvpress_kernels import page_scores, reference_page_scores, select_pages

from .layouts import DTYPES
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
