"""SmolLM2-135M-Instruct (offline): AdaKV into a VarlenCache decodes exactly like a dense cache with pruned positions hidden.

The compressed run prefills a ~1500-token needle context under ``AdaKVPress(SnapKVPress(0.5))``, so every (layer,
kv-head) keeps its own number of tokens in ragged storage, then decodes greedily under the ``"kvpress"`` attention
function. The reference prefills the same prompt uncompressed into a ``DynamicCache`` and decodes with a float64
attention function that hides, per (layer, kv-head), the positions AdaKV dropped; those positions are recomputed
here from the inner SnapKV scores and a greedy per-head allocation (``tests/cache/test_varlen_cache.py``).
SnapKV runs without pooling (``kernel_size=1``): max-pooled scores tie between neighbours, and a tie at the budget's
edge would leave the reference's choice of positions ambiguous.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.needle import PASSKEY_NEEDLE, PASSKEY_QUESTION, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.cache.test_varlen_cache import _MASKS, _masked_attention, _reference_budgets

pytestmark = pytest.mark.slow

N_TOKENS = 1500
RATIO = 0.5
ALPHA = 0.2
N_NEW = 12
MASKED = "kvpress_test_masked"
AttentionInterface.register(MASKED, _masked_attention)


@pytest.fixture(scope="session")
def smollm2():
    return load_smollm2()


def _greedy_decode(model, cache, first: torch.Tensor, position: int) -> tuple[list[int], torch.Tensor]:
    """``N_NEW`` greedy steps from token ``first`` ``(1, 1)`` at ``position``: the tokens and their ``(N_NEW, vocab)``
    logits."""
    tokens, logits, token = [], [], first
    for step in range(N_NEW):
        out = model(input_ids=token, **cache_kwargs(model, cache), position_ids=torch.tensor([[position + step]])).logits
        logits.append(out[0, -1])
        token = out[:, -1:].argmax(-1)
        tokens.append(int(token))
    return tokens, torch.stack(logits)


def test_adakv_varlen_decoding_equals_masked_dense_reference(smollm2):
    model, tokenizer = smollm2
    context = build_needle_context(tokenizer, N_TOKENS, PASSKEY_NEEDLE, depth=0.5, seed=0)
    ids = tokenizer(context + " " + PASSKEY_QUESTION, return_tensors="pt").input_ids
    n = ids.shape[1]
    inner = SnapKVPress(RATIO, kernel_size=1)
    press = AdaKVPress(inner, alpha_safeguard=ALPHA)
    kept_per_head = round(n * (1 - RATIO))
    cfg = model.config
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    assert len(layers) == cfg.num_hidden_layers

    # Reference prefill: full cache, with every attention layer's inputs captured to recompute the press's scores.
    full = DynamicCache(config=cfg)
    captured = {}

    def grab(module, args, kwargs, output):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            ref_prefill = model(input_ids=ids, **cache_kwargs(model, full)).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    _MASKS.clear()
    expected = {}
    for m in layers:
        hidden, position_embeddings = captured[m.layer_idx]
        keys, values = full.layers[m.layer_idx].keys, full.layers[m.layer_idx].values
        with torch.no_grad():
            scores = inner.score(m, hidden, keys, values, None, {"position_embeddings": position_embeddings}).float()
        lengths = _reference_budgets(scores, kept_per_head, ALPHA)
        order = scores.argsort(dim=-1, descending=True)
        mask = torch.zeros(1, keys.shape[1], n, dtype=torch.bool)
        for h in range(keys.shape[1]):
            mask[0, h, order[0, h, : lengths[0, h]]] = True
        _MASKS[m.layer_idx] = mask
        expected[m.layer_idx] = lengths
    del captured

    # Compressed prefill into ragged storage.
    cache = VarlenCache(config=cfg)
    with torch.no_grad(), press(model) as report:
        prefill = model(input_ids=ids, **cache_kwargs(model, cache)).logits[0, -1]
    torch.testing.assert_close(prefill, ref_prefill)  # compression acts after each layer's own prefill attention
    varying = 0
    for idx, lengths in expected.items():
        assert torch.equal(report.kept_lengths[idx], lengths)
        assert torch.equal(cache.head_lengths(idx), lengths)
        assert int(lengths.sum()) == cfg.num_key_value_heads * kept_per_head
        varying += int(lengths.max() > lengths.min())
    assert varying == cfg.num_hidden_layers  # head-adaptive: every layer splits its budget unevenly between heads

    # Memory: exactly the kept tokens (float32 keys and values) plus the int32 metadata of each layer:
    # cu_seqlens (batch * kv_heads + 1 entries) and tail_lens (batch entries), i.e. 4 * (1 * 3 + 1) + 4 * 1 = 20 bytes.
    token_bytes = 2 * cfg.head_dim * 4  # one token of one kv head: key + value, float32
    metadata = cfg.num_hidden_layers * (4 * (cfg.num_key_value_heads + 1) + 4)
    assert metadata == 600
    kept_tokens = cfg.num_hidden_layers * cfg.num_key_value_heads * kept_per_head
    full_bytes = cfg.num_hidden_layers * cfg.num_key_value_heads * n * token_bytes
    assert cache.memory_bytes() == kept_tokens * token_bytes + metadata
    assert abs(cache.memory_bytes() - metadata - (1 - RATIO) * full_bytes) <= 0.02 * full_bytes

    # Greedy decoding: ragged cache under the "kvpress" attention vs the dense cache under the masked reference.
    first = prefill.argmax().view(1, 1)
    with torch.no_grad(), compressed_attention(model):
        tokens, logits = _greedy_decode(model, cache, first, n)
    previous = model.config._attn_implementation
    model.set_attn_implementation(MASKED)
    try:
        with torch.no_grad():
            ref_tokens, ref_logits = _greedy_decode(model, full, first, n)
    finally:
        model.set_attn_implementation(previous)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # Decoding appended N_NEW tokens to every head; the tail holds them in its first allocation (16 slots).
    for idx, lengths in expected.items():
        assert torch.equal(cache.head_lengths(idx), lengths + N_NEW)
    tail_bytes = cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * token_bytes
    assert cache.memory_bytes() == kept_tokens * token_bytes + tail_bytes + metadata
