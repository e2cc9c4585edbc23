"""BasePress: hook lifecycle, prefill-only compression, sliding layers, no state on the model, no silent no-op."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Cache, DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs, find_cache
from kvpress.presses.knorm_press import KnormPress
from kvpress.utils import attention_layers, is_sliding_layer
from tests.conftest import random_ids, tiny_config, tiny_model


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in attention_layers(model))


def test_hooks_removed_on_exit(arch):
    model = tiny_model(arch)
    before = _n_hooks(model)
    with KnormPress(0.5)(model):
        assert _n_hooks(model) == before + len(attention_layers(model))
    assert _n_hooks(model) == before


def test_hooks_removed_after_exception():
    model = tiny_model("llama")
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with KnormPress(0.5)(model):
            raise RuntimeError("boom")
    assert _n_hooks(model) == before
    # The model is unaffected: same logits as a fresh forward.
    ids = random_ids(12)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids).logits
    assert torch.equal(a, b)


def test_no_state_left_on_modules():
    model = tiny_model("qwen3")
    snapshot = {name: set(vars(m)) for name, m in model.named_modules()}
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), KnormPress(0.5)(model):
        model.model(input_ids=random_ids(20), **cache_kwargs(model.model, cache))
    assert {name: set(vars(m)) for name, m in model.named_modules()} == snapshot


def test_only_prefill_is_compressed():
    """A second forward on a non-empty cache (question/decode) appends without compressing."""
    model = tiny_model("mistral")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), KnormPress(0.5)(model) as report:
        model.model(input_ids=random_ids(30), **cache_kwargs(model.model, cache))
        assert all(layer.keys.shape[-2] == 15 for layer in cache.layers)
        model.model(input_ids=random_ids(6, seed=1), **cache_kwargs(model.model, cache), position_ids=torch.arange(30, 36)[None])
    assert all(layer.keys.shape[-2] == 21 for layer in cache.layers)
    assert set(report.original_lengths.values()) == {30}


def test_sliding_window_layers_are_not_compressed():
    model = tiny_model("gemma3")
    ref = DynamicCache(config=model.config)
    cache = DynamicCache(config=model.config)
    ids = random_ids(30)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
        with KnormPress(0.5)(model) as report:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    types = model.config.layer_types
    for i, layer in enumerate(cache.layers):
        if types[i] == "sliding_attention":
            assert torch.equal(layer.keys, ref.layers[i].keys)
        else:
            assert layer.keys.shape[-2] == 15
    assert report.compressed_layers == [i for i, t in enumerate(types) if t == "full_attention"]


def test_two_models_compressed_in_one_process():
    m1, m2 = tiny_model("llama"), tiny_model("qwen2")
    c1, c2 = DynamicCache(config=m1.config), DynamicCache(config=m2.config)
    with torch.no_grad(), KnormPress(0.25)(m1) as r1, KnormPress(0.75)(m2) as r2:
        m1.model(input_ids=random_ids(40), **cache_kwargs(m1.model, c1))
        m2.model(input_ids=random_ids(40), **cache_kwargs(m2.model, c2))
    assert all(layer.keys.shape[-2] == 30 for layer in c1.layers)
    assert all(layer.keys.shape[-2] == 10 for layer in c2.layers)
    assert r1.compression_ratio == pytest.approx(0.25) and r2.compression_ratio == pytest.approx(0.75)


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        out_ref = model(input_ids=ids, **cache_kwargs(model, ref)).logits
        with KnormPress(0.0)(model):
            out = model(input_ids=ids, **cache_kwargs(model, cache)).logits
    assert torch.equal(out, out_ref)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_no_cache_means_nothing_to_compress():
    model = tiny_model("llama")
    ids = random_ids(10)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with KnormPress(0.5)(model):
            out = model(ids, use_cache=False).logits
    assert torch.equal(out, ref)


# ---- a press never does nothing quietly ------------------------------------------------------------------------------
def _hide_cache_from_attention(model):
    """Pre-hooks that take the cache away from every attention forward (what a renamed cache keyword would do)."""

    def strip(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if not isinstance(v, Cache)}

    return [m.register_forward_pre_hook(strip, with_kwargs=True) for m in attention_layers(model)]


@pytest.mark.parametrize("call", ["causal_lm", "base_model"])
def test_prefill_that_compresses_nothing_raises(arch, call):
    model = tiny_model(arch)
    handles = _hide_cache_from_attention(model)
    press = KnormPress(0.5)
    cache = DynamicCache(config=model.config)
    target = model if call == "causal_lm" else model.model
    try:
        with pytest.raises(RuntimeError) as err:
            with torch.no_grad(), press(model):
                target(input_ids=random_ids(20), **cache_kwargs(target, cache))
    finally:
        for handle in handles:
            handle.remove()
    message = str(err.value)
    n_full = sum(not is_sliding_layer(m) for m in attention_layers(model))
    assert "KnormPress(compression_ratio=0.5" in message
    assert f"transformers {transformers.__version__}" in message
    assert "prefill of 20 tokens" in message and f"Expected: the {n_full} full-attention layer(s) compressed" in message
    assert "happened: none" in message
    # Every hook is gone and the model answers as before.
    assert _n_hooks(model) == 0
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks
    ids = random_ids(12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_guard_raises_even_when_a_zero_ratio_press_would_keep_everything():
    """The guard checks that the press acted, not that it removed tokens: a ratio of 0 still records every layer."""
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), KnormPress(0.0)(model) as report:
        model.model(input_ids=random_ids(10), **cache_kwargs(model.model, cache))
    assert report.compressed_layers == [0, 1, 2] and report.compression_ratio == 0.0
    handles = _hide_cache_from_attention(model)
    try:
        with pytest.raises(RuntimeError, match="compressed no attention layer"):
            with torch.no_grad(), KnormPress(0.0)(model):
                model.model(input_ids=random_ids(10), **cache_kwargs(model.model, DynamicCache(config=model.config)))
    finally:
        for handle in handles:
            handle.remove()


def test_forwards_without_a_cache_or_after_the_prefill_are_not_errors():
    model = tiny_model("llama")
    ids = random_ids(16)
    with torch.no_grad(), KnormPress(0.5)(model) as report:
        model(input_ids=ids, use_cache=False)  # no cache: nothing to compress
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_kwargs(model, cache))
        handles = _hide_cache_from_attention(model)
        try:  # a decode step appends to a non-empty cache: no compression expected
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache), position_ids=torch.tensor([[16]]))
        finally:
            for handle in handles:
                handle.remove()
    assert report.n_records == 3 and all(layer.keys.shape[-2] == 8 for layer in cache.layers)


def test_a_cache_the_model_creates_itself_is_compressed():
    """``use_cache=True`` without a cache: the model builds one, the press compresses it, the output returns it."""
    model = tiny_model("qwen3")
    with torch.no_grad(), KnormPress(0.25)(model) as report:
        out = model(input_ids=random_ids(20), use_cache=True)
    cache = find_cache(out)
    assert report.compressed_layers == [0, 1, 2]
    assert all(layer.keys.shape[-2] == 15 for layer in cache.layers)


def test_model_whose_every_layer_slides_is_rejected_up_front():
    config = tiny_config("gemma3")
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    model = AutoModelForCausalLM.from_config(config).eval()
    assert all(is_sliding_layer(m) for m in attention_layers(model))
    with pytest.raises(ValueError, match="KnormPress has nothing to compress in Gemma3ForCausalLM: every attention layer slides"):
        with KnormPress(0.5)(model):
            pass
    assert not any(m._forward_hooks for m in attention_layers(model))
