"""CompressedContext: answers repeat exactly (the cache returns to the compressed context), clear/resume/batches, and
every misuse is refused before the model runs."""

import pytest
from transformers import DynamicCache

from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext, make_cache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model


def test_answers_repeat_and_the_cache_returns_to_the_context():
    model = tiny_model("llama")
    context = CompressedContext.prefill(model, random_ids(48), SnapKVPress(0.5, window_size=8))
    held = (context.cache.get_seq_length(), layer_memory_bytes(context.cache))
    assert held[0] == 24
    tail = random_ids(4, seed=1)
    first = context.generate([tail], 6, eos_ids=[])
    other = context.generate([random_ids(5, seed=2)], 6, eos_ids=[])
    assert context.generate([tail], 6, eos_ids=[]) == first != other
    assert (context.cache.get_seq_length(), layer_memory_bytes(context.cache)) == held
    summary = context.summaries[0]
    assert summary.prefill_tokens == 48 and summary.kv_bytes == held[1] < summary.kv_bytes_uncompressed


def test_make_cache_follows_the_press():
    model = tiny_model("llama")
    assert type(make_cache(model)) is DynamicCache
    assert type(make_cache(model, KnormPress(0.5))) is DynamicCache
    assert type(make_cache(model, AdaKVPress(KnormPress(0.5)))) is VarlenCache


def test_clear_then_prefill_again_into_the_same_cache():
    model = tiny_model("llama")
    cache = VarlenCache(config=model.config)
    press = AdaKVPress(KnormPress(0.5))
    a = CompressedContext.prefill(model, random_ids(40, seed=3), press, cache=cache)
    with pytest.raises(ValueError, match="cache must be empty"):
        CompressedContext.prefill(model, random_ids(40, seed=4), press, cache=cache)
    a.clear()
    assert cache.get_seq_length() == 0
    b = CompressedContext.prefill(model, random_ids(40, seed=4), press, cache=cache)
    fresh = CompressedContext.prefill(model, random_ids(40, seed=4), press)
    tail = random_ids(3, seed=5)
    assert b.generate([tail], 5, eos_ids=[]) == fresh.generate([tail], 5, eos_ids=[])


def test_resume_from_a_saved_cache(tmp_path):
    model = tiny_model("llama")
    context = CompressedContext.prefill(model, random_ids(40, seed=6), AdaKVPress(KnormPress(0.5)))
    tail = random_ids(3, seed=7)
    want = context.generate([tail], 5, eos_ids=[])
    context.cache.save(tmp_path / "ctx")
    resumed = CompressedContext.resume(model, VarlenCache.load(tmp_path / "ctx"))
    assert resumed.positions == [40] and resumed.generate([tail], 5, eos_ids=[]) == want


def test_misuse_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="resuming needs a cache that holds a compressed context"):
        CompressedContext.resume(model, VarlenCache(config=model.config))
    context = CompressedContext.prefill(model, random_ids(20), KnormPress(0.5))
    with pytest.raises(ValueError, match="got 2 tails for a cache of 1 sequences"):
        context.generate([random_ids(2), random_ids(2)], 3, eos_ids=[])
    resumed = CompressedContext.resume(
        model, CompressedContext.prefill(model, random_ids(20), AdaKVPress(KnormPress(0.5))).cache
    )
    with pytest.raises(ValueError, match="only a context built by CompressedContext.prefill can be cleared"):
        resumed.clear()
    with pytest.raises(ValueError, match="window_size=8 is larger than the context"):
        CompressedContext.prefill(model, random_ids(1), SnapKVPress(0.5, window_size=8))


def test_quantization_given_as_a_dict_equals_the_config():
    """``quantization`` takes a dict of the config's fields, as the pipeline does; a bad one names the parameter."""
    from kvpress.cache.quantization_config import QuantizationConfig
    from kvpress.cache.quantized_cache import QuantizedCache

    model = tiny_model("llama", head_dim=32)
    ids, tail = random_ids(40, seed=6), random_ids(3, seed=7)
    fields = {"bits": 4, "group_size": 32, "residual_length": 32}
    as_dict = CompressedContext.prefill(model, ids, KnormPress(0.5), quantization=fields)
    as_config = CompressedContext.prefill(model, ids, KnormPress(0.5), quantization=QuantizationConfig(**fields))
    assert isinstance(as_dict.cache, QuantizedCache)
    assert as_dict.generate([tail], 5, []) == as_config.generate([tail], 5, [])
    assert as_dict.summaries[0].kv_bytes == as_config.summaries[0].kv_bytes
    with pytest.raises(ValueError, match="quantization.*bits"):
        CompressedContext.prefill(model, ids, KnormPress(0.5), quantization={"bits": 5})
