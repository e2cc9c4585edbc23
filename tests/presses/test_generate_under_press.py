"""``with press(model): model.generate(...)``: the press compresses the prefill and generate decodes from the
compressed cache, token for token as a plain greedy loop over the same compressed cache, at the original positions.

Combinations: uniform presses with transformers' default cache (every architecture); channel pruning and layer
merging with the default cache; head-variable presses with a ``VarlenCache``; uniform and head-variable presses with a
``QuantizedCache``; a head-variable press with the default cache is refused, naming the cache to pass."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.minicache_press import MiniCachePress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from kvpress.utils import attention_layers, is_sliding_layer
from tests.conftest import random_ids, tiny_model

N, STEPS = 48, 6


def reference(model, ids, press, cache, steps=STEPS) -> list[int]:
    """Prefill under the press with the model's own attention, then greedy steps at positions N, N + 1, ..."""
    n = ids.shape[1]
    with torch.no_grad():
        with press(model):
            logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits
        token = logits[:, -1].argmax(-1)
        out = [int(token)]
        with compressed_attention(model):
            for i in range(steps - 1):
                position = torch.tensor([[n + i]])
                logits = model(input_ids=token[:, None], **cache_kwargs(model, cache), position_ids=position,
                               use_cache=True).logits  # fmt: skip
                token = logits[:, -1].argmax(-1)
                out.append(int(token))
    return out


def generate(model, ids, press, cache=None, steps=STEPS):
    extra = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, pad_token_id=0, return_dict_in_generate=True, **extra)  # fmt: skip
    return out.sequences[0, ids.shape[1] :].tolist(), out["cache" if "cache" in out else "past_key_values"]


def full_layer(model) -> int:
    return next(i for i, m in enumerate(attention_layers(model)) if not is_sliding_layer(m))


def test_uniform_press_with_the_default_cache(arch):
    model = tiny_model(arch)
    ids = random_ids(N)
    press = KnormPress(0.5)
    tokens, cache = generate(model, ids, press)
    assert type(cache) is DynamicCache
    layer = full_layer(model)
    # The prefill's N tokens became N / 2; the last STEPS - 1 tokens were appended by decoding.
    assert cache.get_seq_length(layer) == N // 2 + STEPS - 1
    assert tokens == reference(model, ids, press, DynamicCache(config=model.config))
    assert model.config._attn_implementation == "sdpa"


def test_query_window_press_with_the_default_cache():
    model = tiny_model("qwen3")
    ids = random_ids(N, seed=1)
    press = SnapKVPress(0.75, window_size=8)
    tokens, cache = generate(model, ids, press)
    assert cache.get_seq_length() == N // 4 + STEPS - 1
    assert tokens == reference(model, ids, press, DynamicCache(config=model.config))


@pytest.mark.parametrize("make", [lambda m: VarlenCache(config=m.config)], ids=["varlen"])
def test_head_variable_press_with_a_varlen_cache(make):
    model = tiny_model("llama")
    ids = random_ids(N, seed=2)
    press = AdaKVPress(KnormPress(0.5))
    cache = make(model)
    tokens, _ = generate(model, ids, press, cache)
    per_head = [layer.cu_seqlens.diff().tolist() for layer in cache.layers]  # context kept per (sequence, kv head)
    assert all(sum(kept) == (N // 2) * len(kept) for kept in per_head)
    assert any(len(set(kept)) > 1 for kept in per_head)  # heads of a layer keep different counts
    assert tokens == reference(model, ids, press, make(model))
    assert model.config._attn_implementation == "sdpa"  # the "kvpress" attention was only for the block


@pytest.mark.parametrize("press", [KnormPress(0.5), AdaKVPress(KnormPress(0.5))], ids=["knorm", "adakv"])
def test_quantized_cache(press):
    model = tiny_model("llama", head_dim=32)

    def make():
        return QuantizedCache(config=model.config, quantization=QuantizationConfig(bits=4, group_size=32))

    ids = random_ids(N, seed=3)
    cache = make()
    tokens, _ = generate(model, ids, press, cache)
    assert all(layer.ragged for layer in cache.layers)  # the context is stored quantized
    assert tokens == reference(model, ids, press, make())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("press", [ThinKPress(0.5, window_size=8), MiniCachePress()], ids=["think", "minicache"])
def test_channel_pruning_and_layer_merging_with_the_default_cache(arch, press):
    model = tiny_model(arch)
    ids = random_ids(N, seed=4)
    tokens, cache = generate(model, ids, press)
    assert all(type(layer).__name__ != "DynamicLayer" for layer in cache.layers[1:])  # pruned or merged layers
    assert tokens == reference(model, ids, press, DynamicCache(config=model.config))
    assert model.config._attn_implementation == "sdpa"


def test_head_variable_press_with_the_default_cache_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"model\.generate pass cache=kvpress\.VarlenCache\(config=model\.config\)"):
        generate(model, random_ids(N), AdaKVPress(KnormPress(0.5)))
    assert model.config._attn_implementation == "sdpa"
