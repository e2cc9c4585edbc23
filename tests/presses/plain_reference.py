"""Plain-torch references shared by the press tests.

- :class:`ProjectionPress`: a scorer whose ranking the tests recompute in float64 (key norms tie under k_norm).
- :func:`snapkv_reference`: SnapKV's window scores in float64 from recorded queries.
- :func:`plain_attention`: a float64 attention function with masks written out token by token, registered with
  transformers under its own name, so a model forward runs through it (it also records each layer's queries).
- :func:`dense_prefill`: the uncompressed cache and the queries of a prefill.
- :func:`recover_indices`: which original tokens a compressed cache holds (for presses that reorder tokens).
- :func:`assert_decode_matches_reference`: decoding from a compressed cache with kvpress attention equals the same
  cache run through :func:`plain_attention`.
- :func:`assert_pipeline_matches_plain_decoding`: the text pipeline's answer under a press equals greedy decoding
  through :func:`plain_attention` from the same compressed context.
- :func:`assert_hooks_removed_after_error`: ``with press(model)`` leaves no hook behind when the block raises.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import attention_layers

PLAIN = "kvpress_test_plain"


def projection_scores(keys: torch.Tensor, seed: int) -> torch.Tensor:
    """``(b, h, n)`` scores: each key's projection on a fixed random direction (in the dtype of ``keys``)."""
    direction = torch.randn(keys.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys @ direction.to(keys.dtype)


@dataclass
class ProjectionPress(ScorerPress):
    """Scores keys by :func:`projection_scores`: well separated on every architecture, easy to recompute."""

    seed: int = 0

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return projection_scores(keys.float(), self.seed)


def plain_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs
):
    """float64 softmax attention; the ``q_len`` queries are the last ``q_len`` of the layer's ``kv_len`` slots."""
    assert softcap is None
    q, k, v = (t.double() for t in (query, key, value))
    b, n_q, q_len, d = q.shape
    kv_len = k.shape[2]
    group = n_q // k.shape[1]
    k = torch.stack([k[:, h // group] for h in range(n_q)], dim=1)  # query head h reads kv head h // group
    v = torch.stack([v[:, h // group] for h in range(n_q)], dim=1)
    scale = scaling if scaling is not None else d**-0.5
    logits = q @ k.transpose(-1, -2) * scale
    allowed = []
    for i in range(q_len):
        slot = kv_len - q_len + i
        allowed.append([j <= slot and (not sliding_window or slot - j < sliding_window) for j in range(kv_len)])
    logits = logits.masked_fill(~torch.tensor(allowed), float("-inf"))
    out = logits.softmax(dim=-1) @ v
    _RECORDS[module.layer_idx] = (query.detach().clone(), scale)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


_RECORDS: dict = {}


@contextlib.contextmanager
def plain_attention_model(model):
    """Run ``model`` through :func:`plain_attention`; yields ``{layer_idx: (post-RoPE queries, scaling)}``."""
    AttentionInterface.register(PLAIN, plain_attention)
    previous = model.config._attn_implementation
    _RECORDS.clear()
    model.set_attn_implementation(PLAIN)
    try:
        yield _RECORDS
    finally:
        model.set_attn_implementation(previous)


def dense_prefill(model, ids):
    """Uncompressed prefill through :func:`plain_attention`: ``({layer: (keys, values)}, {layer: (queries, scaling)})``.

    Only layers whose cache holds every token (not sliding-window layers) are returned.
    """
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), plain_attention_model(model) as records:
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        records = dict(records)
    kv = {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers) if layer.keys.shape[2] == ids.shape[1]}
    return kv, records


def compressed_prefill(model, press, ids):
    """Prefill ``ids`` under ``press``: ``(cache, report)``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) as report:
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    return cache, report


def gather(x, indices):
    """``x`` ``(b, h, n, d)``, ``indices`` ``(b, h, k)`` -> ``(b, h, k, d)``, by explicit loops."""
    b, h, k = indices.shape
    return torch.stack([torch.stack([x[i, j, indices[i, j]] for j in range(h)]) for i in range(b)])


def recover_indices(dense_keys, kept_keys, atol=1e-4):
    """Original positions ``(b, h, k)`` of ``kept_keys`` among ``dense_keys`` (nearest key, asserted near-exact)."""
    dist = torch.cdist(kept_keys.double(), dense_keys.double())  # (b, h, k, n)
    best = dist.min(dim=-1)
    assert best.values.max() < atol, f"a kept key matches no original key (distance {best.values.max():.2e})"
    return best.indices


def assert_decode_matches_reference(model, cache, new_ids, start, atol=1e-5):
    """Decode ``new_ids`` (several tokens, causal among themselves) at positions ``start...`` from ``cache``.

    Compares the logits of the kvpress attention function against :func:`plain_attention` on a copy of the same
    compressed cache; returns the logits.
    """
    reference_cache = copy.deepcopy(cache)
    positions = torch.arange(start, start + new_ids.shape[1])[None]
    with torch.no_grad():
        with compressed_attention(model):
            out = model(input_ids=new_ids, **cache_kwargs(model, cache), position_ids=positions).logits
        with plain_attention_model(model):
            ref = model(input_ids=new_ids, **cache_kwargs(model, reference_cache), position_ids=positions).logits
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    return out


def assert_pipeline_matches_plain_decoding(press, arch="llama", max_new_tokens=6):
    """Run ``pipeline("kv-press-text-generation")`` under ``press`` and check its answer against plain decoding.

    The reference prefills the pipeline's plain-text prompt (BOS + context) under ``press``, then decodes the question
    greedily through :func:`plain_attention`. Returns the per-layer lengths of the compressed context.
    """
    from tests.fixtures_pipeline import eos_ids, random_text, text_pipeline

    pipe = text_pipeline(arch)
    model, tok = pipe.model, pipe.tokenizer
    context, question = random_text(60, seed=1), " Which word comes first?"
    cache = DynamicCache(config=model.config)
    answer = pipe(
        context, question=question, press=press, max_new_tokens=max_new_tokens, use_chat_template=False, cache=cache
    )["answer"]

    encode = lambda text: tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    context_ids, ids = encode((tok.bos_token or "") + context), encode(question + "\n")
    reference, report = compressed_prefill(model, press, context_ids)
    lengths = [layer.keys.shape[2] for layer in reference.layers]
    assert [layer.keys.shape[2] for layer in cache.layers] == lengths  # the pipeline kept the same context
    eos, position, tokens = eos_ids(model, tok), context_ids.shape[1], []
    with torch.no_grad(), plain_attention_model(model):
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + ids.shape[1])[None]
            logits = model(input_ids=ids, **cache_kwargs(model, reference), position_ids=positions).logits
            position += ids.shape[1]
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
            ids = torch.tensor([[token]])
    assert tokens and answer == tok.decode(tokens, skip_special_tokens=True)
    return lengths


def assert_hooks_removed_after_error(model, press, ids):
    """An exception inside ``with press(model)`` propagates and removes every hook."""
    layers = attention_layers(model)

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layers)

    before = n_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            assert n_hooks() > before
            model(input_ids=ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True)
            raise RuntimeError("boom")
    assert n_hooks() == before


def snapkv_reference(queries, scaling, keys, window, kernel, pooling="max", group_reduction="mean"):
    """float64 SnapKV past scores ``(b, kv_heads, n - window)`` from the recorded queries."""
    q = queries[:, :, -window:].double()
    b, n_q = q.shape[:2]
    n_kv, n = keys.shape[1], keys.shape[2]
    group = n_q // n_kv
    k = keys.double().repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-1, -2) * scaling
    for i in range(window):
        logits[:, :, i, n - window + i + 1 :] = float("-inf")
    past = logits.softmax(-1)[..., : n - window].sum(dim=2)
    past = past.view(b, n_kv, group, n - window)
    past = past.mean(dim=2) if group_reduction == "mean" else past.amax(dim=2)
    if kernel > 1:
        padded = F.pad(past, (kernel // 2, kernel // 2), value=float("-inf") if pooling == "max" else 0.0)
        windows = padded.unfold(-1, kernel, 1)  # (b, kv, n - window, kernel): each position's neighbourhood
        # Average pooling divides by the whole kernel, padding included (count_include_pad).
        past = windows.amax(-1) if pooling == "max" else windows.sum(-1) / kernel
    return past
