"""KeyRerotationPress: kept keys equal the model's own keys of those tokens at positions 0..k-1 (float64 reference)."""

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Phi3Config

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.key_rerotation_press import KeyRerotationPress, rerotate_keys
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import attention_layers
from tests.conftest import _COMMON, random_ids, tiny_model
from tests.presses.plain_reference import (
    ProjectionPress,
    assert_hooks_removed_after_error,
    compressed_prefill,
    gather,
    projection_scores,
)

ROPE_VARIANTS = {
    # attention scaling 1 + 0.1 ln 4 != 1: cos and sin carry it
    "yarn": lambda: LlamaConfig(
        **_COMMON,
        head_dim=16,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "rope_theta": 1e4,
        },
    ),
    "llama3": lambda: LlamaConfig(
        **_COMMON,
        head_dim=16,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "rope_theta": 1e4,
        },
    ),
    "partial": lambda: Phi3Config(**_COMMON, partial_rotary_factor=0.5),  # half the channels are not rotated
}


@functools.lru_cache(maxsize=None)
def rope_model(variant):
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(ROPE_VARIANTS[variant](), attn_implementation="sdpa").eval()


def attention_inputs(model, ids):
    """``{layer_idx: hidden_states}``: the input of every attention layer in a plain forward."""
    captured = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def keys_at_new_positions(model, layer_idx, hidden, indices):
    """float64 keys the layer computes for tokens ``indices`` ``(b, kv_heads, k)`` placed at positions ``0..k-1``.

    Runs a float64 copy of the attention module on only the kept tokens' inputs, one kv head at a time (heads keep
    different tokens), with the model's rotary embedding evaluated at ``0..k-1``.
    """
    module = copy.deepcopy(attention_layers(model)[layer_idx]).double()
    rotary = model.model.rotary_emb
    b, h, k = indices.shape
    positions = torch.arange(k)[None]
    out = []
    for head in range(h):
        hs = torch.stack([hidden[i, indices[i, head]] for i in range(b)]).double()
        extra = (module.layer_type,) if hasattr(rotary, "layer_types") else ()
        cos, sin = rotary(hs, positions, *extra)
        cache = DynamicCache()
        with torch.no_grad():
            module(hidden_states=hs, position_embeddings=(cos, sin), attention_mask=None, **cache_kwargs(module, cache))
        out.append(cache.layers[layer_idx].keys[:, head])
    return torch.stack(out, dim=1)


def check_against_model_keys(model, batch, n=37, ratio=0.45, seed=0):
    ids = random_ids(n, batch, seed=seed)
    cache, report = compressed_prefill(model, KeyRerotationPress(ProjectionPress(ratio, seed=seed)), ids)
    hidden = attention_inputs(model, ids)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, dense))
    k = round(n * (1 - ratio))
    assert report.compressed_layers
    for i in report.compressed_layers:
        assert torch.equal(report.kept_lengths[i], torch.full((batch, 2), k))
        keys, values = dense.layers[i].keys, dense.layers[i].values
        indices = projection_scores(keys.double(), seed).topk(k, dim=-1).indices.sort(-1).values
        torch.testing.assert_close(cache.layers[i].values, gather(values, indices), atol=1e-6, rtol=1e-6)
        expected = keys_at_new_positions(model, i, hidden[i], indices)
        torch.testing.assert_close(cache.layers[i].keys.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_kept_keys_are_model_keys_at_contiguous_positions(arch, batch):
    if arch == "gemma3":
        pytest.raises(ValueError, KeyRerotationPress(KnormPress(0.5)).validate, tiny_model(arch))
        return
    check_against_model_keys(tiny_model(arch), batch, seed=batch)


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_and_partial_rotary(variant):
    check_against_model_keys(rope_model(variant), batch=2, n=45, ratio=0.3, seed=3)


@pytest.mark.parametrize("scale", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("rot", [16, 8])
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_rerotate_keys_against_explicit_angles(scale, rot, cos_batch):
    g = torch.Generator().manual_seed(rot + cos_batch)
    b, h, n, k, d = 3, 2, 30, 11, 16
    inv_freq = torch.rand(rot // 2, generator=g, dtype=torch.float64) * 2

    def rotate(x, pos):  # x (b, h, k, d) float64, pos (b, h, k): RoPE with scaling s on the first `rot` channels
        ang = pos[..., None].double() * inv_freq
        c, s = ang.cos() * scale, ang.sin() * scale
        x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)

    raw = torch.randn(b, h, k, d, generator=g, dtype=torch.float64)
    old = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b * h)]).view(b, h, k)
    emb = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([emb, emb], dim=-1)[None].expand(cos_batch, n, rot)
    cos, sin = (emb.cos() * scale).float(), (emb.sin() * scale).float()
    got = rerotate_keys(rotate(raw, old).float(), old, (cos, sin))
    expected = rotate(raw, torch.arange(k).expand(b, h, k))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@dataclass
class SuffixPress(ScorerPress):
    """Keeps the most recent tokens."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return torch.arange(keys.shape[2], dtype=torch.float32).expand(keys.shape[:3])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_decoding_continues_at_the_compressed_length(arch):
    """A kept suffix re-rotated to 0..k-1 and decoded from position k attends exactly as the same suffix left at
    n-k..n-1 and decoded from position n: RoPE logits depend on position differences only."""
    model = tiny_model(arch)
    n, q_len, ratio = 30, 3, 0.6
    k = round(n * (1 - ratio))
    ids = random_ids(n + q_len, 2, seed=9)
    press = KeyRerotationPress(SuffixPress(ratio))
    assert press.capabilities.rerotates_positions
    rerotated, _ = compressed_prefill(model, press, ids[:, :n])
    plain, _ = compressed_prefill(model, SuffixPress(ratio), ids[:, :n])
    with torch.no_grad(), compressed_attention(model):
        a = model(input_ids=ids[:, n:], **cache_kwargs(model, rerotated), position_ids=torch.arange(k, k + q_len)[None]).logits
        b = model(input_ids=ids[:, n:], **cache_kwargs(model, plain), position_ids=torch.arange(n, n + q_len)[None]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_no_compression_leaves_keys_in_place():
    model = tiny_model("qwen2")
    ids = random_ids(20, 2)
    cache, _ = compressed_prefill(model, KeyRerotationPress(ProjectionPress(0.0)), ids)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, dense))
    for mine, ref in zip(cache.layers, dense.layers):
        assert torch.equal(mine.keys, ref.keys)


def test_capabilities():
    assert KeyRerotationPress(KnormPress(0.5)).capabilities == Capabilities(rerotates_positions=True)
    inner = SnapKVPress(0.5)
    press = KeyRerotationPress(inner)
    assert press.compression_ratio == 0.5 and not inner.capabilities.rerotates_positions


def test_bad_parameters():
    with pytest.raises(ValueError, match="ScorerPress"):
        KeyRerotationPress(KeyRerotationPress(KnormPress(0.5)))
    # Gemma3's sliding layers keep original positions: refused before any forward.
    model = tiny_model("gemma3")
    with pytest.raises(ValueError, match="2 sliding-window layers"), KeyRerotationPress(KnormPress(0.5))(model):
        pass
    with pytest.raises(ValueError, match="window_size"):
        compressed_prefill(tiny_model("llama"), KeyRerotationPress(SnapKVPress(0.5, window_size=40)), random_ids(20))


def test_hooks_removed_after_error():
    assert_hooks_removed_after_error(tiny_model("qwen3"), KeyRerotationPress(KnormPress(0.5)), random_ids(16))
