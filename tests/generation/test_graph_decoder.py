"""GraphDecoder: what runs without a GPU — the capture preconditions, in-place lengths, host-mirror bookkeeping.

A CUDA graph replays the captured kernels on the captured tensors and runs no Python. On CPU that is emulated by
putting every layer's attributes back to their values at "capture" (same tensor objects, same host integers) before
each step: the step then sees exactly what a replay sees, so it decodes correctly only if the device-side state
(``tail_lens`` updated in place) carries everything from one step to the next.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation.graph_decoder import GraphDecoder, advance_host_tails, check_graph_cache, greedy_step
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from tests.conftest import random_ids, tiny_model


def _prefill(model, cache, n: int, batch: int, press, seed: int = 0):
    with torch.no_grad(), press(model):
        model.model(input_ids=random_ids(n, batch=batch, seed=seed), **cache_kwargs(model.model, cache))
    return cache


def _eager_greedy(model, cache, token, position: int, steps: int) -> torch.Tensor:
    """Plain greedy loop: a full model forward per token, with the cache's normal Python bookkeeping."""
    out = []
    with torch.no_grad(), compressed_attention(model):
        for i in range(steps):
            pos = torch.full((token.shape[0], 1), position + i)
            logits = model(input_ids=token, **cache_kwargs(model, cache), position_ids=pos, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            out.append(token)
    return torch.cat(out, dim=1)


def _emulated_replays(model, cache, token, position: int, steps: int) -> torch.Tensor:
    """``steps`` greedy steps as graph replays see them: every layer's Python state frozen at capture time."""
    frozen = [dict(vars(layer)) for layer in cache.layers]  # same tensor objects, host integers as captured
    ids, positions = token.clone(), torch.full_like(token, position)
    out = []
    with torch.no_grad(), compressed_attention(model):
        for _ in range(steps):
            for layer, state in zip(cache.layers, frozen):
                vars(layer).update(state)
            greedy_step(model, cache, ids, positions)
            out.append(ids.clone())
    for layer, state in zip(cache.layers, frozen):  # replays leave the host state as the capture left it
        vars(layer).update(state)
    advance_host_tails(cache, steps)
    assert torch.equal(positions, torch.full_like(token, position + steps))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "arch, batch, press",
    [
        ("llama", 1, lambda: KnormPress(0.5)),
        ("qwen2", 3, lambda: AdaKVPress(KnormPress(0.6))),
        ("mistral", 2, lambda: AdaKVPress(KnormPress(0.3))),
        ("qwen3", 2, lambda: KnormPress(0.25)),
        ("phi3", 1, lambda: AdaKVPress(KnormPress(0.5))),
    ],
)
def test_frozen_host_replays_decode_like_eager_loop(arch, batch, press):
    model = tiny_model(arch)
    n, steps = 27 + batch, 7
    cache = _prefill(model, VarlenCache(config=model.config), n, batch, press())
    cache.reserve(2 * steps + 1)  # the graph needs its buffers fixed: no growth during the replays
    token = random_ids(1, batch=batch, seed=4)

    state = snapshot_cache(cache)
    expected = _eager_greedy(model, cache, token, n, steps)
    expected_lengths = [cache.head_lengths(i) for i in range(len(cache.layers))]
    expected_seq = cache.get_seq_length()
    expected_tails = [layer.tail_k[:, :, : layer.tail_len].clone() for layer in cache.layers]
    with torch.no_grad(), compressed_attention(model):
        follow = random_ids(2, batch=batch, seed=5)
        pos = torch.arange(n + steps, n + steps + 2)[None].expand(batch, -1)
        expected_next = model(input_ids=follow, **cache_kwargs(model, cache), position_ids=pos).logits
    restore_cache(cache, state)

    lengths_tensors = [layer.tail_lens for layer in cache.layers]
    got = _emulated_replays(model, cache, token, n, steps)
    assert torch.equal(got, expected)
    # Same tensor objects as at capture, holding the advanced lengths; host mirrors consistent with them.
    assert all(layer.tail_lens is t for layer, t in zip(cache.layers, lengths_tensors))
    assert all(torch.equal(cache.head_lengths(i), expected_lengths[i]) for i in range(len(cache.layers)))
    assert cache.get_seq_length() == expected_seq
    for layer, tail in zip(cache.layers, expected_tails):
        assert layer.tail_len == tail.shape[2]
        assert torch.equal(layer.tail_k[:, :, : layer.tail_len], tail)
    # Eager forwards after the replays append at the right place and see the same cache.
    with torch.no_grad(), compressed_attention(model):
        again = model(input_ids=follow, **cache_kwargs(model, cache), position_ids=pos).logits
    torch.testing.assert_close(again, expected_next, atol=0, rtol=0)


def test_greedy_tokens_match_a_dense_cache_under_a_uniform_press():
    """Independent reference: the same uniform press on transformers' DynamicCache with sdpa attention."""
    model = tiny_model("llama")
    n, batch, steps = 40, 2, 6
    cache = _prefill(model, VarlenCache(config=model.config), n, batch, KnormPress(0.5))
    cache.reserve(steps)
    dense = _prefill(model, DynamicCache(config=model.config), n, batch, KnormPress(0.5))
    token = random_ids(1, batch=batch, seed=8)
    got = _emulated_replays(model, cache, token, n, steps)
    expected = []
    t = token
    with torch.no_grad():
        for i in range(steps):
            logits = model(input_ids=t, **cache_kwargs(model, dense), position_ids=torch.full((batch, 1), n + i)).logits
            t = logits[:, -1:].argmax(-1)
            expected.append(t)
    assert torch.equal(got, torch.cat(expected, dim=1))
    assert cache.get_seq_length() == dense.get_seq_length()


@pytest.mark.parametrize("batch", [1, 3])
def test_appends_and_crop_update_lengths_in_place(batch):
    model = tiny_model("qwen2")
    n = 20
    cache = _prefill(model, VarlenCache(config=model.config), n, batch, AdaKVPress(KnormPress(0.5)))
    tensors = [layer.tail_lens for layer in cache.layers]
    ptrs = [t.data_ptr() for t in tensors]
    g = torch.Generator().manual_seed(batch)
    expected = torch.zeros(batch, dtype=torch.long)
    pos = n
    with torch.no_grad(), compressed_attention(model):
        for q in (3, 1, 4):
            valid = torch.randint(1, q + 1, (batch,), generator=g)  # right-padded questions of different lengths
            cache.new_token_lengths = valid
            ids = random_ids(q, batch=batch, seed=q)
            model(
                input_ids=ids,
                **cache_kwargs(model, cache),
                position_ids=torch.arange(pos, pos + q)[None].expand(batch, -1),
            )
            cache.new_token_lengths = None
            expected += valid
            pos += q
    for layer, t, p in zip(cache.layers, tensors, ptrs):
        assert layer.tail_lens is t and t.data_ptr() == p
        assert torch.equal(t.long(), expected)
        assert layer.tail_len == 8  # host mirror: the padded width of every forward
    for layer in cache.layers:
        layer.crop(-2)
    for layer, t in zip(cache.layers, tensors):
        assert layer.tail_lens is t
        assert torch.equal(t.long(), (expected - 2).clamp_min(0))
        assert layer.tail_len == 6


def test_advance_host_tails_moves_only_the_host_mirror_within_capacity():
    model = tiny_model("llama")
    cache = _prefill(model, VarlenCache(config=model.config), 24, 2, AdaKVPress(KnormPress(0.5)))
    cache.reserve(5)
    capacity = cache.layers[0].tail_k.shape[2]
    seq = cache.get_seq_length()
    heads = [cache.head_lengths(i) for i in range(len(cache.layers))]
    advance_host_tails(cache, 3)
    assert cache.get_seq_length() == seq + 3
    assert all(layer.tail_len == 3 for layer in cache.layers)
    assert all(torch.equal(cache.head_lengths(i), heads[i]) for i in range(len(heads)))  # device lengths untouched
    advance_host_tails(cache, -3)
    assert cache.get_seq_length() == seq
    # All-or-nothing: one layer out of range leaves every layer as it was.
    cache.layers[1].tail_len = 1
    for bad in (capacity, -2):
        with pytest.raises(ValueError, match="n_tokens must keep the tail length in"):
            advance_host_tails(cache, bad)
        assert [layer.tail_len for layer in cache.layers] == [0, 1] + [0] * (len(cache.layers) - 2)
    dense = VarlenCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=random_ids(5), **cache_kwargs(model.model, dense))
    with pytest.raises(ValueError, match="still dense"):
        dense.layers[0].advance_host_tail(1)


def test_capture_preconditions_are_checked_before_the_device():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="VarlenCache"):
        GraphDecoder(model, DynamicCache(config=model.config), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        GraphDecoder(model, VarlenCache(), max_new_tokens=4)
    with pytest.raises(ValueError, match="layer 0 is not compressed"):
        GraphDecoder(model, VarlenCache(config=model.config), max_new_tokens=4)
    uncompressed = VarlenCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=random_ids(10), **cache_kwargs(model.model, uncompressed))
    with pytest.raises(ValueError, match="layer 0 is not compressed"):
        GraphDecoder(model, uncompressed, max_new_tokens=4)
    gemma = tiny_model("gemma3")
    sliding = _prefill(gemma, VarlenCache(config=gemma.config), 12, 1, KnormPress(0.5))
    with pytest.raises(ValueError, match="sliding-window"):
        GraphDecoder(gemma, sliding, max_new_tokens=4)

    cache = _prefill(model, VarlenCache(config=model.config), 16, 1, KnormPress(0.5))
    check_graph_cache(cache)  # a compressed cache is accepted...
    with pytest.raises(ValueError, match="CUDA device"):
        GraphDecoder(model, cache, max_new_tokens=4)  # ...and the CPU refused, before anything is reserved
    assert cache.layers[0].tail_k.shape[2] == 0
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            GraphDecoder(model, cache, max_new_tokens=bad)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1"):
        GraphDecoder(model, cache, max_new_tokens=4, warmup_steps=0)
    cache.new_token_lengths = torch.tensor([1])
    with pytest.raises(ValueError, match="new_token_lengths must be None"):
        GraphDecoder(model, cache, max_new_tokens=4)
