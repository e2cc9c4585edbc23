"""ObservedAttentionPress: column sums of the model's own eager attention weights, and the eager-only check."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers as _full_layers
from tests.presses.press_harness import kept_positions as _kept_positions
from tests.presses.press_harness import record_scores as _record

RATIOS = [0.0, 0.25, 0.5, 0.9]


@functools.lru_cache(maxsize=None)
def _llama(n_kv: int, n_q: int = 4):
    """A tiny eager Llama with ``n_q`` query heads and ``n_kv`` kv heads (GQA ratio ``n_q // n_kv``)."""
    torch.manual_seed(n_kv)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=n_q, num_key_value_heads=n_kv,
        head_dim=16, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def _prefill(model, press, ids, **kwargs):
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        out = model.model(input_ids=ids, **cache_kwargs(model.model, cache), **kwargs)
    return cache, out


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_holds_exact_budget(arch, ratio, batch):
    model = tiny_model(arch, "eager")
    n = 37
    cache, _ = _prefill(model, ObservedAttentionPress(ratio), random_ids(n, batch, seed=batch))
    for i in _full_layers(model):
        assert cache.layers[i].keys.shape[-2] == cache.layers[i].values.shape[-2] == round(n * (1 - ratio))


def _check_against_attention_weights(model, ids, ratio, recent_ratio):
    n_q, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    batch, n = ids.shape
    press = ObservedAttentionPress(ratio, recent_ratio=recent_ratio)
    seen = _record(press)
    cache, out = _prefill(model, press, ids, output_attentions=True)
    assert sorted(seen) == _full_layers(model)
    k = round(n * (1 - ratio))
    for i, rec in seen.items():
        # Reference: attention each key received from every query row, averaged over the query heads of its group.
        weights = out.attentions[i].double()  # (batch, heads, n, n), the model's own eager softmax
        ref = weights.sum(dim=2).view(batch, n_kv, n_q // n_kv, n).mean(dim=2)
        # The heavy hitters share the budget with the most recent tokens, kept whole.
        recent = round(recent_ratio * k)
        torch.testing.assert_close(rec.scores[..., : n - recent].double(), ref[..., : n - recent], rtol=1e-5, atol=1e-6)
        assert bool(rec.scores[..., n - recent :].isposinf().all())
        heavy = ref[..., : n - recent].topk(k - recent, dim=-1).indices
        expected = torch.cat([heavy, torch.arange(n - recent, n).expand(batch, n_kv, recent)], -1).sort(-1).values
        assert torch.equal(_kept_positions(cache.layers[i].keys, rec.keys), expected)


@pytest.mark.parametrize("recent_ratio", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("batch, n, ratio", [(1, 24, 0.5), (3, 31, 0.25)])
def test_heavy_hitters_are_column_sums_of_eager_attention_beside_recent_tokens(arch, batch, n, ratio, recent_ratio):
    _check_against_attention_weights(tiny_model(arch, "eager"), random_ids(n, batch, seed=n), ratio, recent_ratio)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_ratios(n_kv):
    _check_against_attention_weights(_llama(n_kv), random_ids(29, 2, seed=n_kv), 0.6, 0.5)


def test_recent_tokens_take_half_the_budget_by_default():
    assert ObservedAttentionPress().recent_ratio == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_bad_recent_ratio_is_named(bad):
    with pytest.raises(ValueError, match="recent_ratio must be a number in \\[0, 1\\]"):
        ObservedAttentionPress(0.5, recent_ratio=bad)


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch, "eager")
    ids = random_ids(25, batch=2)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
    cache, _ = _prefill(model, ObservedAttentionPress(0.0), ids)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_declares_attention_weights():
    assert ObservedAttentionPress().capabilities.needs_attention_weights


def test_non_eager_model_rejected_before_any_tensor_then_generates_normally():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(12)
    with torch.no_grad():
        before = model.generate(ids, max_new_tokens=6, do_sample=False)
    hooks = sum(len(m._forward_hooks) for m in attention_layers(model))
    entered = False
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*accepted: 'eager'"):
        with ObservedAttentionPress(0.5)(model):
            entered = True
    assert not entered
    assert sum(len(m._forward_hooks) for m in attention_layers(model)) == hooks
    with torch.no_grad():
        after = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after) and after.shape[1] > ids.shape[1]


def test_missing_weights_in_score_raise():
    module = attention_layers(tiny_model("llama", "eager"))[0]
    keys = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="no attention weights from layer 0"):
        ObservedAttentionPress(0.5).score(module, None, keys, keys, None, {})
