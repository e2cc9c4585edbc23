"""greedy_decode: from an uncompressed cache it reproduces ``model.generate``; a batch with tails of different lengths
decodes as each sequence alone; bad combinations are refused."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import (
    CompressedContext,
    decode_chunks,
    graph_decoding_blocker,
    graph_decoding_press,
    greedy_decode,
    prefill,
    resolve_cuda_graph,
)
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.generation.replayed_steps import graph_ready


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_uncompressed_decode_equals_model_generate(arch):
    model = tiny_model(arch)
    ids = random_ids(30, seed=3)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
                              min_new_tokens=7, pad_token_id=0)[0, 30:].tolist()  # fmt: skip
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, ids[:, :26], cache)
    got = greedy_decode(model, cache, [ids[:, 26:]], [position], max_new_tokens=7, eos_ids=[])
    assert got == [want]
    assert cache.get_seq_length() == 30 + 6  # the tail and every answer token but the last were appended


def test_eos_stops_each_sequence():
    model = tiny_model("llama")
    ids = random_ids(20, seed=4)
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, ids[:, :18], cache)
    free = greedy_decode(model, cache, [ids[:, 18:]], [position], 6, eos_ids=[])[0]
    cache = DynamicCache(config=model.config)
    prefill(model, ids[:, :18], cache)
    stopped = greedy_decode(model, cache, [ids[:, 18:]], [position], 6, eos_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_batch_with_tails_of_different_lengths_equals_each_alone():
    model = tiny_model("llama")
    press = AdaKVPress(KnormPress(0.5))
    prompts = [random_ids(n, seed=s) for n, s in ((40, 5), (27, 6))]
    tails = [random_ids(n, seed=s) for n, s in ((3, 7), (6, 8))]
    together = CompressedContext.prefill_batch(model, prompts, press).generate(tails, 5, eos_ids=[])
    alone = [CompressedContext.prefill(model, p, press).generate([t], 5, eos_ids=[])[0] for p, t in zip(prompts, tails)]
    assert together == alone


def test_cuda_graph_needs_cuda_and_a_varlen_cache(monkeypatch):
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, random_ids(10), cache)
    if not torch.cuda.is_available():
        ragged = VarlenCache(config=model.config)
        prefill(model, random_ids(10), ragged, KnormPress(0.5))
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, got cpu"):
            greedy_decode(model, ragged, [random_ids(2)], [position], 3, eos_ids=[], cuda_graph=True)
    model = graph_ready(monkeypatch, model)
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, random_ids(10).to(model.device), cache)
    with pytest.raises(ValueError, match="cuda_graph=True decodes from a VarlenCache"):
        greedy_decode(model, cache, [random_ids(2).to(model.device)], [position], 3, eos_ids=[], cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph must be True, False or None \(automatic\), got 'yes'"):
        greedy_decode(model, cache, [random_ids(2).to(model.device)], [position], 3, eos_ids=[], cuda_graph="yes")


def test_graph_decoding_blocker_names_each_cause():
    from kvpress.presses.h2o_press import H2OPress
    from kvpress.presses.minicache_press import MiniCachePress
    from kvpress.presses.think_press import ThinKPress

    llama = tiny_model("llama")
    device = None if torch.cuda.is_available() else "the model is on cpu, not on a CUDA device"
    assert graph_decoding_blocker(llama) == device
    assert graph_decoding_blocker(llama, KnormPress(0.5)) == device
    assert graph_decoding_blocker(llama, DecodingPress(KnormPress())) == device
    assert "ThinKPress prunes key channels" in graph_decoding_blocker(llama, ThinKPress(0.5))
    assert "MiniCachePress merges layer pairs" in graph_decoding_blocker(llama, MiniCachePress())
    assert "H2OPress acts at every decode step" in graph_decoding_blocker(llama, H2OPress(target_size=8))
    assert "sliding-window layers" in graph_decoding_blocker(tiny_model("gemma3"))
    assert "a DynamicCache grows by concatenation" in graph_decoding_blocker(llama, cache=DynamicCache())
    cache = VarlenCache(config=llama.config)
    assert graph_decoding_blocker(llama, cache=cache) == device  # empty: the prefill fills and compacts it
    prefill(llama, random_ids(12), cache)
    assert graph_decoding_blocker(llama, cache=cache) == "layer 0 of the VarlenCache is dense (call cache.compact() " \
        "after the prefill)"  # fmt: skip
    cache.compact()
    assert graph_decoding_blocker(llama, cache=cache) == device


def test_automatic_decoding_replays_a_graph_where_it_applies_and_says_why_where_not(monkeypatch):
    """``cuda_graph=None`` (the default) on CUDA: a compacted VarlenCache decodes through captured steps, with the
    eager loop's tokens; a DynamicCache falls back to the eager loop with one warning per cause."""
    captures = []
    model = graph_ready(monkeypatch, tiny_model("qwen3"), captures)
    ids, tail = random_ids(40, seed=21).to(model.device), random_ids(4, seed=22).to(model.device)
    tokens = {}
    for mode in (False, None):
        cache = VarlenCache(config=model.config)
        position, _ = prefill(model, ids, cache, AdaKVPress(KnormPress(0.5)))
        cache.compact()
        tokens[mode] = greedy_decode(model, cache, [tail], [position], 9, eos_ids=[], cuda_graph=mode)
        assert len(captures) == (0 if mode is False else 1)
    assert tokens[None] == tokens[False]
    with pytest.warns(UserWarning, match="eager loop .* a DynamicCache grows by concatenation"):
        assert resolve_cuda_graph(None, model, None, DynamicCache()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per cause
        assert resolve_cuda_graph(None, model, None, DynamicCache()) is False
        assert resolve_cuda_graph(False, model, None, DynamicCache()) is False  # chosen: no warning
    assert len(captures) == 1


def test_automatic_decoding_on_cpu_is_the_eager_loop_without_warning():
    model = tiny_model("llama")
    cache = VarlenCache(config=model.config)
    position, _ = prefill(model, random_ids(20), cache, KnormPress(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_cuda_graph(None, model, None, cache) is False
        assert greedy_decode(model, cache, [random_ids(2)], [position], 3, eos_ids=[])  # no warning either


@pytest.mark.parametrize(
    "arch, batch, prefill_press, buffer",
    [("llama", 1, None, 6), ("qwen2", 2, lambda: AdaKVPress(KnormPress(0.5)), 6), ("phi3", 1, lambda: KnormPress(0.3), 4),
     ("llama", 2, None, 4)],
)  # fmt: skip
def test_graph_decoding_under_a_decoding_press_equals_the_eager_loop(monkeypatch, arch, batch, prefill_press, buffer):
    """Replays between re-compressions, the steps' inputs recorded for the press: same tokens, same re-compressed
    cache as the eager loop, whose hooks see every step (interval 5 from a 3-token tail: stretches of 2, 5, ..., 1,
    yielded in chunks of at most 3; a buffer of 4 records fewer steps than a stretch holds)."""
    model = graph_ready(monkeypatch, tiny_model(arch))
    device = model.device
    decoding = DecodingPress(SnapKVPress(window_size=4), compression_interval=5, target_size=14,
                             hidden_states_buffer=buffer)  # fmt: skip
    press = decoding if prefill_press is None else PrefillDecodingPress(prefill_press(), decoding)
    ids, tail = random_ids(30, batch=batch, seed=11).to(device), random_ids(3, batch=batch, seed=12).to(device)
    caches, tokens = [], []
    for cuda_graph in (False, True):
        cache = VarlenCache(config=model.config)
        prefill(model, ids, cache, press if prefill_press is not None else None)
        cache.compact()
        tails = [tail[b : b + 1] for b in range(batch)]
        chunks = decode_chunks(model, cache, tails, [30] * batch, 24, [], cuda_graph=cuda_graph, press=press,
                               chunk_size=3)  # fmt: skip
        tokens.append(torch.cat(list(chunks), dim=1).tolist())
        caches.append(cache)
    assert tokens[0] == tokens[1]
    eager, graph = caches
    for i in range(len(eager.layers)):
        assert torch.equal(eager.head_lengths(i), graph.head_lengths(i))
        assert int(eager.head_lengths(i).max()) <= 14 + 5  # re-compressed: 30 + 3 + 23 tokens were written
        for a, b in zip(eager.layers[i].padded_keys_values(), graph.layers[i].padded_keys_values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_graph_decoding_refuses_presses_that_act_at_every_step():
    from kvpress.presses.h2o_press import H2OPress

    with pytest.raises(ValueError, match="alone or in a PrefillDecodingPress, while H2OPress acts at every step"):
        graph_decoding_press(PrefillDecodingPress(KnormPress(0.5), H2OPress(target_size=32)))
    assert graph_decoding_press(KnormPress(0.5)) is None
    decoding = DecodingPress(KnormPress())
    assert graph_decoding_press(PrefillDecodingPress(KnormPress(0.5), decoding)) is decoding


@pytest.mark.parametrize("dense_layers", [0, 1])
def test_graph_decoding_of_quest_layers_equals_the_eager_loop(monkeypatch, dense_layers):
    """Quest selects pages inside the attention, so replayed steps run it: on CUDA the default decodes a VarlenCache
    whose layers are QuestLayers (and compacted dense layers) through a captured graph, with the eager loop's tokens
    and lengths."""
    from kvpress.cache.quest_layer import QuestLayer
    from kvpress.presses.quest_press import QuestPress

    captures = []
    model = graph_ready(monkeypatch, tiny_model("llama"), captures)
    press = QuestPress(page_size=4, token_budget=16, dense_layers=dense_layers)
    ids, tail = random_ids(60, seed=41).to(model.device), random_ids(3, seed=42).to(model.device)
    tokens, lengths = {}, {}
    for mode in (False, None):
        context = CompressedContext.prefill(model, ids, press, cache=VarlenCache(config=model.config))
        kinds = [type(layer).__name__ for layer in context.cache.layers]
        assert kinds == ["VarlenLayer"] * dense_layers + ["QuestLayer"] * (len(kinds) - dense_layers)
        tokens[mode] = greedy_decode(model, context.cache, [tail], context.positions, 10, eos_ids=[], cuda_graph=mode,
                                     press=press)  # fmt: skip
        lengths[mode] = [layer.get_seq_length() for layer in context.cache.layers]
        quest = [layer for layer in context.cache.layers if isinstance(layer, QuestLayer)]
        assert all(int(layer.paged.lengths.max()) == layer.length == 60 + 3 + 9 for layer in quest)
    assert len(captures) == 1
    assert tokens[None] == tokens[False] and lengths[None] == lengths[False]
