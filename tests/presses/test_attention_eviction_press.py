"""The shared mechanics of H2O, Scissorhands and CAM on head-variable layers: each head of a VarlenCache layer is
observed and evicted over its own tokens (float64 reference, head by head), a uniform VarlenCache decodes as the
dense cache does, and a head-variable prefill press combines with them, every head bounded (the pipeline:
tests/test_pipeline.py)."""

import pytest
import torch

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext, greedy_decode
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.cam_press import CAMPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.report import CompressionReport
from kvpress.presses.scissorhands_press import ScissorhandsPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.presses.eviction_reference import attention_f64, keep_rule
from tests.presses.ragged_layers import ragged_layer

PRESSES = {
    "h2o": lambda target, interval: H2OPress(target_size=target, recent_ratio=0.25, compression_interval=interval),
    "cam": lambda target, interval: CAMPress(target_size=target, recent_ratio=0.25, compression_interval=interval),
    "scissorhands": lambda target, interval: ScissorhandsPress(
        target_size=target, compression_interval=interval, history_window=5, recent_size=3, n_sink=2
    ),
}


class HeadReference:
    """One (sequence, kv head) of the layer, in float64: its own tokens, statistics and evictions."""

    def __init__(self, name: str, keys, values, target: int, interval: int):
        self.name, self.keys, self.values, self.target, self.interval = name, keys, values, target, interval
        n = keys.shape[0]
        self.score, self.low, self.events, self.steps = torch.zeros(n, dtype=torch.float64), torch.zeros(n), [], 0

    def step(self, key, value, p_of):
        self.keys, self.values = torch.cat([self.keys, key]), torch.cat([self.values, value])
        self.score, self.low = (
            torch.cat([self.score, torch.zeros(1, dtype=torch.float64)]),
            torch.cat([self.low, torch.zeros(1)]),
        )
        self.events = [torch.cat([e, torch.zeros(1, dtype=torch.bool)]) for e in self.events]
        p = p_of(self.keys)  # (n,) this head's attention of the new query
        n = p.shape[0]
        self.score += p
        low = p < 1.0 / n
        self.events = (self.events + [low])[-5:]  # Scissorhands' history window of 5 queries
        self.low = torch.stack(self.events).sum(0).float()
        self.steps += 1
        if self.steps < self.interval or n <= self.target:
            return
        self.steps = 0
        if self.name == "scissorhands":
            kept = keep_rule(-self.low[None, None], self.target, 3, 2)[0, 0]
        else:
            kept = keep_rule(self.score[None, None], self.target, round(0.25 * self.target))[0, 0]
        values = self.values[kept]
        if self.name == "cam":
            out = torch.ones(n, dtype=torch.bool).scatter(0, kept, False)
            p_out = torch.where(out, p, 0.0)
            w = p_out.sum() / p.sum()
            v_e = (p_out[:, None] * self.values.double()).sum(0) / p_out.sum()
            values = ((1 - w) * values.double() + w * v_e).to(values.dtype)
        self.keys, self.values = self.keys[kept], values
        self.score, self.low = self.score[kept], self.low[kept]
        self.events = [e[kept] for e in self.events]


@pytest.mark.parametrize("name", list(PRESSES))
@pytest.mark.parametrize("target, interval", [(20, 1), (16, 3)])
def test_each_ragged_head_is_observed_and_evicted_over_its_own_tokens(name, target, interval):
    model = tiny_model("llama")
    module = attention_layers(model)[1]
    lengths = [[30, 9], [17, 41]]
    cache, heads = ragged_layer(model, lengths, tail=2, seed=21)
    h_kv = model.config.num_key_value_heads
    refs = [HeadReference(name, k, v, target, interval) for k, v in heads]
    press = PRESSES[name](target, interval)
    report = CompressionReport(n_layers=3)
    gen = torch.Generator().manual_seed(22)
    for step in range(12):
        new_k = torch.randn(2, h_kv, 1, model.config.head_dim, generator=gen)
        new_v = torch.randn(new_k.shape, generator=gen)
        hidden = torch.randn(2, 1, model.config.hidden_size, generator=gen)
        pe = model.model.rotary_emb(hidden, torch.full((2, 1), 60 + step))
        cache.layers[1].update(new_k, new_v)
        with torch.no_grad():
            press.forward_hook(module, (), {"hidden_states": hidden, "position_embeddings": pe, "cache": cache},
                               None, report)  # fmt: skip
        for s, ref in enumerate(refs):
            b, h = divmod(s, h_kv)

            def p_of(keys, b=b, h=h):
                one = (hidden[b : b + 1], keys.expand(1, h_kv, -1, -1), tuple(t[b : b + 1] for t in pe))
                return attention_f64(module, one[0], one[1], one[2])[0, h, 0]

            with torch.no_grad():
                ref.step(new_k[b, h], new_v[b, h], p_of)
    keys, values, lengths_now = cache.layers[1].padded_keys_values()
    assert lengths_now.tolist() == [[refs[b * h_kv + h].keys.shape[0] for h in range(h_kv)] for b in range(2)]
    assert int(lengths_now.max()) <= target + interval - 1
    for s, ref in enumerate(refs):
        b, h = divmod(s, h_kv)
        n = ref.keys.shape[0]
        torch.testing.assert_close(keys[b, h, :n], ref.keys, rtol=0, atol=0)
        torch.testing.assert_close(values[b, h, :n], ref.values, rtol=1e-5, atol=1e-5)
    assert report.decode_compressions[1] >= 2


@pytest.mark.parametrize("name", list(PRESSES))
def test_a_uniform_varlen_cache_decodes_as_the_dense_cache(name):
    model = tiny_model("qwen3")
    ids, tail = random_ids(40, seed=23), random_ids(3, seed=24)
    press = PRESSES[name](24, 2)
    dense = CompressedContext.prefill(model, ids, press, cache=None, compact=False)
    assert type(dense.cache).__name__ == "DynamicCache"
    ragged = CompressedContext.prefill(model, ids, press, cache=VarlenCache(config=model.config), compact=True)
    want = dense.generate([tail], 16, eos_ids=[], cuda_graph=False)
    assert ragged.generate([tail], 16, eos_ids=[], cuda_graph=False) == want


def test_head_variable_prefill_then_h2o_keeps_every_head_bounded():
    model = tiny_model("llama")
    ids = random_ids(64, seed=25)
    cache = VarlenCache(config=model.config)
    target = 20
    press = PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), H2OPress(target_size=target))
    assert press.capabilities.head_variable and press.capabilities.decodes_head_variable
    with torch.no_grad(), press(model) as report:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                       do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))  # fmt: skip
    for layer in cache.layers:
        assert layer.ragged and int((layer.seg_lens + layer.tail_len).max()) <= target
    assert all(count >= 10 for count in report.decode_compressions.values())


def test_heads_under_the_target_keep_every_token_and_the_others_stay_at_it():
    model = tiny_model("llama")
    ids, tail, steps, target = random_ids(64, seed=26), random_ids(3, seed=27), 6, 36
    press = PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), H2OPress(target_size=target))
    ctx = CompressedContext.prefill(model, ids, press, cache=VarlenCache(config=model.config), compact=True)
    before = [layer.seg_lens.clone() for layer in ctx.cache.layers]
    assert any(int(lengths.min()) + 3 + steps - 1 < target < int(lengths.max()) for lengths in before)
    with torch.no_grad(), press(model):
        greedy_decode(model, ctx.cache, [tail], ctx.positions, steps, eos_ids=[], cuda_graph=False)
    appended = tail.shape[1] + steps - 1  # the last generated token is not fed back
    for layer, lengths in zip(ctx.cache.layers, before):
        assert (layer.seg_lens + layer.tail_len).tolist() == (lengths + appended).clamp(max=target).tolist()
