"""MiniCachePress: SLERP merging against a float64 formula, retention, decoding from merged pairs, real bytes saved."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.merged_layer import MergedLayer
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.minicache_press import MiniCachePress, merge_layers, slerp_merge
from tests.conftest import random_ids, tiny_model
from tests.fixtures_pipeline import random_text, text_pipeline
from tests.presses.plain_reference import compressed_prefill, plain_attention_model


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float):
    """Token by token in float64: the paper's SLERP of the unit vectors, renormalised."""
    a, b = a.double(), b.double()
    out = torch.empty_like(a)
    distance = torch.empty(a.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in a.shape[:-1]]).tolist():
        idx = tuple(idx) if isinstance(idx, list) else (idx,)
        ua, ub = a[idx] / a[idx].norm(), b[idx] / b[idx].norm()
        theta = math.acos(max(-1.0, min(1.0, float(ua @ ub))))
        if math.sin(theta) < 1e-6:
            mixed = (1 - t) * ua + t * ub
        else:
            mixed = (math.sin((1 - t) * theta) * ua + math.sin(t * theta) * ub) / math.sin(theta)
        out[idx] = mixed / mixed.norm()
        distance[idx] = theta / math.pi
    return out, a.norm(dim=-1), b.norm(dim=-1), distance


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 3, 7, 16)])
def test_slerp_matches_float64_formula(t, shape):
    g = torch.Generator().manual_seed(len(shape) + int(10 * t))
    a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    b[..., 0, :] = 2.5 * a[..., 0, :]  # parallel: LERP fallback
    b[..., 1, :] = -a[..., 1, :] + 1e-9  # nearly opposite
    got = slerp_merge(a.double(), b.double(), t)
    want = slerp_reference(a, b, t)
    for x, y in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got[3], want[3], atol=1e-7, rtol=0)  # acos is steep next to parallel vectors
    ok = want[3] < 0.999  # opposite vectors have no defined midpoint direction
    torch.testing.assert_close(got[0][ok], want[0][ok], atol=1e-7, rtol=1e-7)
    if t in (0.0, 1.0):
        end = a if t == 0.0 else b
        torch.testing.assert_close(got[0], end.double() / end.double().norm(dim=-1, keepdim=True), atol=1e-7, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3, 1.0])
def test_merge_keeps_the_most_different_tokens_exact(gamma):
    g = torch.Generator().manual_seed(int(gamma * 100))
    ka, va, kb, vb = (torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(4))
    merged, retained = merge_layers(ka, va, kb, vb, 0.6, gamma)
    n_ret = math.ceil(gamma * 40)
    assert retained.shape == (2, 2, n_ret) and merged.dir_k.shape == (2, 2, 40 - n_ret, 16)
    direction, norm_a, norm_b, distance = slerp_reference(ka, kb, 0.6)
    kept = torch.zeros(2, 2, 40, dtype=torch.bool).scatter_(-1, retained, True)
    # The retained tokens are those whose key directions differ most.
    assert bool((distance.masked_fill(~kept, 2).amin(-1) >= distance.masked_fill(kept, -1).amax(-1)).all())
    torch.testing.assert_close(merged.keys_a, ka.gather(2, retained[..., None].expand(-1, -1, -1, 16)))
    torch.testing.assert_close(merged.values_b, vb.gather(2, retained[..., None].expand(-1, -1, -1, 16)))
    # The merged ones: one direction per token for both layers, each layer with its own norm.
    rest = (~kept).nonzero()
    idx = rest[:, 2].view(2, 2, -1)
    torch.testing.assert_close(
        merged.dir_k, direction.gather(2, idx[..., None].expand(-1, -1, -1, 16)), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(merged.mag_k_a, norm_a.gather(2, idx))
    torch.testing.assert_close(merged.mag_k_b, norm_b.gather(2, idx))
    v_dir = slerp_reference(va, vb, 0.6)[0]
    torch.testing.assert_close(merged.dir_v, v_dir.gather(2, idx[..., None].expand(-1, -1, -1, 16)), atol=1e-9, rtol=0)


def _dense_copy(cache: DynamicCache) -> DynamicCache:
    """The same cache with every merged layer rebuilt as a plain dense layer (keys = norm x direction)."""
    copy = DynamicCache()
    for layer in cache.layers:
        dense = DynamicLayer()
        keys, values = layer.dense() if isinstance(layer, MergedLayer) else (layer.keys, layer.values)
        dense.lazy_initialization(keys, values)
        dense.keys, dense.values = keys.clone(), values.clone()
        copy.layers.append(dense)
    return copy


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_reads_the_merged_pairs_like_their_dense_rebuild(kv_heads, batch):
    model = tiny_model("llama", kv_heads=kv_heads)
    n = 33
    press = MiniCachePress(start_layer=0, retention_ratio=0.1)
    cache, report = compressed_prefill(model, press, random_ids(n, batch, seed=kv_heads))
    assert report.compressed_layers == [0, 1]
    assert [type(layer) for layer in cache.layers] == [MergedLayer, MergedLayer, DynamicLayer]
    reference = _dense_copy(cache)
    new, positions = random_ids(3, batch, seed=99), torch.arange(n, n + 3)[None]
    with torch.no_grad():
        with compressed_attention(model):  # the merged-attention kernel's path
            logits = model(input_ids=new, **cache_kwargs(model, cache), position_ids=positions).logits
        with plain_attention_model(model):  # float64 attention, token by token, over the dense rebuild
            ref = model(input_ids=new, **cache_kwargs(model, reference), position_ids=positions).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == n + 3


def test_merged_pairs_hold_the_bytes_they_claim():
    model = tiny_model("llama")
    n, batch, gamma = 40, 2, 0.05
    cache, _ = compressed_prefill(model, MiniCachePress(start_layer=1, retention_ratio=gamma), random_ids(n, batch))
    d, h, item = 16, model.config.num_key_value_heads, 4
    r = math.ceil(gamma * n)
    dense_layer = 2 * batch * h * n * d * item
    pair = (
        2 * batch * h * (n - r) * d * item + 2 * (2 * batch * h * (n - r) * item) + 2 * (2 * batch * h * r * d * item)
    )
    assert layer_memory_bytes(cache) == dense_layer + pair  # layer 0 dense, layers 1-2 merged
    assert pair < 0.6 * 2 * dense_layer


def test_pipeline_answers_every_question_from_the_same_merged_context():
    pipe = text_pipeline()
    context = random_text(150)
    press = MiniCachePress(start_layer=1)
    both = pipe(context, questions=["What?", "Where is it?"], press=press, max_new_tokens=5)["answers"]
    alone = [pipe(context, question=q, press=press, max_new_tokens=5)["answer"] for q in ("What?", "Where is it?")]
    assert both == alone
    report = pipe(context, question="What?", press=press, max_new_tokens=2, return_report=True)["report"]
    assert report.memory_ratio < 0.8 and report.cache == "DynamicCache"


def test_bad_parameters_and_incompatible_options_are_named():
    with pytest.raises(ValueError, match="interpolation must be a number in \\[0, 1\\]"):
        MiniCachePress(interpolation=1.5)
    with pytest.raises(ValueError, match="retention_ratio must be a number in \\[0, 1\\]"):
        MiniCachePress(retention_ratio=-0.1)
    with pytest.raises(ValueError, match="start_layer must be a non-negative int or None"):
        MiniCachePress(start_layer=-1)
    pipe = text_pipeline()
    with pytest.raises(ValueError, match="start_layer=7 is beyond the model's 3 layers"):
        pipe("a b c d", question="q", press=MiniCachePress(start_layer=7))
    with pytest.raises(ValueError, match="no two adjacent full-attention layers"):
        pipe("a b c d", question="q", press=MiniCachePress(start_layer=2))
    with pytest.raises(ValueError, match="merges layer pairs, which a quantized cache cannot store"):
        pipe("a b c d " * 20, question="q", press=MiniCachePress(start_layer=1), kv_quantization={"bits": 4})
    from kvpress.cache.varlen_cache import VarlenCache

    with pytest.raises(ValueError, match="merges layer pairs into a transformers DynamicCache; got VarlenCache"):
        pipe("a b c d", question="q", press=MiniCachePress(start_layer=1), cache=VarlenCache(config=pipe.model.config))
    with pytest.raises(ValueError, match="merges layer pairs, which other presses cannot read or feed"):
        from kvpress.presses.composed_press import ComposedPress

        ComposedPress([MiniCachePress(), KnormPress(0.5)])
    # The pipeline still works afterwards.
    assert isinstance(
        pipe("a b c d " * 10, question="q", press=MiniCachePress(start_layer=1), max_new_tokens=2)["answer"], str
    )


@pytest.mark.parametrize(("t", "exact_layer"), [(0.0, 0), (1.0, 1)])
def test_each_layer_keeps_its_own_norms_and_an_endpoint_keeps_its_direction(t, exact_layer):
    # At t = 0 the shared direction is the first layer's, at t = 1 the second's: that layer is then rebuilt exactly.
    model = tiny_model("llama")
    ids = random_ids(30, 2, seed=4)
    dense, _ = compressed_prefill(model, KnormPress(0.0), ids)
    cache, _ = compressed_prefill(model, MiniCachePress(start_layer=0, interpolation=t, retention_ratio=0.0), ids)
    keys, values = cache.layers[exact_layer].dense()
    torch.testing.assert_close(keys, dense.layers[exact_layer].keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, dense.layers[exact_layer].values, atol=1e-5, rtol=1e-5)
    other = 1 - exact_layer
    keys, _ = cache.layers[other].dense()
    torch.testing.assert_close(keys.norm(dim=-1), dense.layers[other].keys.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(keys, dense.layers[other].keys, atol=1e-3)
