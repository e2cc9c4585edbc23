"""AdaKVPress: per-head budgets against a plain reference, the alpha safeguard beyond the kept-whole window."""

from __future__ import annotations

import math

import pytest
import torch

from kvpress.presses.adakv_press import AdaKVPress, head_budgets
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.visualization import record_compression
from tests.conftest import random_ids, tiny_model


def reference_budgets(scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Per-head counts, one sequence at a time: window (+inf) tokens, then the floor, then the best of the rest."""
    b, h, n = scores.shape
    counts = torch.zeros(b, h, dtype=torch.long)
    for s in range(b):
        candidates = []
        for head in range(h):
            row = scores[s, head].double()
            protected = min(int(row.isposinf().sum()), k)
            reserved = protected + math.floor(alpha * (k - protected))
            counts[s, head] = reserved
            ranked = row[~row.isposinf()].sort(descending=True).values.tolist()
            candidates += [(value, head) for value in ranked[reserved - protected :]]
        candidates.sort(key=lambda c: -c[0])
        for _, head in candidates[: h * k - int(counts[s].sum())]:
            counts[s, head] += 1
    return counts


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize(
    ("batch", "heads", "n", "window", "k"), [(1, 2, 40, 8, 12), (3, 4, 90, 32, 50), (2, 8, 30, 0, 9)]
)
def test_budgets_match_reference(alpha, batch, heads, n, window, k):
    g = torch.Generator().manual_seed(n + heads)
    # Heads with very different score scales, so the global ranking favours some of them.
    scores = torch.rand(batch, heads, n, generator=g) * torch.logspace(0, 3, heads)[:, None]
    scores[..., n - window :] = float("inf")
    counts = head_budgets(scores, k, alpha)
    assert torch.equal(counts, reference_budgets(scores, k, alpha))
    assert torch.equal(counts.sum(-1), torch.full((batch,), heads * k))


def test_safeguard_counts_beyond_the_window():
    # One head takes every ranked token it can; the others keep their window plus floor(alpha * (k - window)).
    heads, n, window, k, alpha = 4, 400, 32, 100, 0.2
    scores = torch.rand(1, heads, n)
    scores[:, 0] += 10
    scores[..., n - window :] = float("inf")
    counts = head_budgets(scores, k, alpha)
    floor = window + math.floor(alpha * (k - window))  # 45: the safeguard is not swallowed by the window
    assert counts[0, 1:].tolist() == [floor] * (heads - 1)
    assert int(counts[0, 0]) == heads * k - (heads - 1) * floor


def test_model_keeps_window_and_floor_in_every_head():
    model = tiny_model("llama", kv_heads=4)
    n, window, ratio, alpha = 80, 8, 0.75, 0.5
    press = AdaKVPress(SnapKVPress(ratio, window_size=window), alpha_safeguard=alpha)
    report, _ = record_compression(model, press, random_ids(n, 2, seed=3))
    k = round(n * (1 - ratio))
    for layer in report.compressed_layers:
        lengths = report.kept_lengths[layer]
        assert torch.equal(lengths.sum(-1), torch.full((2,), 4 * k))
        assert int(lengths.min()) >= window + math.floor(alpha * (k - window))
        kept = report.kept_mask(layer)
        assert bool(kept[..., n - window :].all())  # the window stays in every head
        # Each head keeps its own best scores.
        past = report.scores[layer][..., : n - window]
        lowest_kept = past.masked_fill(~kept[..., : n - window], float("inf")).amin(-1)
        highest_dropped = past.masked_fill(kept[..., : n - window], float("-inf")).amax(-1)
        assert bool((lowest_kept >= highest_dropped).all())


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.2", True])
def test_bad_alpha_is_named(bad):
    with pytest.raises(ValueError, match="alpha_safeguard must be a number in \\[0, 1\\]"):
        AdaKVPress(SnapKVPress(0.5), alpha_safeguard=bad)
