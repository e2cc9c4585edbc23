"""BasePress: hook lifecycle, prefill-only compression, sliding layers, no state on the model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress.presses.knorm_press import KnormPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model


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
        model.model(input_ids=random_ids(20), past_key_values=cache)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == snapshot


def test_only_prefill_is_compressed():
    """A second forward on a non-empty cache (question/decode) appends without compressing."""
    model = tiny_model("mistral")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), KnormPress(0.5)(model) as report:
        model.model(input_ids=random_ids(30), past_key_values=cache)
        assert all(layer.keys.shape[-2] == 15 for layer in cache.layers)
        model.model(input_ids=random_ids(6, seed=1), past_key_values=cache, position_ids=torch.arange(30, 36)[None])
    assert all(layer.keys.shape[-2] == 21 for layer in cache.layers)
    assert set(report.original_lengths.values()) == {30}


def test_sliding_window_layers_are_not_compressed():
    model = tiny_model("gemma3")
    ref = DynamicCache(config=model.config)
    cache = DynamicCache(config=model.config)
    ids = random_ids(30)
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=ref)
        with KnormPress(0.5)(model) as report:
            model.model(input_ids=ids, past_key_values=cache)
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
        m1.model(input_ids=random_ids(40), past_key_values=c1)
        m2.model(input_ids=random_ids(40), past_key_values=c2)
    assert all(layer.keys.shape[-2] == 30 for layer in c1.layers)
    assert all(layer.keys.shape[-2] == 10 for layer in c2.layers)
    assert r1.compression_ratio == pytest.approx(0.25) and r2.compression_ratio == pytest.approx(0.75)


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        out_ref = model(input_ids=ids, past_key_values=ref).logits
        with KnormPress(0.0)(model):
            out = model(input_ids=ids, past_key_values=cache).logits
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
