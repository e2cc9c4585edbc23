"""NACLPress: proxy-token scores against a float64 reference, the best/random split, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from kvpress.presses.nacl_press import NACLPress
from kvpress.visualization import record_compression
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import dense_prefill, snapkv_reference


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("batch", "n", "proxy", "ratio"), [(1, 30, 4, 0.5), (2, 47, 8, 0.7), (3, 25, 1, 0.3)])
def test_proxy_scores_and_pure_selection_match_reference(kv_heads, batch, n, proxy, ratio):
    model = tiny_model("llama", kv_heads=kv_heads)
    ids = random_ids(n, batch, seed=n + kv_heads)
    report, _ = record_compression(model, NACLPress(ratio, proxy_size=proxy, random_ratio=0.0), ids)
    dense, records = dense_prefill(model, ids)
    k = round(n * (1 - ratio))
    for layer in report.compressed_layers:
        queries, scaling = records[layer]
        # Summed proxy attention, averaged over the group, no pooling: SnapKV's window score with kernel 1.
        past = snapkv_reference(queries, scaling, dense[layer][0], proxy, kernel=1)
        scores = report.scores[layer]
        torch.testing.assert_close(scores[..., : n - proxy].double(), past, rtol=1e-4, atol=1e-6)
        assert bool(scores[..., n - proxy :].isposinf().all())
        kept = report.kept_mask(layer)
        assert bool(kept[..., n - proxy :].all()) and torch.equal(kept.sum(-1), torch.full((batch, kv_heads), k))
        lowest_kept = past.masked_fill(~kept[..., : n - proxy], float("inf")).amin(-1)
        highest_dropped = past.masked_fill(kept[..., : n - proxy], float("-inf")).amax(-1)
        assert bool((lowest_kept >= highest_dropped - 1e-7).all())


@pytest.mark.parametrize("random_ratio", [0.25, 0.5, 1.0])
def test_budget_splits_into_proxies_best_and_sampled(random_ratio):
    model = tiny_model("llama", kv_heads=2)
    n, proxy, ratio, batch = 60, 6, 0.5, 2
    ids = random_ids(n, batch, seed=7)
    press = NACLPress(ratio, proxy_size=proxy, random_ratio=random_ratio, seed=3)
    report, _ = record_compression(model, press, ids)
    k = n // 2
    sampled = round(random_ratio * (k - proxy))
    for layer in report.compressed_layers:
        kept, scores = report.kept_mask(layer), report.scores[layer].double()
        assert torch.equal(kept.sum(-1), torch.full((batch, 2), k)) and bool(kept[..., n - proxy :].all())
        # The k - proxy - sampled best-scored past tokens are all kept; the sampled ones come from the rest.
        best = scores[..., : n - proxy].topk(k - proxy - sampled, dim=-1).indices
        assert bool(kept.gather(-1, best).all())
    again, _ = record_compression(model, press, ids)
    other, _ = record_compression(model, NACLPress(ratio, proxy_size=proxy, random_ratio=random_ratio, seed=4), ids)
    layers = report.compressed_layers
    assert all(torch.equal(report.kept_indices[i], again.kept_indices[i]) for i in layers)  # same seed, same tokens
    assert any(not torch.equal(report.kept_indices[i], other.kept_indices[i]) for i in layers)
    # Heads and layers draw their own samples.
    first = report.kept_indices[layers[0]]
    assert not torch.equal(first[:, 0], first[:, 1]) or not torch.equal(first, report.kept_indices[layers[1]])


def test_sampling_follows_softmax_of_scores():
    press = NACLPress(0.5, temperature=0.5)
    scores = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 0.0, 0.0]]]).expand(1, 1, 6).contiguous()
    taken = torch.tensor([[[0, 4]]])  # excluded from the draw
    counts = torch.zeros(6)
    trials = 4000
    for seed in range(trials):
        press.seed = seed
        counts[press._sample(scores, taken, 1, layer_idx=0).flatten()] += 1
    probs = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 0.0]) / 0.5, 0)
    expected = torch.zeros(6)
    expected[[1, 2, 3, 5]] = probs * trials
    assert counts[0] == counts[4] == 0
    # Binomial standard deviation is at most sqrt(trials) / 2 = 32; allow 4 of them.
    assert bool(((counts - expected).abs() <= 4 * 32).all()), (counts, expected)


def test_non_positive_temperature_samples_uniformly():
    press = NACLPress(0.5, temperature=0.0)
    scores = torch.tensor([[[100.0, 0.0, -100.0, 5.0]]])
    counts = torch.zeros(4)
    for seed in range(2000):
        press.seed = seed
        counts[press._sample(scores, torch.tensor([[[3]]]), 1, layer_idx=0).flatten()] += 1
    assert counts[3] == 0 and bool(((counts[:3] - 2000 / 3).abs() < 100).all()), counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proxy_size": 0}, "proxy_size must be a positive int"),
        ({"random_ratio": 1.5}, "random_ratio must be a number in \\[0, 1\\]"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"seed": None}, "seed must be an int"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NACLPress(0.5, **kwargs)


def test_proxy_longer_than_context_is_rejected_and_model_stays_usable():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="proxy_size=40 is larger than the context \\(20 tokens\\)"):
        record_compression(model, NACLPress(0.5, proxy_size=40), random_ids(20, 1))
    report, _ = record_compression(model, NACLPress(0.5, proxy_size=4), random_ids(20, 1))
    assert int(report.kept_lengths[report.compressed_layers[0]].max()) == 10
