"""HeadKVPress: budgets from head importance against the paper's formula, per-head selection, score files."""

from __future__ import annotations

import json

import pytest
import torch

from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.head_importance import importance_table, write_head_scores
from kvpress.presses.headkv_press import HeadKVPress, headkv_budgets
from kvpress.visualization import record_compression
from tests.conftest import random_ids, tiny_model
from tests.fixtures_pipeline import random_text, text_pipeline


def random_scores(layers: int, heads: int, seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{layer}-{h}": torch.rand(3, generator=g).mul(h + 1).tolist() for layer in range(layers) for h in range(heads)
    }


@pytest.mark.parametrize(("layers", "heads"), [(1, 4), (4, 2), (30, 3)])
@pytest.mark.parametrize("beta", [1.01, 1.5, 5.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_budgets_follow_the_papers_formula_when_no_head_is_full(layers, heads, beta, temperature):
    g = torch.Generator().manual_seed(layers * heads)
    importance = torch.rand(layers, heads, generator=g, dtype=torch.float64)
    average, cap = 40, 10**6
    budgets = headkv_budgets(importance, average, cap, beta, temperature)
    p = importance**temperature / (importance**temperature).sum()
    total = layers * heads * average
    exact = average - average / beta + p * total / beta  # min_num + p * pool
    assert int(budgets.sum()) == total
    assert bool(((budgets - exact).abs() < 1).all())


@pytest.mark.parametrize("seed", range(5))
def test_budgets_respect_the_cap_and_spend_the_total(seed):
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(6, 4, generator=g, dtype=torch.float64) ** 6  # a few heads dominate
    average, cap = 30, 50
    budgets = headkv_budgets(importance, average, cap, 1.01, 1.0)
    assert int(budgets.sum()) == 6 * 4 * average and int(budgets.max()) <= cap and int(budgets.min()) >= 0
    # More important heads never get fewer tokens.
    order = importance.flatten().argsort()
    assert bool((budgets.flatten()[order].diff() >= 0).all())


def test_uniform_importance_gives_uniform_budgets():
    budgets = headkv_budgets(torch.ones(5, 3, dtype=torch.float64), 17, 100, 1.01, 1.0)
    assert torch.equal(budgets, torch.full((5, 3), 17))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_heads_keep_window_plus_budget_of_their_best_tokens(kv_heads):
    model = tiny_model("llama", kv_heads=kv_heads)
    layers, q_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    n, window, ratio, batch = 70, 4, 0.6, 2
    press = HeadKVPress(ratio, window_size=window, scores=random_scores(layers, q_heads, seed=kv_heads))
    report, cache = record_compression(model, press, random_ids(n, batch, seed=kv_heads))
    assert isinstance(cache, VarlenCache)
    k = round(n * (1 - ratio))
    expected = press.head_budgets(n, model.config)
    total = 0
    for layer in report.compressed_layers:
        lengths = report.kept_lengths[layer]
        assert torch.equal(lengths, expected[layer].expand(batch, kv_heads))
        total += int(lengths[0].sum())
        kept = report.kept_mask(layer)
        assert bool(kept[..., n - window :].all())
        past = report.scores[layer][..., : n - window]
        lowest_kept = past.masked_fill(~kept[..., : n - window], float("inf")).amin(-1)
        highest_dropped = past.masked_fill(kept[..., : n - window], float("-inf")).amax(-1)
        assert bool((lowest_kept >= highest_dropped).all())
    assert total == len(report.compressed_layers) * kv_heads * k  # the global budget is spent exactly
    # A kv head's importance is the mean of its query heads'.
    table = importance_table(press.scores).view(layers, kv_heads, -1).mean(-1)
    flat_budget = torch.stack([expected[i] for i in range(layers)]).flatten()
    assert bool((flat_budget[table.flatten().argsort()].diff() >= 0).all())


def test_pipeline_answers_from_head_variable_cache(tmp_path):
    pipe = text_pipeline()
    config = pipe.model.config
    path = tmp_path / "scores.json"
    write_head_scores(path, random_scores(config.num_hidden_layers, config.num_attention_heads), model="tiny")
    press = HeadKVPress(0.5, scores=str(path))
    out = pipe(random_text(60), question="What?", press=press, max_new_tokens=4, return_report=True)
    assert isinstance(out["answer"], str)
    assert 0.45 < out["report"].memory_ratio < 0.55  # the head-variable cache really holds half the bytes


def test_score_files_name_their_problem(tmp_path):
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'scores'"):
        HeadKVPress(0.5)
    with pytest.raises(ValueError, match="scores is required"):
        HeadKVPress(0.5, scores=None)
    with pytest.raises(ValueError, match="does not exist; write one with `python -m kvpress.head_scores"):
        HeadKVPress(0.5, scores=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        HeadKVPress(0.5, scores=str(bad))
    with pytest.raises(ValueError, match="lacks 1 of its 2x2 heads"):
        HeadKVPress(0.5, scores={"0-0": [1.0], "0-1": [1.0], "1-0": [2.0]})
    with pytest.raises(ValueError, match="key 'a-b' is not 'layer-head'"):
        HeadKVPress(0.5, scores={"a-b": [1.0]})
    with pytest.raises(ValueError, match="beta must be a number > 1"):
        HeadKVPress(0.5, scores={"0-0": [1.0]}, beta=1)
    model = tiny_model("llama")
    press = HeadKVPress(0.5, scores={"0-0": [1.0]})
    with pytest.raises(ValueError, match="scores cover 1 layers x 1 heads, but the model has"):
        record_compression(model, press, random_ids(20, 1))


def test_published_mapping_and_our_file_read_alike(tmp_path):
    scores = random_scores(2, 3)
    path = tmp_path / "s.json"
    write_head_scores(path, scores, model="m", seed=0)
    assert json.loads(path.read_text())["format"] == "kvpress-head-scores"
    torch.testing.assert_close(importance_table(str(path)), importance_table(scores))
    expected = torch.tensor(
        [[sum(scores[f"{layer}-{h}"]) / 3 for h in range(3)] for layer in range(2)], dtype=torch.float64
    )
    torch.testing.assert_close(importance_table(scores), expected)


def test_budget_smaller_than_the_window_keeps_the_latest_tokens():
    model = tiny_model("llama", kv_heads=2)
    layers, q_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    press = HeadKVPress(target_size=3, window_size=8, scores=random_scores(layers, q_heads))
    n = 30
    report, _ = record_compression(model, press, random_ids(n, 1, seed=5))
    for layer in report.compressed_layers:
        assert torch.equal(report.kept_indices[layer].sort(-1).values, torch.arange(n - 3, n).expand(1, 2, 3))
