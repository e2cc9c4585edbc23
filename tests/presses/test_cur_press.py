"""CURPress: leverage of the sketched keys and values against a float64 solve, sinks kept first, chunked prefill."""

import math

import pytest
import torch
from transformers import DynamicCache

from kvpress.generation import prefill as generation_prefill
from kvpress.presses.cur_press import CURPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, record_scores


def leverage_f64(x: torch.Tensor, sketch_dimension: int, seed: int) -> torch.Tensor:
    x = x.double()
    d = x.shape[-1]
    if sketch_dimension < d:
        gen = torch.Generator().manual_seed(seed)
        x = x @ (torch.randn(d, sketch_dimension, generator=gen) / math.sqrt(sketch_dimension)).double()
    solved = torch.linalg.solve(x.transpose(-1, -2) @ x, x.transpose(-1, -2))
    return (x * solved.transpose(-1, -2)).sum(-1)


@pytest.mark.parametrize("kind", ["kv_product", "key", "value"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize(("batch", "n", "sketch", "ratio"), [(1, 40, 48, 0.5), (2, 57, 8, 0.3)])
def test_scores_match_the_float64_reference(arch, kind, kv_heads, batch, n, sketch, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = CURPress(ratio, num_sinks=2, leverage_type=kind, sketch_dimension=sketch, seed=3)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n + 7))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        want = {"key": 1.0, "value": 1.0, "kv_product": 1.0}[kind]
        if kind in ("key", "kv_product"):
            want = want * leverage_f64(rec.keys, sketch, 3)
        if kind in ("value", "kv_product"):
            want = want * leverage_f64(rec.values, sketch, 3)
        torch.testing.assert_close(rec.scores.double()[..., 2:], want[..., 2:], rtol=2e-3, atol=1e-4)
        want[..., :2] = torch.inf
        assert_keeps_top(cache.layers[i].keys, rec.keys, want, tol=1e-3)


def test_chunked_prefill_ends_at_the_budget_and_bad_arguments_are_named():
    model = tiny_model("mistral")
    cache = DynamicCache(config=model.config)
    generation_prefill(model, random_ids(64, 2, seed=1), cache, CURPress(0.75), chunk_size=20)
    assert all(layer.keys.shape[2] == 16 for layer in cache.layers)
    with pytest.raises(ValueError, match="leverage_type must be one of key, value, kv_product, got 'keys'"):
        CURPress(0.5, leverage_type="keys")
