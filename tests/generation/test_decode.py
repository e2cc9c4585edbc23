"""greedy_decode: from an uncompressed cache it reproduces ``model.generate``; a batch with tails of different lengths
decodes as each sequence alone; bad combinations are refused."""

import copy

import pytest
import torch
from transformers import DynamicCache

import kvpress.generation.decode as decode_module
from kvpress.cache.attention import compressed_attention
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext, decode_chunks, graph_decoding_press, greedy_decode, prefill
from kvpress.generation.graph_decoder import advance_host_tails, check_graph_cache, greedy_step
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model


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


def test_cuda_graph_needs_a_varlen_cache():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, random_ids(10), cache)
    with pytest.raises(ValueError, match="cuda_graph=True decodes from a VarlenCache"):
        greedy_decode(model, cache, [random_ids(2)], [position], 3, eos_ids=[], cuda_graph=True)


class _ReplayedSteps:
    """Stands in for :class:`GraphDecoder` where there is no GPU: each step runs with the layers' Python state as it
    was at construction (what a replayed graph sees), so the decoding is right only if every step's state lives on
    the device, and the press's hooks stay suspended; the recorder's hooks stand for their captured copies."""

    def __init__(self, model, cache, max_new_tokens: int):
        check_graph_cache(cache)
        cache.reserve(max_new_tokens)
        self.model, self.cache = model, cache
        self.frozen = [dict(vars(layer)) for layer in cache.layers]

    def decode(self, ids, positions, n_steps: int, eos_token_id=None):
        if ids is not None:  # else continue where the previous call stopped
            self.ids, self.positions = ids.clone(), positions.clone()
        ids, positions, out = self.ids, self.positions, []
        host = [layer.tail_len for layer in self.cache.layers]  # where the previous call left the host mirrors
        with torch.no_grad(), compressed_attention(self.model):
            for _ in range(n_steps):
                for layer, state in zip(self.cache.layers, self.frozen):
                    vars(layer).update(state)
                greedy_step(self.model, self.cache, ids, positions)
                out.append(ids.clone())
        for layer, state, n in zip(self.cache.layers, self.frozen, host):
            vars(layer).update(state)
            layer.tail_len = n
        advance_host_tails(self.cache, n_steps)
        return torch.cat(out, dim=1)


def _graph_decoder(monkeypatch, model):
    """The real GraphDecoder on a GPU (model moved there), the emulation elsewhere."""
    if torch.cuda.is_available():
        return copy.deepcopy(model).to("cuda")
    monkeypatch.setattr(decode_module, "GraphDecoder", _ReplayedSteps)
    return model


@pytest.mark.parametrize(
    "arch, batch, prefill_press, buffer",
    [("llama", 1, None, 6), ("qwen2", 2, lambda: AdaKVPress(KnormPress(0.5)), 6), ("phi3", 1, lambda: KnormPress(0.3), 4),
     ("llama", 2, None, 4)],
)  # fmt: skip
def test_graph_decoding_under_a_decoding_press_equals_the_eager_loop(monkeypatch, arch, batch, prefill_press, buffer):
    """Replays between re-compressions, the steps' inputs recorded for the press: same tokens, same re-compressed
    cache as the eager loop, whose hooks see every step (interval 5 from a 3-token tail: stretches of 2, 5, ..., 1,
    yielded in chunks of at most 3; a buffer of 4 records fewer steps than a stretch holds)."""
    model = _graph_decoder(monkeypatch, tiny_model(arch))
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
