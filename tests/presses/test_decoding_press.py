"""DecodingPress and PrefillDecodingPress: the cache stays within ``target_size + compression_interval`` tokens per
head however long the output, the tokens equal a plain loop that re-compresses by hand, the scorer sees the last
generated tokens' hidden states at their own positions, and bad arguments are refused."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext, prefill
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.decoding_press import DecodingPress, _Buffer
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.report import CompressionReport
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.presses.ragged_layers import ragged_layer

INTERVAL, TARGET, STEPS = 5, 12, 30


def knorm_by_hand(model, context, tail, steps=STEPS, interval=INTERVAL, target=TARGET, prefill_ratio=0.0):
    """Greedy loop that re-compresses every layer by key norm (lowest kept) every ``interval`` appended tokens.
    Returns the tokens and the cache length after each forward (before its re-compression)."""
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, context, cache, KnormPress(prefill_ratio) if prefill_ratio else None)
    tokens, lengths, count = [], [], 0
    feed = tail
    with torch.no_grad(), compressed_attention(model):
        for _ in range(steps):
            n = feed.shape[1]
            pos = torch.arange(position, position + n)[None]
            logits = model(input_ids=feed, **cache_kwargs(model, cache), position_ids=pos, logits_to_keep=1).logits
            position += n
            count += n
            lengths.append(cache.get_seq_length())
            if count >= interval:
                count = 0
                for layer in cache.layers:
                    if layer.keys.shape[-2] > target:
                        keep = (-layer.keys.norm(dim=-1)).topk(target, dim=-1).indices.sort(-1).values
                        idx = keep[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
            feed = logits[:, -1:].argmax(-1)
            tokens.append(int(feed))
    return tokens, lengths


def lengths_while_decoding(model):
    """Forward hook on the decoder recording the cache length after every forward."""
    seen = []
    handle = model.model.register_forward_hook(
        lambda m, a, kw, out: seen.append(out.past_key_values.get_seq_length()), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_bounded_cache_and_tokens_equal_a_loop_that_compresses_by_hand(arch):
    model = tiny_model(arch)
    context, tail = random_ids(40, seed=1), random_ids(3, seed=2)
    want, lengths = knorm_by_hand(model, context, tail)
    # 40 + 3 + 1 + 1 tokens before the first re-compression (after 5 appended), then never above TARGET + INTERVAL.
    assert lengths[:3] == [43, 44, 45] and max(lengths[3:]) == TARGET + INTERVAL
    press = DecodingPress(KnormPress(), compression_interval=INTERVAL, target_size=TARGET)
    ctx = CompressedContext.prefill(model, context, press)
    assert ctx.cache.get_seq_length() == 40  # the prompt is left whole
    seen, handle = lengths_while_decoding(model)
    try:
        got = ctx.generate([tail], STEPS, eos_ids=[])[0]
    finally:
        handle.remove()
    assert got == want
    # The decoder's output: after the layers' re-compression (hooks run inside the forward), so at most TARGET + 4.
    assert seen[:2] == [43, 44] and max(seen[2:]) == TARGET + INTERVAL - 1 and len(seen) == STEPS
    assert ctx.generate([tail], STEPS, eos_ids=[])[0] == want  # fresh state for every answer


def test_under_model_generate():
    model = tiny_model("llama")
    ids = random_ids(40, seed=3)
    press = DecodingPress(KnormPress(), compression_interval=INTERVAL, target_size=TARGET)
    seen, handle = lengths_while_decoding(model)
    try:
        with torch.no_grad(), press(model) as report:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS,
                                 min_new_tokens=STEPS, pad_token_id=0)  # fmt: skip
    finally:
        handle.remove()
    assert seen[0] == 40  # generate's prefill is left whole
    assert max(seen[INTERVAL:]) <= TARGET + INTERVAL
    assert set(report.decode_compressions) == set(range(len(attention_layers(model))))
    # Same tokens as the hand loop fed with generate's first token (computed from the whole prompt).
    want, _ = knorm_by_hand(model, ids, out[:, 40:41], steps=STEPS - 1)
    assert out[0, 41:].tolist() == want


@dataclass
class _Spy(ScorerPress):
    """Key-norm scores; records what each re-compression received (the list survives the budget replacement)."""

    calls: list = field(default_factory=list)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.calls.append((module.layer_idx, hidden_states.clone(), kwargs["position_embeddings"], keys.shape[-2]))
        return -keys.norm(dim=-1)


def test_scorer_sees_the_last_generated_tokens_at_their_positions():
    model = tiny_model("llama")
    calls = []
    press = DecodingPress(_Spy(calls=calls), compression_interval=4, target_size=10, hidden_states_buffer=6)
    inputs = {}
    layer0 = attention_layers(model)[0]
    handle = layer0.register_forward_pre_hook(
        lambda m, a, kw: inputs.setdefault("h", []).append(kw["hidden_states"][0].clone()), with_kwargs=True
    )
    try:
        ctx = CompressedContext.prefill(model, random_ids(20, seed=4), press)
        ctx.generate([random_ids(2, seed=5)], 9, eos_ids=[])
    finally:
        handle.remove()
    first = [c for c in calls if c[0] == 0]
    # Forwards: the 2-token question then 1 token each; re-compressions after 4 and 8 appended tokens.
    assert len(first) == 2
    fed = torch.cat(inputs["h"][1:], dim=0)  # layer-0 inputs of every decode forward (prefill excluded), in order
    for (_, hidden, (cos, _sin), n), appended in zip(first, (4, 8)):
        assert torch.equal(hidden[0], fed[appended - hidden.shape[1] : appended])
        assert hidden.shape[1] == min(6, appended)
        positions = torch.arange(20 + appended - hidden.shape[1], 20 + appended)[None]
        want_cos, _ = model.model.rotary_emb(hidden, positions)
        torch.testing.assert_close(cos, want_cos)
    assert first[0][3] == 24 and first[1][3] == 14  # 20 + 4 tokens, then 10 kept + 4


def test_prefill_decoding_press_compresses_both_phases():
    model = tiny_model("llama")
    context, tail = random_ids(40, seed=6), random_ids(3, seed=7)
    press = PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), INTERVAL, TARGET))
    assert press.capabilities.phase == "both"
    ctx = CompressedContext.prefill(model, context, press)
    assert ctx.cache.get_seq_length() == 20 and ctx.summaries[0].compression_ratio == 0.5
    want, _ = knorm_by_hand(model, context, tail, prefill_ratio=0.5)
    assert ctx.generate([tail], STEPS, eos_ids=[])[0] == want


def test_bad_arguments():
    with pytest.raises(ValueError, match="press must be a ScorerPress"):
        DecodingPress(AdaKVPress(KnormPress(0.5)))
    with pytest.raises(ValueError, match="reads the attention weights"):
        DecodingPress(ObservedAttentionPress())
    for name in ("compression_interval", "target_size", "hidden_states_buffer"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
            DecodingPress(KnormPress(), **{name: 0})
    with pytest.raises(ValueError, match="hidden_states_buffer=16 is smaller than the scorer's window_size=32"):
        DecodingPress(SnapKVPress(window_size=32), hidden_states_buffer=16)
    with pytest.raises(ValueError, match="decoding_press must be a decode-phase press, got KnormPress"):
        PrefillDecodingPress(KnormPress(0.5), KnormPress(0.5))
    with pytest.raises(ValueError, match="prefill_press must be a prefill-phase press, got DecodingPress"):
        PrefillDecodingPress(DecodingPress(KnormPress()), DecodingPress(KnormPress()))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cuda_graph=True decodes from a VarlenCache"):
        CompressedContext.prefill(model, random_ids(20), DecodingPress(KnormPress())).generate(
            [random_ids(2)], 3, eos_ids=[], cuda_graph=True
        )
    streaming = DecodingPress(KnormPress(), rerotate=True)
    with pytest.raises(ValueError, match=r"with a DecodingPress \(rerotate=False\).*DecodingPress \(rerotate=True\)"):
        CompressedContext.prefill(model, random_ids(20), streaming).generate([random_ids(2)], 3, [], cuda_graph=True)


def test_streaming_llm_as_published_keeps_cache_positions():
    """Sinks plus a rolling window, evicting at every step, positions inside the cache: after generating, layer 0's
    cache holds exactly the keys the model computes for the kept tokens at positions 0..target-1 (layer 0's keys
    depend on the token and its position only), however far generation went past the cache size."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvpress.presses.streaming_llm_press import StreamingLLMPress

    model = tiny_model("llama")
    ids, target, steps = random_ids(20, seed=8), 10, 25
    press = DecodingPress(StreamingLLMPress(n_sink=4), compression_interval=1, target_size=target, rerotate=True)
    assert press.capabilities.rerotates_positions
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    cache = out["cache" if "cache" in out else "past_key_values"]
    assert cache.get_seq_length() == target
    seq = out.sequences[0, : 20 + steps - 1]  # the last token was generated but never fed
    kept = torch.cat([seq[:4], seq[-(target - 4) :]])
    attn = attention_layers(model)[0]
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(kept[None]))
        k = attn.k_proj(h).view(1, target, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(target)[None])
        want, _ = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(cache.layers[0].keys, want, atol=1e-5, rtol=1e-5)


def test_rerotation_refusals():
    with pytest.raises(ValueError, match="sliding-window layers"):
        with DecodingPress(KnormPress(), rerotate=True)(tiny_model("gemma3")):
            pass
    with pytest.raises(ValueError, match=r"wrap the prefill press, KeyRerotationPress\(KnormPress\(...\)\)"):
        PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), rerotate=True))
    with pytest.raises(ValueError, match="rerotate must be True or False"):
        DecodingPress(KnormPress(), rerotate=1)


def test_decode_time_presses_refuse_quantized_caches_at_the_first_decode_step():
    model = tiny_model("llama", head_dim=32)
    ids = random_ids(20, seed=9)
    for press, match in ((H2OPress(target_size=8), r"evicts while decoding layers that store whole tokens .* Quantized"),
                         (DecodingPress(KnormPress(), 4, 8), r"re-compresses while decoding layers that store whole "
                          r"tokens .* Quantized")):  # fmt: skip
        quantized = QuantizedCache(config=model.config, quantization=QuantizationConfig(group_size=32))
        with pytest.raises(ValueError, match=match):
            with torch.no_grad(), press(model):
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=0, **cache_kwargs(model, quantized))  # fmt: skip


# ---- head-variable (ragged) layers -------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", [KnormPress(), SnapKVPress(window_size=4, kernel_size=1)], ids=["knorm", "snapkv"])
def test_ragged_recompression_scores_each_head_over_its_own_tokens(scorer):
    model = tiny_model("llama")
    module = attention_layers(model)[1]
    lengths, tail, target = [[30, 9], [17, 41]], 6, 20
    cache, heads = ragged_layer(model, lengths, tail, seed=4)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=gen)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(100, 108)[None].expand(2, 8))
    press = DecodingPress(scorer, compression_interval=4, target_size=target, hidden_states_buffer=8)
    buffer = _Buffer(hidden, *position_embeddings)
    press.recompress(module, cache, buffer, {}, CompressionReport(n_layers=3))
    layer = cache.layers[1]
    assert layer.seg_lens.tolist() == [[min(n + tail, target) for n in row] for row in lengths]
    assert layer.tail_len == 0
    cu = layer.cu_seqlens.tolist()
    for s, (keys, values) in enumerate(heads):
        b, h = divmod(s, 2)
        n = keys.shape[0]
        if n <= target:
            kept = torch.arange(n)
        else:  # the scorer on this head's tokens alone, placed in every head (a head's score reads its own only)
            rep_k, rep_v = keys.expand(2, 2, n, -1), values.expand(2, 2, n, -1)
            scores = scorer.score(module, hidden, rep_k, rep_v, None, {"position_embeddings": position_embeddings})
            kept = scores[b, h].topk(target).indices.sort().values
        torch.testing.assert_close(layer.seg_k[cu[s] : cu[s + 1]], keys[kept], rtol=0, atol=0)
        torch.testing.assert_close(layer.seg_v[cu[s] : cu[s + 1]], values[kept], rtol=0, atol=0)


def test_head_variable_prefill_then_bounded_decoding_under_generate():
    model = tiny_model("llama")
    ids = random_ids(64, seed=6)
    cache = VarlenCache(config=model.config)
    interval, target = 4, 24
    press = PrefillDecodingPress(AdaKVPress(KnormPress(0.5)),
                                 DecodingPress(SnapKVPress(window_size=4), interval, target, hidden_states_buffer=8))  # fmt: skip
    assert press.capabilities.head_variable and press.capabilities.decodes_head_variable
    bytes_seen = []

    def watch(module, args, kwargs, output):
        bytes_seen.append(cache.layers[module.layer_idx].memory_bytes())

    handles = [m.register_forward_hook(watch, with_kwargs=True) for m in attention_layers(model)]
    try:
        with torch.no_grad(), press(model) as report:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                           do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    for layer in cache.layers:
        assert (layer.seg_lens <= target).all() and layer.tail_len < interval
    assert all(count >= 8 for count in report.decode_compressions.values())
    # Whole-token bytes of target + interval tokens per head, plus the tail's doubling slack and the metadata.
    d, heads = model.config.head_dim, model.config.num_key_value_heads
    bound = 2 * heads * d * 4 * (target + 2 * max(interval, 16)) + 64
    assert max(bytes_seen[len(attention_layers(model)) * 2 :]) <= bound


def test_uniform_ragged_cache_decodes_like_the_dense_cache():
    model = tiny_model("qwen3")
    ids, tail = random_ids(48, seed=7), random_ids(4, seed=8)
    press = PrefillDecodingPress(KnormPress(0.5), DecodingPress(KnormPress(), 4, 16, hidden_states_buffer=1))
    dense = CompressedContext.prefill(model, ids, press).generate([tail], 20, eos_ids=[])
    ragged_cache = VarlenCache(config=model.config)
    ragged = CompressedContext.prefill(model, ids, press, cache=ragged_cache, compact=True).generate([tail], 20, [])
    assert ragged == dense
