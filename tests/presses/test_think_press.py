"""ThinKPress: channel selection against a float64 recomputation, and decoding equal to a dense cache with zeroed
key channels, on every architecture."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvpress.cache.attention import compressed_attention
from kvpress.cache.channel_pruned_layer import ChannelPrunedLayer
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes, restore_cache, snapshot_cache
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model


@dataclass
class RecordingThinKPress(ThinKPress):
    """Remembers the channel scores it computed, per layer."""

    def __post_init__(self):
        super().__post_init__()
        self.scores: dict[int, torch.Tensor] = {}

    def channel_scores(self, module, hidden_states, keys, kwargs):
        scores = super().channel_scores(module, hidden_states, keys, kwargs)
        self.scores[module.layer_idx] = scores
        return scores


@functools.cache
def llama(kv_heads: int):
    """A tiny Llama with 4 query heads and ``kv_heads`` kv heads (GQA group 4 // kv_heads)."""
    torch.manual_seed(kv_heads)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def layer_inputs(model, ids, cache, press=None) -> dict[int, torch.Tensor]:
    """Prefill ``ids`` into ``cache`` (under ``press`` if given); returns each attention layer's input hidden states."""
    seen = {}

    def grab(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention_layers(model)]
    try:
        with torch.no_grad():
            if press is None:
                model.model(input_ids=ids, **cache_kwargs(model.model, cache))
            else:
                with press(model):
                    model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    finally:
        for h in handles:
            h.remove()
    return seen


def reference_scores(model, layer_idx, hidden, keys, window) -> torch.Tensor:
    """Float64 channel scores ``(B, Hkv, d)`` of a Llama layer, with queries and RoPE written out here."""
    cfg = model.config
    attn = attention_layers(model)[layer_idx]
    b, n, _ = hidden.shape
    n_q, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (hidden.double() @ attn.q_proj.weight.double().T).view(b, n, n_q, d).transpose(1, 2)
    inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q = q * cos + torch.cat([-q[..., d // 2 :], q[..., : d // 2]], dim=-1) * sin
    q_energy = (q[:, :, -window:] ** 2).mean(dim=2).view(b, n_kv, n_q // n_kv, d).mean(dim=2)
    k_energy = (keys.double() ** 2).mean(dim=2)
    return q_energy * k_energy


def kept_count(d: int, ratio: float) -> int:
    return d - math.floor(Fraction(str(ratio)) * d)


def zero_pruned_channels(keys: torch.Tensor, channels: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Dense keys with every channel outside ``channels`` set to zero in the first ``n_pruned`` tokens."""
    keep = torch.zeros_like(keys, dtype=torch.bool)
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            keep[b, h, :n_pruned, channels[b, h]] = True
    keep[:, :, n_pruned:] = True
    return torch.where(keep, keys, torch.zeros_like(keys))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ratio,window", [(0.25, 1), (0.5, 4), (0.7, 6)])
def test_channels_match_float64_reference(kv_heads, batch, ratio, window):
    model = llama(kv_heads)
    n = 9 + 3 * kv_heads + batch
    ids = random_ids(n, batch, seed=kv_heads + 10 * batch)
    dense = DynamicCache(config=model.config)
    hidden = layer_inputs(model, ids, dense)
    press = RecordingThinKPress(ratio, window_size=window)
    cache = DynamicCache(config=model.config)
    layer_inputs(model, ids, cache, press)
    d = model.config.head_dim
    d_kept = kept_count(d, ratio)
    assert press.n_channels_kept(d) == d_kept
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = dense.layers[layer_idx].keys, dense.layers[layer_idx].values
        ref = reference_scores(model, layer_idx, hidden[layer_idx], keys, window)
        torch.testing.assert_close(press.scores[layer_idx].double(), ref, rtol=1e-4, atol=1e-7)
        ref_channels = ref.topk(d_kept, dim=-1).indices.sort(dim=-1).values
        assert isinstance(layer, ChannelPrunedLayer)
        assert torch.equal(layer.key_channels, ref_channels)
        # Storage: context keys at the kept channels, the last `window` tokens full-width, values untouched.
        expected_pruned = torch.stack(
            [
                torch.stack([keys[b, h, : n - window][:, ref_channels[b, h]] for h in range(kv_heads)])
                for b in range(batch)
            ]
        )
        assert layer.pruned_keys.shape == (batch, kv_heads, n - window, d_kept)
        torch.testing.assert_close(layer.pruned_keys, expected_pruned, rtol=0, atol=0)
        torch.testing.assert_close(layer.keys, keys[:, :, n - window :], rtol=0, atol=0)
        torch.testing.assert_close(layer.values, values, rtol=0, atol=0)


@pytest.mark.parametrize("d,ratio,kept", [(128, 0.4, 77), (100, 0.29, 71), (16, 0.5, 8), (64, 0.0, 64), (3, 1 / 3, 2)])
def test_number_of_kept_channels(d, ratio, kept):
    assert ThinKPress(ratio).n_channels_kept(d) == kept


def decode_logits(model, cache, batch, n, steps=3, compressed=False):
    """A 3-token forward then ``steps`` greedy single-token steps; returns the logits of every forward."""
    ids = random_ids(3, batch, seed=99)
    position = n
    outs = []
    ctx = compressed_attention(model) if compressed else torch.no_grad()
    with torch.no_grad(), ctx:
        for _ in range(steps + 1):
            positions = torch.arange(position, position + ids.shape[1])[None].expand(batch, -1)
            logits = model(input_ids=ids, **cache_kwargs(model, cache), position_ids=positions).logits
            outs.append(logits)
            position += ids.shape[1]
            ids = logits[:, -1:].argmax(dim=-1)
    return outs


def test_decoding_equals_dense_cache_with_zeroed_channels(arch, attn):
    model = tiny_model(arch, attn)
    batch, n, window = 2, 24, 4
    ids = random_ids(n, batch, seed=5)
    cache, zeroed, plain = (DynamicCache(config=model.config) for _ in range(3))
    with torch.no_grad():
        with ThinKPress(0.5, window_size=window)(model) as report:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        model.model(input_ids=ids, **cache_kwargs(model.model, zeroed))
        model.model(input_ids=ids, **cache_kwargs(model.model, plain))
    saved = 0
    for layer_idx, layer in enumerate(cache.layers):
        if getattr(model.config, "layer_types", None) and model.config.layer_types[layer_idx] == "sliding_attention":
            assert not isinstance(layer, ChannelPrunedLayer)  # sliding layers are left alone
            continue
        assert isinstance(layer, ChannelPrunedLayer)
        dense = zeroed.layers[layer_idx]
        dense.keys = zero_pruned_channels(dense.keys, layer.key_channels, n - window)
        d = dense.keys.shape[-1]
        d_kept = layer.key_channels.shape[-1]
        assert d_kept == d // 2
        saved += batch * dense.keys.shape[1] * ((n - window) * (d - d_kept) * 4 - d_kept * 8)
        assert report.kept_lengths[layer_idx].eq(n).all()  # every token is kept
    assert report.compressed_layers
    assert layer_memory_bytes(plain) - layer_memory_bytes(cache) == saved > 0

    got = decode_logits(model, cache, batch, n, compressed=True)
    ref = decode_logits(model, zeroed, batch, n)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # The comparison is sensitive: keeping every channel gives other logits.
    full = decode_logits(model, plain, batch, n, steps=0)
    assert (full[0] - got[0]).abs().max() > 1e-4


def test_ratio_zero_keeps_dense_layers():
    model = tiny_model("llama")
    ids = random_ids(16, 2)
    cache, ref = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        with ThinKPress(0.0, window_size=4)(model):
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
    for layer, dense in zip(cache.layers, ref.layers):
        assert type(layer) is type(dense)
        assert torch.equal(layer.keys, dense.keys) and torch.equal(layer.values, dense.values)


@pytest.mark.parametrize("batch", [1, 2])
def test_composed_after_snapkv(batch):
    """SnapKV keeps half the tokens, then ThinK prunes channels of what SnapKV kept."""
    model = llama(2)
    n, window = 20, 4
    ids = random_ids(n, batch, seed=batch)
    snap = SnapKVPress(0.5, window_size=window)
    snap_cache = DynamicCache(config=model.config)
    hidden = layer_inputs(model, ids, snap_cache, snap)
    cache = DynamicCache(config=model.config)
    layer_inputs(model, ids, cache, ComposedPress([snap, ThinKPress(0.5, window_size=window)]))
    n_kept = round(n * 0.5)
    for layer_idx, layer in enumerate(cache.layers):
        kept_keys = snap_cache.layers[layer_idx].keys  # what SnapKV alone keeps, in its order
        ref = reference_scores(model, layer_idx, hidden[layer_idx], kept_keys, window)
        channels = ref.topk(8, dim=-1).indices.sort(dim=-1).values
        assert isinstance(layer, ChannelPrunedLayer)
        assert torch.equal(layer.key_channels, channels)
        assert layer.get_seq_length() == n_kept and layer.n_pruned == n_kept - window
        snap_cache.layers[layer_idx].keys = zero_pruned_channels(kept_keys, channels, n_kept - window)
        dense_k, dense_v = layer.dense_keys_values()
        torch.testing.assert_close(dense_k, snap_cache.layers[layer_idx].keys, rtol=0, atol=0)
        torch.testing.assert_close(dense_v, snap_cache.layers[layer_idx].values, rtol=0, atol=0)
    got = decode_logits(model, cache, batch, n, compressed=True)
    ref = decode_logits(model, snap_cache, batch, n, compressed=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_snapshot_restore_round_trip():
    model = tiny_model("qwen3")
    n, batch = 18, 2
    ids = random_ids(n, batch, seed=3)
    cache = DynamicCache(config=model.config)
    empty = snapshot_cache(cache)
    dense_types = [type(layer) for layer in cache.layers]
    with torch.no_grad(), ThinKPress(0.25, window_size=3)(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    compressed = snapshot_cache(cache)
    bytes_after_prefill = layer_memory_bytes(cache)
    first = decode_logits(model, cache, batch, n, compressed=True)
    assert layer_memory_bytes(cache) > bytes_after_prefill
    restore_cache(cache, compressed)
    assert layer_memory_bytes(cache) == bytes_after_prefill and cache.get_seq_length() == n
    again = decode_logits(model, cache, batch, n, compressed=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # Back to before the prefill (one compression per question): the dense layers return, empty.
    restore_cache(cache, empty)
    assert [type(layer) for layer in cache.layers] == dense_types and cache.get_seq_length() == 0
    with torch.no_grad(), ThinKPress(0.25, window_size=3)(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    for a, b in zip(first, decode_logits(model, cache, batch, n, compressed=True)):
        assert torch.equal(a, b)


def test_capabilities_and_bad_parameters():
    assert ThinKPress(0.5).capabilities.prunes_channels
    for bad in (-0.1, 1.0, 1.5, "0.5", float("nan"), True):
        with pytest.raises(ValueError, match="key_channel_compression_ratio"):
            ThinKPress(bad)
    for bad in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match="window_size"):
            ThinKPress(0.5, window_size=bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="window_size=32 is larger than the context"), ThinKPress(0.5)(model):
        model.model(input_ids=random_ids(20), **cache_kwargs(model.model, DynamicCache(config=model.config)))
