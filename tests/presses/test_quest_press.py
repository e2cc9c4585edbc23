"""`QuestPress`: every full-attention layer past ``dense_layers`` becomes a ``QuestLayer`` after its first forward;
decode steps then read the best pages only (the selection itself is checked against float64 in
``tests/cache/test_quest_layer.py``, the kernels in ``tests/kernels``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import decode_bytes_read
from kvpress.cache.quest_layer import QuestLayer
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation.context import CompressedContext
from kvpress.presses.quest_press import QuestPress
from kvpress.utils import attention_layers, is_sliding_layer
from tests.conftest import random_ids, tiny_model

N, STEPS = 64, 6


def teacher_forced(model, ids, nxt, press):
    """Prefill ``ids``, then one forward per token of ``nxt``; returns the decode logits and the cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        logits = [model(input_ids=nxt[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits
                  for t in range(nxt.shape[1])]  # fmt: skip
    return torch.cat(logits, 1), cache


def test_layers_become_paged_and_a_large_budget_changes_nothing(arch):
    model = tiny_model(arch)
    ids, nxt = random_ids(N), random_ids(STEPS, seed=1)
    plain, _ = teacher_forced(model, ids, nxt, None)
    logits, cache = teacher_forced(model, ids, nxt, QuestPress(page_size=4, token_budget=1024, dense_layers=1))
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    for i, module in enumerate(attention_layers(model)):
        expected = DynamicLayer if i < 1 or is_sliding_layer(module) else QuestLayer
        assert isinstance(cache.layers[i], expected), (i, type(cache.layers[i]))
    assert cache.get_seq_length(len(cache.layers) - 1) == N + STEPS


def test_a_small_budget_reads_pages_only_while_decoding():
    model = tiny_model("llama")
    ids, nxt = random_ids(N), random_ids(STEPS, seed=1)
    plain, _ = teacher_forced(model, ids, nxt, None)
    press = QuestPress(page_size=4, token_budget=16, dense_layers=0)
    logits, cache = teacher_forced(model, ids, nxt, press)
    assert all(layer.sparse_steps == STEPS for layer in cache.layers)
    assert not torch.allclose(logits, plain, atol=1e-4)  # 16 of ~70 tokens read: the output moves
    full = sum(2 * layer.paged.keys[:, :, : layer.length].numel() * 4 for layer in cache.layers)
    assert decode_bytes_read(cache) < full / 2


def test_generate_under_the_press_equals_a_greedy_loop():
    model = tiny_model("qwen3")
    ids = random_ids(N, seed=2)
    press = QuestPress(page_size=8, token_budget=24, dense_layers=1)
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, pad_token_id=0)  # fmt: skip
    tokens = out[0, N:].tolist()
    cache = DynamicCache(config=model.config)
    expected, token = [], None
    with torch.no_grad(), press(model):
        step = ids
        for _ in range(STEPS):
            logits = model(input_ids=step, **cache_kwargs(model, cache), use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            expected.append(int(token))
            step = token
    assert tokens == expected
    assert model.config._attn_implementation == "sdpa"


def test_compressed_context_answers_alike_twice():
    model = tiny_model("llama")
    press = QuestPress(page_size=4, token_budget=16, dense_layers=0)
    context = CompressedContext.prefill(model, random_ids(N, seed=3), press)
    assert all(isinstance(layer, QuestLayer) for layer in context.cache.layers)  # laid out at the prefill
    tail = random_ids(5, seed=4)
    first = context.generate([tail], 8, eos_ids=[])
    second = context.generate([tail], 8, eos_ids=[])
    assert first == second and len(first[0]) == 8
    assert context.cache.get_seq_length() == N


@pytest.mark.parametrize("kwargs, match", [
    (dict(page_size=12), "page_size must be a power of two"),
    (dict(page_size=0), "page_size"),
    (dict(page_size=16, token_budget=16), "token_budget=16 holds 1 page"),
    (dict(recent_pages=-1), "recent_pages"),
    (dict(dense_layers=-1), "dense_layers"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuestPress(**kwargs)


def test_dense_layers_must_leave_a_layer_and_the_cache_must_be_dense():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_layers=3 leaves none"):
        with QuestPress(dense_layers=3)(model):
            pass
    cache = VarlenCache(config=model.config)
    with torch.no_grad():
        model(input_ids=random_ids(8), **cache_kwargs(model, cache), use_cache=True)
    cache.compact()
    with pytest.raises(ValueError, match=r"layer 0 is a VarlenLayer \(compacted\) \(accepted: a DynamicCache"):
        with torch.no_grad(), QuestPress(page_size=4, token_budget=16, dense_layers=0)(model):
            model(input_ids=random_ids(2), **cache_kwargs(model, cache), use_cache=True)
    assert model.config._attn_implementation == "sdpa"
    plain, _ = teacher_forced(model, random_ids(8), random_ids(2, seed=1), None)  # the model still runs
    assert torch.isfinite(plain).all()
