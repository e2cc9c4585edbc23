"""QuantizedCache on tiny random models: presses (uniform and head-variable) stacked with 2/4/8-bit storage, against
the unquantized VarlenCache, plus memory, layer bits, stacking, persistence and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from kvpress_kernels import dequantize_segments
from tests.conftest import random_ids, tiny_model

PRESSES = {
    "knorm": lambda: KnormPress(0.4),
    "snapkv": lambda: SnapKVPress(0.5, window_size=4),
    "adakv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),
}


def quant_model(arch: str, head_dim: int = 32):
    """A tiny random ``arch`` model whose head dimension a quantization group can divide (the shared tiny models use
    16, below the smallest group size)."""
    return tiny_model(arch, head_dim=head_dim)


def prefill(model, cache, ids, press=None):
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        else:
            with press(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, cache))


def decode(model, cache, start, steps, batch=1, seed=100):
    """Logits of a 5-token question then ``steps`` single tokens (fixed ids, so caches can be compared)."""
    out, pos = [], start
    with torch.no_grad(), compressed_attention(model):
        for i in range(steps + 1):
            ids = random_ids(5 if i == 0 else 1, batch, seed=seed + i)
            positions = torch.arange(pos, pos + ids.shape[1])[None].expand(batch, -1)
            out.append(model(input_ids=ids, **cache_kwargs(model, cache), position_ids=positions).logits)
            pos += ids.shape[1]
    return torch.cat(out, dim=1)


def packed_bytes(groups: int, n_segments: int, d: int, bits: int, g: int, esize: int) -> int:
    """Quantized storage of ``groups`` groups in ``n_segments`` segments (codes in whole int32 words per group)."""
    words = math.ceil(g * bits / 32)
    per_group = words * d * 4 + 2 * d * esize + g * (d // g) * (words * 4 + 2 * esize)
    return groups * per_group + (n_segments + 1) * 4 + 2 * n_segments * 4


def expected_layer_bytes(layer: QuantizedVarlenLayer, context_lengths: torch.Tensor) -> int:
    """Bytes of a quantized layer from its lengths alone: context groups, flushed groups, tail capacity and lengths."""
    g, d = layer.group_size, layer.head_dim
    esize = torch.empty(0, dtype=layer.dtype).element_size()
    flushed = layer.seg_lens - context_lengths
    groups = int(((context_lengths + g - 1) // g).sum() + (flushed // g).sum())
    b, h = context_lengths.shape
    tail = 2 * b * h * layer.tail_k.shape[2] * d * esize + 4 * b
    return packed_bytes(groups, b * h, d, layer.bits, g, esize) + tail


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("press_name", sorted(PRESSES))
def test_presses_stack_with_quantization(arch, press_name):
    model = quant_model(arch)
    n, batch = 48, 2
    ids = random_ids(n, batch)
    full = VarlenCache(config=model.config)
    prefill(model, full, ids, PRESSES[press_name]())
    reference = decode(model, full, n, 6, batch)
    errors = {}
    for bits in (2, 4, 8):
        config = QuantizationConfig(bits=bits, group_size=32, residual_length=32)
        cache = QuantizedCache(config=model.config, quantization=config)
        prefill(model, cache, ids, PRESSES[press_name]())
        cache.compact()
        lengths = {}
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                continue  # Gemma3's sliding layers stay dense
            assert isinstance(layer, QuantizedVarlenLayer) and layer.ragged and layer.segs.bits == bits
            # The press kept the same tokens per head as in the full-precision cache.
            assert torch.equal(cache.head_lengths(i), full.head_lengths(i) - 11)  # 11 tokens decoded there
            lengths[i] = cache.head_lengths(i)
            assert layer.memory_bytes() == expected_layer_bytes(layer, lengths[i])
        logits = decode(model, cache, n, 6, batch)
        for i, context in lengths.items():
            layer = cache.layers[i]
            # 11 tokens added with residual_length 32: none flushed yet, all in the full-precision tail.
            assert torch.equal(layer.seg_lens, context) and layer.tail_len == 11
        errors[bits] = (logits - reference).abs().max().item()
    torch.testing.assert_close(logits, reference, atol=5e-3, rtol=0)  # 8 bits
    assert errors[8] < errors[4] < errors[2], errors
    if arch == "gemma3":
        assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers[:2])


def test_flushed_groups_decode_like_the_unquantized_cache():
    model = quant_model("qwen3")
    ids = random_ids(40, 2, seed=3)
    full, cache = VarlenCache(config=model.config), QuantizedCache(model.config, {"bits": 8, "group_size": 32})
    for c in (full, cache):
        prefill(model, c, ids, AdaKVPress(KnormPress(0.5)))
    context = [cache.head_lengths(i) for i in range(len(cache.layers))]
    a, b = decode(model, full, 40, 140, batch=2), decode(model, cache, 40, 140, batch=2)
    torch.testing.assert_close(b, a, atol=1e-2, rtol=0)
    for layer, lengths in zip(cache.layers, context):
        # 145 tokens added, residual_length 128: one flush of the 128 oldest (4 groups of 32).
        assert torch.equal(layer.seg_lens, lengths + 128) and layer.tail_len == 145 - 128
        assert layer.memory_bytes() == expected_layer_bytes(layer, lengths)
        assert layer.tail_k.shape[2] == 128  # the full-precision tail never grew past residual_length
    assert cache.memory_bytes() < full.memory_bytes()


def test_long_uniform_context_costs_bytes_per_token():
    model = quant_model("llama", head_dim=64)
    quantization = QuantizationConfig(bits=4, group_size=64, layer_bits={0: 8, 2: 2})
    n, batch, heads, d = 200, 2, model.config.num_key_value_heads, 64
    cache = QuantizedCache(config=model.config, quantization=quantization)
    prefill(model, cache, random_ids(n, batch))
    cache.compact()
    for i, layer in enumerate(cache.layers):
        assert layer.bits == layer.segs.bits == quantization.bits_for(i)
        metadata = (batch * heads + 1) * 4 + 2 * batch * heads * 4 + 4 * batch  # segments' int32 + tail lengths
        stored = layer.memory_bytes() - metadata - 2 * layer.tail_k.numel() * 4
        planned = batch * heads * n * quantization.bytes_per_token(i, d, scale_bytes=4)
        # 200 tokens fill 4 groups of 64 per head: the planned cost is off by the last group's padding only.
        padding = batch * heads * (256 - n) * quantization.bytes_per_token(i, d, scale_bytes=4)
        assert stored == pytest.approx(planned + padding, abs=1e-6)
        assert layer.memory_bytes() == expected_layer_bytes(layer, torch.full((batch, heads), n))


def test_a_forward_after_an_uncompressed_prefill_quantizes_every_layer():
    model = quant_model("mistral")
    ids = random_ids(50, 1, seed=4)
    compacted, lazy = (QuantizedCache(model.config, {"bits": 4, "group_size": 32}) for _ in range(2))
    prefill(model, compacted, ids)
    prefill(model, lazy, ids)
    compacted.compact()
    assert all(layer.ragged for layer in compacted.layers) and not any(layer.ragged for layer in lazy.layers)
    torch.testing.assert_close(decode(model, lazy, 50, 2), decode(model, compacted, 50, 2), atol=0, rtol=0)
    assert all(layer.ragged for layer in lazy.layers)
    assert lazy.memory_bytes() == compacted.memory_bytes()


def test_concatenate_decodes_each_sequence_as_alone():
    model = quant_model("llama")
    quantization = QuantizationConfig(bits=4, group_size=32, residual_length=32)
    caches = []
    for seed, n in ((0, 30), (1, 45)):
        cache = QuantizedCache(config=model.config, quantization=quantization)
        prefill(model, cache, random_ids(n, seed=seed), AdaKVPress(KnormPress(0.5)))
        cache.next_positions = [n]
        caches.append(cache)
    state = [snapshot_cache(c) for c in caches]
    stacked = QuantizedCache.concatenate(caches)
    assert stacked.next_positions == [30, 45]
    for i, layer in enumerate(stacked.layers):
        assert torch.equal(layer.seg_lens, torch.cat([c.layers[i].seg_lens for c in caches]))
        k, _, lens = dequantize_segments(layer.segs)
        parts = [dequantize_segments(c.layers[i].segs) for c in caches]
        assert torch.equal(k, torch.cat([p[0] for p in parts])) and torch.equal(lens, torch.cat([p[2] for p in parts]))
    # Both sequences at once (positions differ per sequence) against each alone.
    steps = [random_ids(3, 2, seed=9)] + [random_ids(1, 2, seed=10 + s) for s in range(40)]
    pos = torch.tensor([[30], [45]])
    together = []
    with torch.no_grad(), compressed_attention(model):
        for x in steps:
            positions = pos + torch.arange(x.shape[1])
            together.append(model(input_ids=x, **cache_kwargs(model, stacked), position_ids=positions).logits)
            pos = pos + x.shape[1]
        for b, (cache, s) in enumerate(zip(caches, state)):
            restore_cache(cache, s)
            p = int(cache.next_positions[0])
            for x, ref in zip(steps, together):
                positions = p + torch.arange(x.shape[1])[None]
                alone = model(input_ids=x[b : b + 1], **cache_kwargs(model, cache), position_ids=positions)
                torch.testing.assert_close(alone.logits, ref[b : b + 1], atol=1e-5, rtol=1e-5)
                p += x.shape[1]
    for i, layer in enumerate(stacked.layers):  # 43 tokens added: one group of 32 flushed on the way
        assert torch.equal(layer.seg_lens, torch.cat([c.layers[i].seg_lens for c in caches])) and layer.tail_len == 11
    with pytest.raises(ValueError, match="no tokens added after compression"):
        QuantizedCache.concatenate([stacked, caches[0]])
    other = QuantizedCache(config=model.config, quantization={"bits": 8, "group_size": 32})
    with pytest.raises(ValueError, match="same quantization"):
        QuantizedCache.concatenate([caches[0], other])


def test_save_and_load_round_trip(tmp_path):
    model = quant_model("qwen3")
    cache = QuantizedCache(config=model.config, quantization={"bits": 2, "group_size": 32, "residual_length": 32})
    prefill(model, cache, random_ids(40, 2), AdaKVPress(SnapKVPress(0.5, window_size=4)))
    decode(model, cache, 40, 30, batch=2)  # 35 tokens added: one group flushed, 3 in the tail
    path = tmp_path / "quantized.safetensors"
    cache.save(path)
    loaded = QuantizedCache.load(path)
    assert loaded.quantization == cache.quantization
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.seg_lens, b.seg_lens) and a.tail_len == b.tail_len == 3
        assert all(torch.equal(getattr(a.segs, f), getattr(b.segs, f)) for f in ("k_packed", "v_scale", "cu_groups"))
    torch.testing.assert_close(decode(model, loaded, 75, 3, 2, seed=7), decode(model, cache, 75, 3, 2, seed=7))
    assert loaded.memory_bytes() <= cache.memory_bytes()
    with pytest.raises(ValueError, match="not a kvpress VarlenCache file"):
        VarlenCache.load(path)
    plain = VarlenCache(config=model.config)
    prefill(model, plain, random_ids(20), KnormPress(0.5))
    plain.save(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a kvpress QuantizedCache file"):
        QuantizedCache.load(tmp_path / "plain.safetensors")


def test_bad_configuration_is_refused_at_construction():
    model = tiny_model("llama")  # head_dim 16: no group size divides it
    with pytest.raises(ValueError, match=r"group_size=32 must divide the head dimension 16; no group size \(32, 64, 128\) divides it"):
        QuantizedCache(config=model.config, quantization=QuantizationConfig(group_size=32))
    wide = quant_model("llama")
    with pytest.raises(ValueError, match=r"group_size=64 must divide the head dimension 32; accepted: \[32\]"):
        QuantizedCache(config=wide.config, quantization={"group_size": 64})
    with pytest.raises(ValueError, match="bits: bits must be one of 2, 3, 4, 8, got 5"):
        QuantizedCache(config=wide.config, quantization={"bits": 5, "group_size": 32})
    with pytest.raises(ValueError, match="group_size: group_size must be one of 32, 64, 128, got 48"):
        QuantizedCache(config=wide.config, quantization={"group_size": 48})
    with pytest.raises(ValueError, match="must be a QuantizationConfig or a dict"):
        QuantizedCache(config=wide.config, quantization=4)


def test_channel_pruning_press_is_refused_and_the_model_still_runs():
    model = quant_model("llama")
    cache = QuantizedCache(config=model.config, quantization={"bits": 4, "group_size": 32})
    ids = random_ids(30)
    with pytest.raises(ValueError, match="channel-pruned keys"):
        prefill(model, cache, ids, ThinKPress(0.5, window_size=4))
    fresh = QuantizedCache(config=model.config, quantization={"bits": 4, "group_size": 32})
    prefill(model, fresh, ids, KnormPress(0.5))
    reference = DynamicCache(config=model.config)
    prefill(model, reference, ids, KnormPress(0.5))
    torch.testing.assert_close(decode(model, fresh, 30, 1), decode(model, reference, 30, 1), atol=0.05, rtol=0)
