"""SnapKVPress: window scores, pooling and GQA group reduction against a float64 reference; its validation."""

from __future__ import annotations

import pytest
import torch

from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.visualization import record_compression
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import dense_prefill, snapkv_reference


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 5, 7])
@pytest.mark.parametrize("group_reduction", ["mean", "max"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_scores_and_selection_match_reference(kernel, pooling, group_reduction, kv_heads):
    torch.manual_seed(kernel + kv_heads)
    model = tiny_model("llama", kv_heads=kv_heads)
    n, window, batch = int(torch.randint(20, 50, ())), int(torch.randint(1, 9, ())), 2
    ids = random_ids(n, batch, seed=kernel * 10 + kv_heads)
    press = SnapKVPress(0.5, window_size=window, kernel_size=kernel, pooling=pooling, group_reduction=group_reduction)
    report, _ = record_compression(model, press, ids)
    dense, records = dense_prefill(model, ids)
    for layer in report.compressed_layers:
        queries, scaling = records[layer]
        past = snapkv_reference(queries, scaling, dense[layer][0], window, kernel, pooling, group_reduction)
        scores = report.scores[layer]
        torch.testing.assert_close(scores[..., : n - window].double(), past, rtol=1e-4, atol=1e-6)
        assert bool(scores[..., n - window :].isinf().all())  # the window is always kept
        # Kept: the window and the k - window best past tokens (ties from pooling may go either way).
        kept = report.kept_mask(layer)
        assert bool(kept[..., n - window :].all()) and torch.equal(
            kept.sum(-1), torch.full((batch, kv_heads), round(n / 2))
        )
        lowest_kept = past.masked_fill(~kept[..., : n - window], float("inf")).amin(-1)
        highest_dropped = past.masked_fill(kept[..., : n - window], float("-inf")).amax(-1)
        assert bool((lowest_kept >= highest_dropped - 1e-6).all())


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize(("n", "window", "budget"), [(30, 8, 3), (30, 8, 7), (12, 12, 5), (41, 16, 1)])
def test_budget_smaller_than_the_window_keeps_its_latest_tokens(kv_heads, n, window, budget):
    model = tiny_model("llama", kv_heads=kv_heads)
    press = SnapKVPress(target_size=budget, window_size=window)
    report, _ = record_compression(model, press, random_ids(n, 2, seed=n + budget))
    for layer in report.compressed_layers:
        kept = report.kept_indices[layer]
        assert torch.equal(kept, torch.arange(n - budget, n).expand(2, kv_heads, budget))


def test_max_over_the_group_keeps_what_one_query_head_needs():
    # With max, a token that one query head of the group attends to outranks a token all heads ignore.
    model = tiny_model("llama", kv_heads=1)
    ids = random_ids(40, 1, seed=5)
    mean, _ = record_compression(model, SnapKVPress(0.5, window_size=4, kernel_size=1), ids)
    most, _ = record_compression(model, SnapKVPress(0.5, window_size=4, kernel_size=1, group_reduction="max"), ids)
    for layer in mean.compressed_layers:
        assert bool((most.scores[layer][..., :-4] >= mean.scores[layer][..., :-4] - 1e-6).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_size": 0}, "window_size must be a positive int"),
        ({"kernel_size": 4}, "kernel_size must be a positive odd int"),
        ({"pooling": "min"}, "pooling must be 'max' or 'avg'"),
        ({"group_reduction": "sum"}, "group_reduction must be 'mean' or 'max', got 'sum'"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnapKVPress(0.5, **kwargs)
