"""greedy_decode: from an uncompressed cache it reproduces ``model.generate``; a batch with tails of different lengths
decodes as each sequence alone; bad combinations are refused."""

import pytest
import torch
from transformers import DynamicCache

from kvpress.generation import CompressedContext, greedy_decode, prefill
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
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
