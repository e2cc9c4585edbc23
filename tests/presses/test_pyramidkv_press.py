"""PyramidKVPress: exact mean budget, linear per-layer schedule, SnapKV selection, decoding from uneven layers."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress.presses.pyramidkv_press import PyramidKVPress, pyramid_budgets
from kvpress.utils import full_attention_layer_indices
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import (
    assert_decode_matches_reference,
    assert_hooks_removed_after_error,
    assert_pipeline_matches_plain_decoding,
    compressed_prefill,
    dense_prefill,
    gather,
    recover_indices,
    snapkv_reference,
)


def linear_schedule(average, cap, n_layers, beta):
    """Real-valued pyramid (float64): layer 0 highest, linear, mean ``average``, bottom ``average / beta``."""
    if n_layers == 1:
        return torch.tensor([float(average)], dtype=torch.float64)
    bottom = average / beta
    top = 2 * average - bottom
    if top > cap:
        top, bottom = cap, 2 * average - cap
    return torch.linspace(top, bottom, n_layers, dtype=torch.float64)


@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(1, 5000),
    frac=st.floats(0, 1),
    n_layers=st.integers(2, 80),
    beta=st.integers(1, 40),
)
def test_pyramid_budgets_exact_total_and_linear(cap, frac, n_layers, beta):
    average = round(frac * cap)
    budgets = pyramid_budgets(average, cap, n_layers, beta)
    exact = linear_schedule(average, cap, n_layers, beta)
    assert sum(budgets) == average * n_layers
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:]))  # never grows with depth
    assert max(budgets) <= cap and min(budgets) >= 0
    assert (torch.tensor(budgets, dtype=torch.float64) - exact).abs().max() < 1 + 1e-9


def test_pyramid_budgets_examples():
    # Top 2*120 - 6 = 234 down to 6 over 32 layers; the mean is exactly 120.
    budgets = pyramid_budgets(120, 10_000, 32, 20)
    assert budgets[0] == 234 and budgets[-1] == 6 and sum(budgets) == 120 * 32
    assert pyramid_budgets(20, 1000, 3, 20) == [39, 20, 1]
    # Capped: a layer holds at most 40 tokens, so the top is 40 and the bottom 2 * 30 - 40 = 20.
    assert pyramid_budgets(30, 40, 3, 20) == [40, 30, 20]
    assert pyramid_budgets(7, 9, 1, 20) == [7]
    assert pyramid_budgets(10, 50, 4, 1) == [10, 10, 10, 10]
    with pytest.raises(ValueError, match="average"):
        pyramid_budgets(11, 10, 3, 20)


def fake_module(layer_idx, n_layers, layer_types=None):
    config = SimpleNamespace(num_hidden_layers=n_layers, layer_types=layer_types)
    return SimpleNamespace(layer_idx=layer_idx, config=config)


@pytest.mark.parametrize("n_layers", [2, 5, 30])
@pytest.mark.parametrize("n", [40, 333, 4096])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_n_kept_mean_is_requested_budget(n_layers, n, ratio):
    press = PyramidKVPress(compression_ratio=ratio, window_size=8)
    average = round(n * (1 - ratio))
    kept = [press.n_kept(n, fake_module(i, n_layers)) for i in range(n_layers)]
    assert sum(kept) == average * n_layers
    if average > 8:
        assert all(8 <= k <= n for k in kept) and kept[0] > kept[-1]
    else:  # the window takes the whole budget: uniform
        assert kept == [average] * n_layers


def test_n_kept_target_size_and_sliding_layers():
    press = PyramidKVPress(target_size=50, window_size=4, beta=10)
    types = ["sliding_attention", "full_attention"] * 3
    assert full_attention_layer_indices(fake_module(0, 6, types).config) == [1, 3, 5]
    kept = {i: press.n_kept(200, fake_module(i, 6, types)) for i in range(6)}
    assert sum(kept[i] for i in (1, 3, 5)) == 150
    assert kept[1] > kept[3] > kept[5] == 4 + round(46 / 10)
    # A context shorter than the target is kept whole; a budget within the window is uniform.
    assert {press.n_kept(30, fake_module(i, 6, types)) for i in (1, 3, 5)} == {30}
    small = PyramidKVPress(target_size=3, window_size=4)
    assert {small.n_kept(100, fake_module(i, 4)) for i in range(4)} == {3}


@pytest.mark.parametrize("batch", [1, 2])
def test_kept_counts_and_selection_match_reference(arch, batch):
    model = tiny_model(arch)
    n, window, ratio = 48, 4, 0.6
    ids = random_ids(n, batch, seed=batch)
    press = PyramidKVPress(compression_ratio=ratio, window_size=window, kernel_size=1, beta=5)
    cache, report = compressed_prefill(model, press, ids)
    dense, records = dense_prefill(model, ids)
    layers = full_attention_layer_indices(model.config)
    assert report.compressed_layers == layers == sorted(dense)

    average = round(n * (1 - ratio))
    kept = [cache.layers[i].keys.shape[2] for i in layers]
    assert sum(kept) == average * len(layers)
    for i in layers:
        assert torch.equal(report.kept_lengths[i], torch.full((batch, 2), kept[layers.index(i)]))
    schedule = window + linear_schedule(average - window, n - window, len(layers), 5)
    assert (torch.tensor(kept, dtype=torch.float64) - schedule).abs().max() < 1
    if len(layers) > 1:
        assert kept[0] > kept[-1]

    for i in layers:
        keys, values = dense[i]
        queries, scaling = records[i]
        past = snapkv_reference(queries, scaling, keys, window, kernel=1)
        top = past.topk(kept[layers.index(i)] - window, dim=-1).indices
        expected = torch.cat([top, torch.arange(n - window, n).expand(batch, 2, window)], dim=-1).sort(-1).values
        got = recover_indices(keys, cache.layers[i].keys)
        assert torch.equal(got.sort(-1).values, expected)
        torch.testing.assert_close(cache.layers[i].keys, gather(keys, got), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, gather(values, got), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_after_uneven_layers(arch, batch):
    model = tiny_model(arch)
    n, q_len = 40, 5
    ids = random_ids(n + q_len, batch, seed=7 + batch)
    cache, report = compressed_prefill(model, PyramidKVPress(compression_ratio=0.5, window_size=4), ids[:, :n])
    if arch != "gemma3":  # Gemma3 compresses one full-attention layer only
        assert len({cache.layers[i].keys.shape[2] for i in report.compressed_layers}) > 1
    logits = assert_decode_matches_reference(model, cache, ids[:, n:], start=n)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, n:]
    assert not torch.allclose(logits, full, atol=1e-4)  # the compression did change the answer's logits


def test_pipeline_generates_from_uneven_layers():
    lengths = assert_pipeline_matches_plain_decoding(PyramidKVPress(compression_ratio=0.5, window_size=4))
    assert len(set(lengths)) == 3


def test_bad_parameters():
    with pytest.raises(ValueError, match="beta"):
        PyramidKVPress(compression_ratio=0.5, beta=0)
    with pytest.raises(ValueError, match="beta"):
        PyramidKVPress(compression_ratio=0.5, beta=2.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        PyramidKVPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="window_size"):
        PyramidKVPress(compression_ratio=0.5, window_size=0)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="window_size"):
        compressed_prefill(model, PyramidKVPress(compression_ratio=0.5, window_size=64), random_ids(20))


def test_hooks_removed_after_error():
    model = tiny_model("qwen3")
    assert_hooks_removed_after_error(model, PyramidKVPress(compression_ratio=0.5, window_size=4), random_ids(24))
