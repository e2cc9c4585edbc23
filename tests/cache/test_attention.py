"""The "kvpress" attention function against a dense float64 reference, and in a model after compression."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpress.cache.attention import causal_suffix_mask, compressed_attention, kvpress_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.knorm_press import KnormPress
from tests.conftest import random_ids, tiny_model


class _Module(torch.nn.Module):
    pass


def _reference(q, k, v, scale, window=None):
    """Dense attention in float64: the last q_len keys are the queries' own tokens."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    q_len, kv_len = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) * scale
    for i in range(q_len):
        pos = kv_len - q_len + i
        for j in range(kv_len):
            if j > pos or (window is not None and pos - j >= window):
                logits[..., i, j] = float("-inf")
    return (logits.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("q_len", [1, 2, 7])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_dense_reference(groups, q_len, window, dtype):
    g = torch.Generator().manual_seed(q_len * 10 + groups)
    b, hkv, d, kv_len = 2, 2, 16, 13
    q = torch.randn(b, hkv * groups, q_len, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, kv_len, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, kv_len, d, generator=g).to(dtype)
    out, weights = kvpress_attention(_Module(), q, k, v, None, scaling=d**-0.5, sliding_window=window)
    assert weights is None and out.dtype == dtype and out.shape == (b, q_len, hkv * groups, d)
    ref = _reference(q, k, v, d**-0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_mask_is_none_for_single_token_without_window():
    assert causal_suffix_mask(1, 10, torch.device("cpu")) is None
    assert causal_suffix_mask(1, 10, torch.device("cpu"), sliding_window=20) is None
    m = causal_suffix_mask(3, 5, torch.device("cpu"))
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_rejects_softcap_and_external_mask():
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="soft-capping"):
        kvpress_attention(_Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="attention_mask=None"):
        kvpress_attention(_Module(), q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool))


def test_registration_is_lazy_and_restores_implementation():
    model = tiny_model("llama", "eager")
    with compressed_attention(model):
        assert model.config._attn_implementation == "kvpress"
        assert "kvpress" in ALL_ATTENTION_FUNCTIONS
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoding_after_uniform_compression_matches_standard_attention(arch, attn):
    """With equal lengths in every layer the standard mask is right, so both paths must agree."""
    model = tiny_model(arch, attn)
    cache_a, cache_b = DynamicCache(config=model.config), DynamicCache(config=model.config)
    ids = random_ids(30)
    question = random_ids(5, seed=3)
    positions = torch.arange(30, 35)[None]
    with torch.no_grad():
        for cache in (cache_a, cache_b):
            with KnormPress(0.5)(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        ref = model(input_ids=question, **cache_kwargs(model, cache_a), position_ids=positions).logits
        with compressed_attention(model):
            out = model(input_ids=question, **cache_kwargs(model, cache_b), position_ids=positions).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
