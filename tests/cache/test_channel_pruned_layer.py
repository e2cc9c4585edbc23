"""ChannelPrunedLayer: attention, storage and state against dense plain-torch references with zeroed key channels."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpress.cache.attention import kvpress_attention
from kvpress.cache.channel_pruned_layer import ChannelPrunedLayer
from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.layer_access import layer_memory_bytes, read_layer, restore_cache, snapshot_cache, write_layer


def random_layer(batch, kv_heads, n_ctx, n_full, d, d_kept, dtype=torch.float64, seed=0):
    """A layer built from random dense keys; returns ``(layer, dense_keys, keep_mask, values)``.

    ``keep_mask`` ``(batch, kv_heads, n_ctx + n_full, d)`` is True where the layer keeps a key entry: the kept channels
    of the context tokens and every channel of the full-width tokens.
    """
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, n_ctx + n_full, d, generator=g, dtype=dtype)
    values = torch.randn(batch, kv_heads, n_ctx + n_full, d, generator=g, dtype=dtype)
    # A different random channel subset for every (sequence, kv-head), stored in ascending order.
    channels = torch.rand(batch, kv_heads, d, generator=g).argsort(dim=-1)[..., :d_kept].sort(dim=-1).values
    keep = torch.zeros(batch, kv_heads, n_ctx + n_full, d, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            keep[b, h, :n_ctx, channels[b, h]] = True
    keep[:, :, n_ctx:] = True
    pruned = torch.stack(
        [torch.stack([keys[b, h, :n_ctx][:, channels[b, h]] for h in range(kv_heads)]) for b in range(batch)]
    )
    layer = ChannelPrunedLayer(pruned, channels, keys[:, :, n_ctx:], values)
    return layer, keys, keep, values


def dense_attention(query, keys, values, scaling, sliding_window=None):
    """Plain softmax attention of the last ``q_len`` tokens, GQA by explicit repetition, ``(B, q_len, Hq, d)``."""
    n_q, q_len = query.shape[1:3]
    group = n_q // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    kv_len = k.shape[-2]
    logits = query @ k.transpose(-1, -2) * scaling
    for i in range(q_len):
        pos = kv_len - q_len + i
        for j in range(kv_len):
            if j > pos or (sliding_window and pos - j >= sliding_window):
                logits[..., i, j] = float("-inf")
    return (logits.softmax(dim=-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_equals_dense_attention_with_zeroed_channels(group, batch, q_len):
    g = torch.Generator().manual_seed(100 * group + 10 * batch + q_len)
    kv_heads = 2
    d = 16
    n_ctx, n_full = (int(x) for x in torch.randint(3, 12, (2,), generator=g))
    d_kept = int(torch.randint(1, d, (1,), generator=g))
    layer, keys, keep, values = random_layer(batch, kv_heads, n_ctx, n_full, d, d_kept, seed=group + batch + q_len)
    new_k = torch.randn(batch, kv_heads, q_len, d, generator=g, dtype=torch.float64)
    new_v = torch.randn(batch, kv_heads, q_len, d, generator=g, dtype=torch.float64)
    query = torch.randn(batch, kv_heads * group, q_len, d, generator=g, dtype=torch.float64)

    k_view, v_view = layer.update(new_k, new_v)
    assert k_view is v_view
    got = kvpress_attention(None, query, k_view, v_view, None, scaling=0.3)[0]

    ref_keys = torch.cat([keys * keep, new_k], dim=-2)
    ref = dense_attention(query, ref_keys, torch.cat([values, new_v], dim=-2), 0.3)
    assert got.shape == (batch, q_len, kv_heads * group, d)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # The pruned channels matter: attention over the unpruned keys differs.
    unpruned = dense_attention(query, torch.cat([keys, new_k], dim=-2), torch.cat([values, new_v], dim=-2), 0.3)
    assert (got - unpruned).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_in_low_precision_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(7)
    layer, keys, keep, values = random_layer(2, 2, 20, 4, 32, 12, dtype=torch.float64, seed=3)
    low = ChannelPrunedLayer(layer.pruned_keys.to(dtype), layer.key_channels, layer.keys.to(dtype), values.to(dtype))
    new_k = torch.randn(2, 2, 3, 32, generator=g, dtype=torch.float64)
    new_v = torch.randn(2, 2, 3, 32, generator=g, dtype=torch.float64)
    query = torch.randn(2, 8, 3, 32, generator=g, dtype=torch.float64)
    view, _ = low.update(new_k.to(dtype), new_v.to(dtype))
    got = view.attend(query.to(dtype), scaling=32**-0.5)
    assert got.dtype == dtype
    ref_keys = torch.cat([(keys.to(dtype).double()) * keep, new_k.to(dtype).double()], dim=-2)
    ref_values = torch.cat([values.to(dtype).double(), new_v.to(dtype).double()], dim=-2)
    ref = dense_attention(query.to(dtype).double(), ref_keys, ref_values, 32**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_sliding_window_and_default_scaling():
    g = torch.Generator().manual_seed(11)
    layer, keys, keep, values = random_layer(1, 1, 9, 2, 8, 3, seed=5)
    new_k = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
    new_v = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
    query = torch.randn(1, 3, 4, 8, generator=g, dtype=torch.float64)
    view, _ = layer.update(new_k, new_v)
    got = view.attend(query, scaling=None, sliding_window=6)
    ref = dense_attention(query, torch.cat([keys * keep, new_k], -2), torch.cat([values, new_v], -2), 8**-0.5, 6)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_update_lengths_and_growth():
    layer, keys, keep, values = random_layer(2, 3, 10, 4, 16, 6)
    assert layer.get_seq_length() == 14 and layer.n_pruned == 10
    assert layer.get_mask_sizes(3) == (17, 0)
    new = torch.randn(2, 3, 3, 16, dtype=torch.float64)
    layer.update(new, new + 1)
    assert layer.get_seq_length() == 17 and layer.n_pruned == 10
    assert layer.keys.shape == (2, 3, 7, 16) and layer.values.shape == (2, 3, 17, 16)
    torch.testing.assert_close(layer.keys[:, :, 4:], new, rtol=0, atol=0)
    torch.testing.assert_close(layer.values[:, :, 14:], new + 1, rtol=0, atol=0)
    dense_k, dense_v = layer.dense_keys_values()
    torch.testing.assert_close(dense_k, torch.cat([keys * keep, new], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(dense_v, torch.cat([values, new + 1], dim=-2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 30, 4, 16, 8), (3, 4, 17, 0, 32, 20), (2, 1, 50, 7, 64, 38)])
def test_memory_bytes_counts_every_tensor_exactly(dtype, shape):
    batch, heads, n_ctx, n_full, d, d_kept = shape
    layer, _, _, _ = random_layer(batch, heads, n_ctx, n_full, d, d_kept, dtype=dtype)
    el = torch.empty(0, dtype=dtype).element_size()
    expected = batch * heads * ((n_ctx * d_kept + n_full * d + (n_ctx + n_full) * d) * el + d_kept * 8)
    assert layer.memory_bytes() == expected
    dense = 2 * batch * heads * (n_ctx + n_full) * d * el
    # Saved: the dropped channels of the context keys, minus the int64 channel indices.
    assert dense - layer.memory_bytes() == batch * heads * (n_ctx * (d - d_kept) * el - d_kept * 8)
    assert layer.memory_bytes() < dense
    cache = DynamicCache()
    cache.layers.append(layer)
    assert layer_memory_bytes(cache) == expected


def test_crop_removes_newest_tokens_first():
    layer, keys, keep, values = random_layer(2, 2, 8, 3, 8, 4)
    dense_k = keys * keep
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    layer.crop(0)
    assert layer.get_seq_length() == 11
    layer.crop(-2)  # inside the full-width part
    assert (layer.n_pruned, layer.keys.shape[-2]) == (8, 1)
    torch.testing.assert_close(layer.dense_keys_values()[0], dense_k[:, :, :9], rtol=0, atol=0)
    layer.crop(-4)  # the rest of the full-width part and 3 pruned tokens
    assert (layer.n_pruned, layer.keys.shape[-2], layer.get_seq_length()) == (5, 0, 5)
    k, v = layer.dense_keys_values()
    torch.testing.assert_close(k, dense_k[:, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(v, values[:, :, :5], rtol=0, atol=0)


def test_batch_operations_act_on_every_tensor():
    layer, keys, keep, values = random_layer(3, 2, 6, 2, 8, 5)
    dense_k = keys * keep
    layer.batch_select_indices(torch.tensor([2, 0]))
    k, v = layer.dense_keys_values()
    torch.testing.assert_close(k, dense_k[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(v, values[[2, 0]], rtol=0, atol=0)
    layer.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(layer.dense_keys_values()[0], dense_k[[0, 2]], rtol=0, atol=0)
    layer.batch_repeat_interleave(2)
    torch.testing.assert_close(layer.dense_keys_values()[0], dense_k[[0, 0, 2, 2]], rtol=0, atol=0)
    assert layer.memory_bytes() == 4 * 2 * ((6 * 5 + 2 * 8 + 8 * 8) * 8 + 5 * 8)


def test_snapshot_restore_round_trip():
    g = torch.Generator().manual_seed(2)
    layer, _, _, _ = random_layer(2, 2, 12, 3, 16, 9)
    query = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
    step = torch.randn(2, 2, 1, 16, generator=g, dtype=torch.float64)
    state = layer.snapshot()
    before_bytes = layer.memory_bytes()
    first = layer.update(step, step)[0].attend(query, scaling=0.25)
    for _ in range(4):
        layer.update(torch.randn(2, 2, 2, 16, generator=g, dtype=torch.float64), step.expand(2, 2, 2, 16))
    assert layer.get_seq_length() == 15 + 1 + 8
    layer.restore(state)
    assert layer.get_seq_length() == 15 and layer.memory_bytes() == before_bytes
    again = layer.update(step, step)[0].attend(query, scaling=0.25)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_restore_cache_reinstalls_replaced_layers():
    cache = DynamicCache()
    k = torch.randn(1, 2, 6, 8)
    cache.update(k, k + 1, 0)
    before = snapshot_cache(cache)
    dense_layer = cache.layers[0]
    channels = torch.tensor([[[0, 3, 5], [1, 2, 7]]])
    kv = CompressedKV(k[:, :, :4].gather(-1, channels[:, :, None].expand(1, 2, 4, 3)), k + 1, channels, k[:, :, 4:])
    write_layer(cache, 0, kv)
    pruned = cache.layers[0]
    assert isinstance(pruned, ChannelPrunedLayer) and pruned.get_seq_length() == 6
    assert dense_layer.keys is None  # the replaced layer dropped its dense tensors
    after = snapshot_cache(cache)
    cache.update(k, k, 0)
    restore_cache(cache, after)
    assert cache.layers[0] is pruned and cache.get_seq_length() == 6
    restore_cache(cache, before)
    assert cache.layers[0] is dense_layer
    torch.testing.assert_close(read_layer(cache, 0)[0], k, rtol=0, atol=0)
    torch.testing.assert_close(read_layer(cache, 0)[1], k + 1, rtol=0, atol=0)


def test_write_layer_refuses_layers_that_cannot_hold_pruned_keys():
    cache = DynamicCache()
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    k = torch.randn(1, 1, 3, 4)
    cache.update(k, k, 0)
    kv = CompressedKV(k[..., :2], k, torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="full-attention DynamicCache layer"):
        write_layer(cache, 0, kv)
    with pytest.raises(ValueError, match="key_channels"):
        CompressedKV(k, k, full_width_keys=k)


def test_constructor_rejects_inconsistent_shapes():
    k = torch.randn(1, 2, 5, 3)
    with pytest.raises(ValueError, match="key_channels"):
        ChannelPrunedLayer(k, torch.zeros(1, 2, 4, dtype=torch.long), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="values"):
        ChannelPrunedLayer(k, torch.zeros(1, 2, 3, dtype=torch.long), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="keys"):
        ChannelPrunedLayer(k, torch.zeros(1, 2, 3, dtype=torch.long), torch.randn(1, 2, 1, 6), torch.randn(1, 2, 6, 8))


def test_view_is_only_readable_through_the_kvpress_attention():
    layer, _, _, _ = random_layer(1, 1, 4, 1, 8, 4)
    view, _ = layer.update(torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64))
    with pytest.raises(AttributeError, match="compressed_attention"):
        _ = view.shape
