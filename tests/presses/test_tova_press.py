"""TOVAPress: the last query's attention averaged over all heads, against the model's own eager attention weights."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.tova_press import TOVAPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers as _full_layers
from tests.presses.press_harness import kept_positions as _kept_positions
from tests.presses.press_harness import prefill as _prefill
from tests.presses.press_harness import record_scores as _record

RATIOS = [0.0, 0.25, 0.5, 0.9]


@functools.lru_cache(maxsize=None)
def _llama(n_kv: int, attn: str, n_q: int = 4):
    """A tiny Llama with ``n_q`` query heads and ``n_kv`` kv heads; same weights for every ``attn``."""
    torch.manual_seed(n_kv)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=n_q, num_key_value_heads=n_kv,
        head_dim=16, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_holds_exact_budget(arch, attn, ratio, batch):
    model = tiny_model(arch, attn)
    n = 37
    cache = _prefill(model, TOVAPress(ratio), random_ids(n, batch, seed=batch))
    for i in _full_layers(model):
        assert cache.layers[i].keys.shape[-2] == cache.layers[i].values.shape[-2] == round(n * (1 - ratio))


def _check_against_eager_weights(model, eager_twin, ids, ratio):
    batch, n = ids.shape
    n_kv = model.config.num_key_value_heads
    with torch.no_grad():
        weights = eager_twin.model(input_ids=ids, output_attentions=True).attentions
    press = TOVAPress(ratio)
    seen = _record(press)
    cache = _prefill(model, press, ids)
    assert sorted(seen) == _full_layers(model)
    k = round(n * (1 - ratio))
    for i, rec in seen.items():
        # Reference: the last query row of the model's eager softmax, averaged over every query head of the layer.
        ref = weights[i][:, :, -1].double().mean(dim=1)  # (batch, n)
        ref[:, -1] = float("inf")
        torch.testing.assert_close(rec.scores.double(), ref[:, None].expand(batch, n_kv, n), rtol=1e-5, atol=1e-6)
        expected = ref.topk(k, dim=-1).indices.sort(-1).values
        kept = _kept_positions(cache.layers[i].keys, rec.keys)
        assert torch.equal(kept, expected[:, None].expand(batch, n_kv, k))  # the same tokens in every head
        assert (kept == n - 1).any(-1).all()  # the last token survives


@pytest.mark.parametrize("batch, n, ratio", [(1, 24, 0.5), (3, 31, 0.8)])
def test_scores_match_last_row_of_eager_attention(arch, attn, batch, n, ratio):
    _check_against_eager_weights(tiny_model(arch, attn), tiny_model(arch, "eager"), random_ids(n, batch, seed=n), ratio)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_ratios(n_kv):
    _check_against_eager_weights(_llama(n_kv, "sdpa"), _llama(n_kv, "eager"), random_ids(29, 2, seed=n_kv), 0.6)


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
    cache = _prefill(model, TOVAPress(0.0), ids)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_any_attention_implementation_accepted():
    caps = TOVAPress().capabilities
    assert not caps.needs_attention_weights and not caps.head_variable


@pytest.mark.parametrize("kwargs", [{"compression_ratio": 1.0}, {"compression_ratio": -0.5}, {"target_size": 0}])
def test_bad_budget_names_parameter(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TOVAPress(**kwargs)
