"""ScorerPress: exact budgets and top-k selection against a plain-torch reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.scorer_press import ScorerPress, gather_tokens
from tests.conftest import random_ids, tiny_model


@dataclass
class FixedScorePress(ScorerPress):
    """Scores drawn from a seeded generator and remembered, so the test can recompute the selection."""

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.seen: dict[int, tuple] = {}

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        g = torch.Generator().manual_seed(self.seed + module.layer_idx)
        scores = torch.rand(keys.shape[:3], generator=g)
        self.seen[module.layer_idx] = (keys.clone(), values.clone(), scores)
        return scores


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.77])
@pytest.mark.parametrize("batch", [1, 3])
def test_keeps_exactly_the_top_scored_tokens(arch, ratio, batch):
    model = tiny_model(arch)
    n = 37
    press = FixedScorePress(compression_ratio=ratio, seed=batch)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) as report:
        model.model(input_ids=random_ids(n, batch), **cache_kwargs(model.model, cache))
    expected_len = round(n * (1 - ratio))
    assert report.compressed_layers == sorted(press.seen) if ratio > 0 else True
    for layer_idx, (keys, values, scores) in press.seen.items():
        # Reference: for each (batch, head), the set of indices of the expected_len largest scores.
        order = torch.argsort(scores, dim=-1, descending=True)[..., :expected_len]
        ref_k = torch.stack([torch.stack([keys[b, h, order[b, h]] for h in range(keys.shape[1])]) for b in range(batch)])
        ref_v = torch.stack(
            [torch.stack([values[b, h, order[b, h]] for h in range(values.shape[1])]) for b in range(batch)]
        )
        layer = cache.layers[layer_idx]
        assert layer.keys.shape[-2] == expected_len
        # Compare as sets of rows (top-k order is not part of the contract).
        for b in range(batch):
            for h in range(keys.shape[1]):
                got = {tuple(r.tolist()) for r in layer.keys[b, h]}
                assert got == {tuple(r.tolist()) for r in ref_k[b, h]}
                got_v = {tuple(r.tolist()) for r in layer.values[b, h]}
                assert got_v == {tuple(r.tolist()) for r in ref_v[b, h]}
        assert report.kept_lengths[layer_idx].eq(expected_len).all()


def test_target_size_keeps_absolute_count():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), FixedScorePress(target_size=11)(model) as report:
        model.model(input_ids=random_ids(40), **cache_kwargs(model.model, cache))
    assert all(layer.keys.shape[-2] == 11 for layer in cache.layers)
    assert report.compression_ratio == pytest.approx(1 - 11 / 40)


def test_target_size_larger_than_context_keeps_everything():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), FixedScorePress(target_size=100)(model):
        model.model(input_ids=random_ids(40), **cache_kwargs(model.model, cache))
    assert all(layer.keys.shape[-2] == 40 for layer in cache.layers)


def test_gather_tokens_matches_indexing():
    x = torch.randn(2, 3, 10, 4)
    idx = torch.randint(0, 10, (2, 3, 5))
    ref = torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(gather_tokens(x, idx), ref)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_ratio_names_parameter(bad):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        FixedScorePress(compression_ratio=bad)


@pytest.mark.parametrize("kwargs", [{"target_size": 0}, {"target_size": -3}, {"target_size": 2.5}])
def test_bad_target_size(kwargs):
    with pytest.raises(ValueError, match="target_size must be a positive int"):
        FixedScorePress(**kwargs)


def test_ratio_and_target_size_together_rejected():
    with pytest.raises(ValueError, match="either compression_ratio or target_size"):
        FixedScorePress(compression_ratio=0.5, target_size=10)
