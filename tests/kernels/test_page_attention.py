import pytest
import torch

from kvpress_kernels import page_attention, page_scores, reference_page_attention, select_pages

from .layouts import DTYPES, assert_close
from .paged_layouts import build_paged

CASES = [  # (B, Hkv, G, D, lengths, page_size, n_selected)
    (1, 1, 1, 16, [1], 4, 1),
    (2, 2, 4, 64, [70, 9], 16, 3),
    (3, 1, 8, 32, [33, 64, 5], 8, 4),
    (1, 2, 3, 128, [200], 32, 2),
    (2, 1, 2, 64, [100, 100], 4, 30),
]


def attention_f64(q, dense_k, dense_v, lengths, pages, page_size, scale):
    """Softmax over the tokens of the selected pages (below each sequence's length), in float64."""
    B, Hq, D = q.shape
    Hkv = dense_k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            tokens = sorted(t for p in pages[b, h].tolist() for t in range(p * page_size, (p + 1) * page_size)
                            if t < lengths[b])  # fmt: skip
            if not tokens:
                continue
            k = dense_k[b, h, tokens].double().cpu()
            v = dense_v[b, h, tokens].double().cpu()
            qs = q[b, h * G : (h + 1) * G].double().cpu()
            out[b, h * G : (h + 1) * G] = torch.softmax(qs @ k.T * scale, -1) @ v
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pages_per_split", [None, 1, 2])
def test_selected_pages_match_float64(dtype, case, pages_per_split):
    B, Hkv, G, D, lengths, page_size, n_sel = case
    paged, dense_k, dense_v, q, scale = build_paged(len(lengths) + n_sel, B, Hkv, G, D, dtype, lengths, page_size,
                                                    scale_mult=4.0)  # fmt: skip
    pages = select_pages(page_scores(q, paged), min(n_sel, paged.page_min.shape[2]))
    out = page_attention(q, paged, pages, scale, pages_per_split=pages_per_split)
    ref = reference_page_attention(q, paged, pages, scale)
    expected = attention_f64(q, dense_k, dense_v, lengths, pages.cpu(), page_size, scale)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out.cpu(), expected, dtype, "kernel vs float64")
    assert_close(ref.cpu(), expected, dtype, "reference vs float64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_page_selected_is_full_attention(dtype):
    B, Hkv, G, D, page_size = 2, 2, 2, 64, 8
    lengths = [45, 64]
    paged, dense_k, dense_v, q, scale = build_paged(9, B, Hkv, G, D, dtype, lengths, page_size)
    n_pages = paged.page_min.shape[2]
    pages = select_pages(page_scores(q, paged), n_pages)
    out = page_attention(q, paged, pages, scale)
    for b, n in enumerate(lengths):
        k = dense_k[b, :, :n].double().repeat_interleave(G, 0)
        v = dense_v[b, :, :n].double().repeat_interleave(G, 0)
        full = torch.nn.functional.scaled_dot_product_attention(q[b, :, None].double(), k, v, scale=scale)[:, 0]
        assert_close(out[b].cpu(), full.cpu(), dtype, f"sequence {b}")


def test_pages_past_the_length_are_read_as_empty():
    paged, dense_k, dense_v, q, scale = build_paged(2, 1, 1, 2, 16, torch.float32, [6], 4, slack_pages=3)
    # The selection holds the one real page plus pages past the last token: only tokens 4..5 are attended.
    pages = torch.tensor([[[1, 3, 4]]], dtype=torch.int32, device=q.device)
    out = page_attention(q, paged, pages, scale, pages_per_split=1)
    expected = attention_f64(q, dense_k, dense_v, [6], pages.cpu(), 4, scale)
    assert_close(out.cpu(), expected, torch.float32)


def test_arguments_are_validated():
    paged, _, _, q, scale = build_paged(0, 1, 2, 2, 16, torch.float32, [8], 4)
    pages = torch.zeros(1, 2, 1, dtype=torch.int32, device=q.device)
    with pytest.raises(ValueError, match="pages must have shape"):
        page_attention(q, paged, pages[:, :1], scale)
    with pytest.raises(ValueError, match="pages has dtype"):
        page_attention(q, paged, pages.float(), scale)
    with pytest.raises(ValueError, match="pages_per_split"):
        page_attention(q, paged, pages, scale, pages_per_split=0)
