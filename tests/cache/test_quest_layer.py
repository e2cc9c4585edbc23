"""`QuestLayer` against float64 math on the dense tokens: page bounds, the selected pages, and attention over them."""

import pytest
import torch

from kvpress.cache.layer_access import decode_bytes_read
from kvpress.cache.quest_layer import QuestLayer


def quest_f64(query, keys, values, page_size, n_select, recent_pages, scale):
    """Independent Quest decode attention: float64 bounds per page, top pages (recent ones forced), softmax."""
    B, Hq, _, D = query.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    n_pages = -(-n // page_size)
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            k, v = keys[b, h].double(), values[b, h].double()
            qs = query[b, h * G : (h + 1) * G, 0].double()
            bound = torch.empty(n_pages, dtype=torch.float64)
            for p in range(n_pages):
                rows = k[p * page_size : (p + 1) * page_size]
                lo, hi = rows.min(0).values, rows.max(0).values
                bound[p] = torch.maximum(qs * lo, qs * hi).sum(1).max()
            bound[max(0, n_pages - recent_pages) :] = float("inf")
            pages = bound.topk(min(n_select, n_pages)).indices
            tokens = torch.cat([torch.arange(p * page_size, min((p + 1) * page_size, n)) for p in pages.tolist()])
            out[b, h * G : (h + 1) * G] = torch.softmax(qs @ k[tokens].T * scale, -1) @ v[tokens]
    return out


def make_layer(seed, B, Hkv, n, D, page_size, budget, recent=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
    values = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
    return QuestLayer.from_dense(keys, values, page_size, budget, recent), keys, values, gen


@pytest.mark.parametrize("B, Hkv, G, D, n, page_size, budget, recent",
                         [(1, 1, 1, 16, 40, 4, 12, 1), (2, 2, 4, 32, 101, 8, 32, 1), (1, 2, 3, 64, 77, 16, 48, 2),
                          (3, 1, 2, 16, 64, 2, 10, 0)])  # fmt: skip
def test_decode_steps_attend_over_the_best_pages(B, Hkv, G, D, n, page_size, budget, recent):
    layer, keys, values, gen = make_layer(n, B, Hkv, n, D, page_size, budget, recent)
    scale = 2.0 * D**-0.5
    for step in range(5):  # each step appends its own token first, as a decode forward does
        k_new, v_new = torch.randn(B, Hkv, 1, D, generator=gen), torch.randn(B, Hkv, 1, D, generator=gen)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        view, _ = layer.update(k_new, v_new)
        query = torch.randn(B, Hkv * G, 1, D, generator=gen)
        out = view.attend(query, scaling=scale)
        assert out.shape == (B, 1, Hkv * G, D)
        expected = quest_f64(query, keys, values, page_size, budget // page_size, recent, scale)
        torch.testing.assert_close(out[:, 0].double(), expected, atol=2e-5, rtol=2e-5)
    assert layer.sparse_steps == 5 and layer.get_seq_length() == n + 5


def test_questions_and_short_layers_attend_over_every_token():
    layer, keys, values, gen = make_layer(0, 2, 2, 30, 16, 4, 64)
    k_new, v_new = torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen)
    view, _ = layer.update(k_new, v_new)
    query = torch.randn(2, 4, 3, 16, generator=gen)
    keys, values = torch.cat([keys, k_new], 2).double(), torch.cat([values, v_new], 2).double()
    mask = torch.ones(3, 33, dtype=torch.bool).tril(30)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.double(), keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(view.attend(query).transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    view.attend(query[:, :, :1])  # 34 tokens <= budget 64: a decode step reads everything
    assert layer.sparse_steps == 0


def test_bytes_read_follow_the_budget_and_memory_the_whole_cache():
    layer, _, _, _ = make_layer(0, 1, 2, 1000, 64, 16, 128, dtype=torch.bfloat16)
    row = 64 * 2  # bytes of one key (bf16)
    pages = -(-1000 // 16)
    assert layer.decode_bytes_read() == 2 * (2 * pages * row + 2 * 128 * row)
    assert layer.decode_bytes_read() < 2 * 1000 * 2 * row / 3
    assert layer.memory_bytes() == layer.paged.memory_bytes() >= 2 * 1000 * 2 * row
    small, _, _, _ = make_layer(0, 1, 2, 100, 64, 16, 128, dtype=torch.bfloat16)
    assert small.decode_bytes_read() == 2 * 100 * 2 * row  # below the budget: read whole

    class Cache:
        layers = [layer, small]

    assert decode_bytes_read(Cache()) == layer.decode_bytes_read() + small.decode_bytes_read()


def test_restore_undoes_appends_even_past_a_reallocation():
    layer, keys, values, gen = make_layer(1, 1, 2, 37, 16, 8, 16)
    query = torch.randn(1, 2, 1, 16, generator=gen)
    state = layer.snapshot()
    bounds = layer.paged.page_min.clone(), layer.paged.page_max.clone()
    capacity = layer.paged.capacity
    for _ in range(3):  # 3 x 120 tokens: past the room left, so the buffer is reallocated
        layer.update(torch.randn(1, 2, 120, 16, generator=gen), torch.randn(1, 2, 120, 16, generator=gen))
    assert layer.paged.capacity > capacity
    layer.restore(state)
    assert layer.get_seq_length() == 37 and layer.paged.lengths.tolist() == [37]
    assert torch.equal(layer.paged.page_min, bounds[0]) and torch.equal(layer.paged.page_max, bounds[1])
    k_new = torch.randn(1, 2, 1, 16, generator=gen)
    view, _ = layer.update(k_new, k_new)
    expected = quest_f64(query, torch.cat([keys, k_new], 2), torch.cat([values, k_new], 2), 8, 2, 1, 0.25)
    torch.testing.assert_close(view.attend(query)[:, 0].double(), expected, atol=2e-5, rtol=2e-5)


def test_crop_recomputes_the_open_page():
    layer, keys, _, _ = make_layer(2, 1, 1, 30, 8, 8, 16)
    layer.crop(-7)
    assert layer.get_seq_length() == 23
    assert torch.equal(layer.paged.page_max[0, 0, 2], keys[0, 0, 16:23].amax(0))
    assert torch.isinf(layer.paged.page_max[0, 0, 3]).all()
    with pytest.raises(ValueError, match="unpadded"):
        layer.update(keys[:, :, :1], keys[:, :, :1], new_token_lengths=torch.tensor([1]))


def test_batch_selection_keeps_each_sequence():
    layer, keys, _, _ = make_layer(3, 3, 1, 20, 8, 4, 8)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.dense_keys_values()[0], keys[[2, 0]])
    assert layer.paged.lengths.tolist() == [20, 20]


def test_the_buffer_grows_by_an_eighth_not_by_doubling():
    layer, _, _, gen = make_layer(4, 1, 1, 4000, 8, 16, 64)
    assert layer.paged.capacity == 4000 + 256  # room for 256 generated tokens before any reallocation
    layer.update(torch.randn(1, 1, 256, 8, generator=gen), torch.randn(1, 1, 256, 8, generator=gen))
    assert layer.paged.capacity == 4256
    layer.update(torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen))
    assert layer.paged.capacity == 4256 + 4256 // 8 + 16 - (4256 + 4256 // 8) % 16  # whole pages
    assert layer.get_seq_length() == 4257
