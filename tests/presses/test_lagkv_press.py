"""LagKVPress: each partition normalised by the next one's channel range, softmax of the channel spread per partition
(float64 loops), sinks and the unreferenced tail kept first."""

import pytest
import torch

from kvpress.presses.lagkv_press import LagKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, record_scores


def reference(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag: int) -> torch.Tensor:
    """Scores of the tokens that have a lag reference, NaN elsewhere (float64, one partition at a time)."""
    b, h, n, d = keys.shape
    out = torch.full((b, h, n), float("nan"), dtype=torch.float64)
    n_parts = (n - n_sink) // lag
    for p in range(n_parts - 1):
        cur = slice(n_sink + p * lag, n_sink + (p + 1) * lag)
        ref = slice(n_sink + (p + 1) * lag, n_sink + (p + 2) * lag)
        total = 0
        for x in (keys.double(), values.double()):
            low, high = x[:, :, ref].min(dim=2, keepdim=True).values, x[:, :, ref].max(dim=2, keepdim=True).values
            normed = (x[:, :, cur] - low) / (high - low)
            spread = ((normed - normed.mean(-1, keepdim=True)) ** 2).sum(-1).div(d - 1).sqrt()
            total = total + torch.exp(spread) / torch.exp(spread).sum(-1, keepdim=True)
        out[:, :, cur] = total
    return out


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize(("batch", "n", "lag", "ratio"), [(1, 45, 8, 0.5), (2, 70, 12, 0.4), (3, 33, 5, 0.6)])
def test_scores_match_the_float64_reference(arch, kv_heads, batch, n, lag, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = LagKVPress(ratio, n_sink=3, lag_size=lag)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n))
    assert sorted(seen) == full_layers(model)
    n_parts = (n - 3) // lag
    protected = 3 + (n - 3 - (n_parts - 1) * lag)  # sinks, the last partition, the remainder
    k = round(n * (1 - ratio))
    assert k >= protected
    for i, rec in seen.items():
        want = reference(rec.keys, rec.values, 3, lag)
        scored = ~want.isnan()
        torch.testing.assert_close(rec.scores.double()[scored], want[scored], rtol=1e-5, atol=1e-6)
        assert int(scored[0, 0].sum()) == n - protected
        # Protected tokens outrank every score, so they are kept; the rest go to the top references.
        ranked = torch.where(scored, want, torch.inf)
        assert_keeps_top(cache.layers[i].keys, rec.keys, ranked, tol=1e-6)


def test_a_tight_budget_keeps_the_sinks_then_the_most_recent():
    model = tiny_model("llama")
    press = LagKVPress(0.9, n_sink=2, lag_size=8)
    seen = record_scores(press)
    n = 40  # 2 sinks, 4 partitions of 8 (3 scored), 6 left over: 16 protected, 4 kept
    cache = prefill(model, press, random_ids(n, 1, seed=4))
    for i, rec in seen.items():
        kept = (cache.layers[i].keys[:, :, :, None] == rec.keys[:, :, None]).all(-1).any(2)[0, 0]
        assert kept.nonzero().flatten().tolist() == [0, 1, 38, 39]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lag_size must be an int >= 2, got 1"):
        LagKVPress(0.5, lag_size=1)
    with pytest.raises(ValueError, match="n_sink must be an int >= 0"):
        LagKVPress(0.5, n_sink=-1)
