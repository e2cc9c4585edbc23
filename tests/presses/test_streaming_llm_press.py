"""StreamingLLMPress: sinks plus the most recent tokens, exact budgets, and the sink budget check."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers as _full_layers
from tests.presses.press_harness import kept_positions as _kept_positions
from tests.presses.press_harness import prefill as _prefill

RATIOS = [0.0, 0.25, 0.5, 0.9]


def _dense(model, ids) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return cache


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_holds_exact_budget(arch, ratio, batch):
    model = tiny_model(arch)
    n = 50  # 0.9 keeps 5 tokens: the 4 sinks and 1 recent
    cache = _prefill(model, StreamingLLMPress(ratio), random_ids(n, batch, seed=batch))
    for i in _full_layers(model):
        assert cache.layers[i].keys.shape[-2] == cache.layers[i].values.shape[-2] == round(n * (1 - ratio))


@pytest.mark.parametrize(
    "n, batch, n_sink, budget",
    [
        (50, 1, 4, {"compression_ratio": 0.5}),
        (37, 3, 0, {"compression_ratio": 0.7}),
        (37, 2, 1, {"compression_ratio": 0.25}),
        (29, 2, 7, {"target_size": 7}),
        (64, 1, 3, {"target_size": 10}),
    ],
)
def test_keeps_sinks_and_most_recent_positions(arch, n, batch, n_sink, budget):
    model = tiny_model(arch)
    ids = random_ids(n, batch, seed=n)
    ref, cache = _dense(model, ids), _prefill(model, StreamingLLMPress(n_sink=n_sink, **budget), ids)
    k = budget.get("target_size") or round(n * (1 - budget["compression_ratio"]))
    # Reference selection written out: positions 0..n_sink-1, then the last k - n_sink positions.
    positions = list(range(n_sink)) + list(range(n - (k - n_sink), n))
    expected = torch.tensor(positions).expand(batch, 2, k)
    for i in _full_layers(model):
        got = _kept_positions(cache.layers[i].keys, ref.layers[i].keys)
        assert torch.equal(got, expected)
        order = (cache.layers[i].keys[:, :, :, None] == ref.layers[i].keys[:, :, None]).all(-1).float().argmax(-1)
        full_v = ref.layers[i].values
        assert torch.equal(cache.layers[i].values, full_v.gather(2, order[..., None].expand_as(cache.layers[i].values)))


def test_score_ranks_sinks_then_recency():
    press = StreamingLLMPress(0.5, n_sink=2)
    keys = torch.randn(3, 2, 9, 4)
    scores = press.score(None, None, keys, keys, None, {})
    assert scores.shape == (3, 2, 9)
    order = scores.argsort(-1, descending=True)
    assert torch.equal(order, torch.tensor([1, 0, 8, 7, 6, 5, 4, 3, 2]).expand(3, 2, 9))


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref, cache = _dense(model, ids), _prefill(model, StreamingLLMPress(0.0), ids)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_budget_smaller_than_sinks_raises():
    model = tiny_model("llama")
    press = StreamingLLMPress(0.9)
    press.score = None  # never reached: the check comes first
    # 20 tokens at ratio 0.9 keep 2 < 4 sinks.
    with pytest.raises(ValueError, match=r"n_sink=4 exceeds the 2 tokens kept out of 20"):
        _prefill(model, press, random_ids(20))


@pytest.mark.parametrize("press, n", [(StreamingLLMPress(0.0, n_sink=8), 5), (StreamingLLMPress(target_size=6), 6)])
def test_short_context_left_whole_without_error(press, n):
    model = tiny_model("qwen3")
    cache = _prefill(model, press, random_ids(n))
    assert all(layer.keys.shape[-2] == n for layer in cache.layers)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", None])
def test_bad_n_sink_names_parameter(bad):
    with pytest.raises(ValueError, match="n_sink must be a non-negative int"):
        StreamingLLMPress(0.5, n_sink=bad)
