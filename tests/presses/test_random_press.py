"""RandomPress: exact budgets, seeded generator draws, determinism, and a global RNG left alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.random_press import RandomPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers as _full_layers
from tests.presses.press_harness import kept_positions as _kept_positions
from tests.presses.press_harness import prefill as _prefill
from tests.presses.press_harness import record_scores as _record

RATIOS = [0.0, 0.25, 0.5, 0.9]


def _assert_kept(layer, rec, expected: torch.Tensor) -> None:
    """The layer holds exactly the keys at ``expected`` positions, each with its own value row."""
    idx = _kept_positions(layer.keys, rec.keys)
    assert torch.equal(idx, expected)
    # Values of repeated tokens can coincide, so they are matched through the keys' positions.
    order = (layer.keys[:, :, :, None] == rec.keys[:, :, None]).all(-1).float().argmax(-1)
    assert torch.equal(layer.values, rec.values.gather(2, order[..., None].expand_as(layer.values)))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_holds_exact_budget(arch, ratio, batch):
    model = tiny_model(arch)
    n = 37
    cache = _prefill(model, RandomPress(ratio, seed=batch), random_ids(n, batch, seed=batch))
    for i in _full_layers(model):
        assert cache.layers[i].keys.shape == (batch, 2, round(n * (1 - ratio)), 16)
        assert cache.layers[i].values.shape[-2] == round(n * (1 - ratio))


@pytest.mark.parametrize("seed", [0, 7, 123456789])
@pytest.mark.parametrize("batch, n, ratio", [(1, 20, 0.5), (2, 33, 0.25), (3, 41, 0.9)])
def test_scores_are_seeded_uniform_draws_and_top_ones_are_kept(seed, batch, n, ratio):
    model = tiny_model("qwen2")
    press = RandomPress(ratio, seed=seed)
    seen = _record(press)
    cache = _prefill(model, press, random_ids(n, batch, seed=seed % 97))
    k = round(n * (1 - ratio))
    assert sorted(seen) == _full_layers(model)
    for i, rec in seen.items():
        # Reference: a private CPU generator seeded with seed + layer index, one uniform draw per (row, head, token).
        ref = torch.rand((batch, 2, n), generator=torch.Generator().manual_seed(seed + i))
        assert torch.equal(rec.scores, ref)
        expected = ref.topk(k, dim=-1).indices.sort(-1).values
        _assert_kept(cache.layers[i], rec, expected)


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = tiny_model("mistral")
    ids = random_ids(40, 2)
    a, b = _prefill(model, RandomPress(0.5, seed=3), ids), _prefill(model, RandomPress(0.5, seed=3), ids)
    c = _prefill(model, RandomPress(0.5, seed=4), ids)
    assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))
    assert not all(torch.equal(x.keys, z.keys) for x, z in zip(a.layers, c.layers))
    # Layers draw from differently seeded generators, so they do not all keep the same positions.
    seen = _record(press := RandomPress(0.5, seed=3))
    _prefill(model, press, ids)
    assert not torch.equal(seen[0].scores, seen[1].scores)


@pytest.mark.parametrize("seed", [None, 5])
def test_global_rng_untouched(seed):
    model = tiny_model("llama")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    _prefill(model, RandomPress(0.5, seed=seed), random_ids(30, 2))
    assert torch.equal(torch.get_rng_state(), state)


def test_no_seed_draws_fresh_scores_each_call():
    model = tiny_model("llama")
    press = RandomPress(0.5)
    seen = _record(press)
    ids = random_ids(40)
    _prefill(model, press, ids)
    first = seen[0].scores
    _prefill(model, press, ids)
    assert not torch.equal(first, seen[0].scores)
    assert 0 <= first.min() and first.max() < 1


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
    cache = _prefill(model, RandomPress(0.0, seed=0), ids)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("bad", ["1", 1.5, True, [1]])
def test_bad_seed_names_parameter(bad):
    with pytest.raises(ValueError, match="seed must be an int or None"):
        RandomPress(0.5, seed=bad)


def test_budget_validation_inherited():
    with pytest.raises(ValueError, match="compression_ratio"):
        RandomPress(1.0)
    with pytest.raises(ValueError, match="target_size"):
        RandomPress(target_size=0)
