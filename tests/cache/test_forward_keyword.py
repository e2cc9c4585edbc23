"""find_cache / cache_kwargs: the cache is read and passed under the keyword the installed transformers uses."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from kvpress.cache.forward_keyword import CACHE_KEYWORDS, cache_keyword, cache_kwargs, find_cache
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model


@pytest.mark.parametrize("name", [*CACHE_KEYWORDS, "kv_store_of_a_future_release"])
def test_find_cache_under_any_keyword(name):
    cache = DynamicCache()
    assert find_cache({"hidden_states": torch.zeros(1), name: cache, "use_cache": True}) is cache


def test_find_cache_prefers_the_known_keywords_and_ignores_other_values():
    a, b = DynamicCache(), DynamicCache()
    assert find_cache({"other": a, "past_key_values": b}) is b
    assert find_cache({"past_key_values": None, "cache": a}) is a
    assert find_cache({"past_key_values": None, "cache": "not a cache", "x": 3}) is None
    assert find_cache({}) is None


def test_find_cache_reads_model_outputs():
    cache = DynamicCache()
    out = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1, 2, 3), **cache_kwargs(tiny_model("llama"), cache))
    assert find_cache(out) is cache


def test_the_keyword_is_what_every_forward_of_the_installed_transformers_declares(arch):
    model = tiny_model(arch)
    name = cache_keyword(model)
    for module in (model, model.model, attention_layers(model)[0]):
        assert name in inspect.signature(module.forward).parameters
        assert cache_keyword(module) == name


def test_forwards_through_cache_kwargs_fill_the_cache_without_warnings(arch):
    model = tiny_model(arch)
    ids = random_ids(9)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword would warn
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 9 and find_cache(out) is cache
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_forward_without_a_cache_argument_is_a_clear_error():
    class NoCache(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match=r"NoCache.forward takes no cache argument \(looked for cache, past_key_values"):
        cache_kwargs(NoCache(), DynamicCache())
