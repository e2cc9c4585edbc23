"""``with press(model): model.generate(...)``: the press compresses the prefill and generate decodes from the
compressed cache, token for token as a plain greedy loop over the same compressed cache, at the original positions.

Combinations: uniform presses with transformers' default cache (every architecture); per-layer counts (PyramidKV,
KVCompose), channel pruning and layer merging with the default cache; head-variable presses (AdaKV, and KVzip and
DuoAttention, whose budgets span layers) with a ``VarlenCache``; uniform and head-variable presses with a
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
from kvpress.presses.duo_attention_press import DuoAttentionPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.kvcompose_press import KVComposePress
from kvpress.presses.kvzip_press import KVzipPress
from kvpress.presses.minicache_press import MiniCachePress
from kvpress.presses.pyramidkv_press import PyramidKVPress
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


@pytest.mark.parametrize("make", [lambda: KVzipPress(0.5, chunk_size=16), lambda: DuoAttentionPress(0.5, sink_size=4, recent_size=8)],
                         ids=["kvzip", "duo_attention"])  # fmt: skip
def test_cross_layer_head_variable_presses_with_a_varlen_cache(make):
    """Budgets shared over layers and heads: the VarlenCache holds a different count per layer and head, and generate
    decodes from it as the plain greedy loop does."""
    model = tiny_model("qwen3")
    ids = random_ids(N, seed=4)
    tokens, cache = generate(model, ids, make(), VarlenCache(config=model.config))
    per_head = [layer.cu_seqlens.diff().tolist() for layer in cache.layers]
    assert len({n for kept in per_head for n in kept}) > 1
    assert tokens == reference(model, ids, make(), VarlenCache(config=model.config))


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


@pytest.mark.parametrize("press", [KnormPress(0.5), AdaKVPress(KnormPress(0.5)), KVComposePress(0.5),
                                   DuoAttentionPress(0.5, sink_size=4, recent_size=8)],
                         ids=["knorm", "adakv", "kvcompose", "duo_attention"])  # fmt: skip
def test_quantized_cache(press):
    model = tiny_model("llama", head_dim=32)

    def make():
        return QuantizedCache(config=model.config, quantization=QuantizationConfig(bits=4, group_size=32))

    ids = random_ids(N, seed=3)
    cache = make()
    tokens, _ = generate(model, ids, press, cache)
    assert all(layer.ragged for layer in cache.layers)  # the context is stored quantized
    assert tokens == reference(model, ids, press, make())


def test_kvzip_refuses_a_quantized_cache_naming_the_accepted_one():
    model = tiny_model("llama", head_dim=32)
    cache = QuantizedCache(config=model.config, quantization=QuantizationConfig(bits=4, group_size=32))
    with pytest.raises(
        ValueError, match="KVzipPress scores with forwards over the full-precision context, which a QuantizedVarlenLayer.*VarlenCache"
    ):
        generate(model, random_ids(N, seed=3), KVzipPress(0.5, chunk_size=16), cache)
    assert cache.get_seq_length() == N  # the reconstruction's tokens are gone: the context is left as prefilled


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("press", [ThinKPress(0.5, window_size=8), MiniCachePress()], ids=["think", "minicache"])
def test_channel_pruning_and_layer_merging_with_the_default_cache(arch, press):
    model = tiny_model(arch)
    ids = random_ids(N, seed=4)
    tokens, cache = generate(model, ids, press)
    assert all(type(layer).__name__ != "DynamicLayer" for layer in cache.layers[1:])  # pruned or merged layers
    assert tokens == reference(model, ids, press, DynamicCache(config=model.config))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("make", [lambda: AdaKVPress(KnormPress(0.5)), lambda: KVzipPress(0.5, chunk_size=16),
                                  lambda: DuoAttentionPress(0.5, sink_size=4, recent_size=8)],
                         ids=["adakv", "kvzip", "duo_attention"])  # fmt: skip
def test_head_variable_press_with_the_default_cache_is_refused(make):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"model\.generate pass cache=kvpress\.VarlenCache\(config=model\.config\)"):
        generate(model, random_ids(N), make())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("make", [lambda: PyramidKVPress(0.5, window_size=4), lambda: KVComposePress(0.5)],
                         ids=["pyramidkv", "kvcompose"])  # fmt: skip
def test_layers_of_different_lengths_with_the_default_cache(arch, make):
    """Presses that keep a different count per layer leave a dense cache that transformers' single mask cannot fit:
    decoding switches to the "kvpress" attention and equals the plain greedy loop over the same cache."""
    model = tiny_model(arch)
    ids = random_ids(N, seed=2)
    tokens, cache = generate(model, ids, make())
    lengths = {cache.get_seq_length(m.layer_idx) for m in attention_layers(model) if not is_sliding_layer(m)}
    if arch != "gemma3" and isinstance(make(), PyramidKVPress):  # (gemma3: one full-attention layer)
        assert len(lengths) > 1  # KVCompose's counts follow the attention, which may happen to be even
    assert tokens == reference(model, ids, make(), DynamicCache(config=model.config))
    assert model.config._attn_implementation == "sdpa"
