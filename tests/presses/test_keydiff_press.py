"""KeyDiffPress: scores are minus the cosine to the mean unit key (float64 reference), the most distinctive keys are
kept, and it compresses chunk by chunk."""

import pytest
import torch
from transformers import DynamicCache

from kvpress.generation import prefill as generation_prefill
from kvpress.presses.keydiff_press import KeyDiffPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, record_scores


def reference(keys: torch.Tensor) -> torch.Tensor:
    k = keys.double()
    unit = k / k.norm(dim=-1, keepdim=True)
    anchor = unit.mean(dim=2, keepdim=True)
    return -(k * anchor).sum(-1) / (k.norm(dim=-1) * anchor.norm(dim=-1))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("batch", "n", "ratio"), [(1, 23, 0.5), (3, 40, 0.25), (2, 57, 0.8)])
def test_scores_and_kept_tokens_match_the_float64_reference(arch, kv_heads, batch, n, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = KeyDiffPress(ratio)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n + kv_heads))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        want = reference(rec.keys)
        torch.testing.assert_close(rec.scores.double(), want, rtol=1e-5, atol=1e-5)
        assert cache.layers[i].keys.shape[2] == round(n * (1 - ratio))
        assert_keeps_top(cache.layers[i].keys, rec.keys, want, tol=1e-5)


def test_chunked_prefill_ends_at_the_budget_of_the_whole_prompt():
    model = tiny_model("qwen3")
    cache = DynamicCache(config=model.config)
    generation_prefill(model, random_ids(60, 2, seed=3), cache, KeyDiffPress(0.5), chunk_size=16)
    assert all(layer.keys.shape[2] == 30 for layer in cache.layers)
