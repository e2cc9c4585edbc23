"""prefill: the cache holds the prompt (compressed under a press), and the next position is where decoding resumes."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import read_layer
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import prefill
from kvpress.generation.prefill import chunk_bounds
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.minicache_press import MiniCachePress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from kvpress.presses.tova_press import TOVAPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_config, tiny_model


def test_without_a_press_the_whole_prompt_is_cached():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, report = prefill(model, random_ids(40), cache)
    assert (position, report) == (40, None)
    assert cache.get_seq_length() == 40


def test_a_press_compresses_and_reports():
    model = tiny_model("qwen2")
    ids = random_ids(40, seed=1)
    cache = DynamicCache(config=model.config)
    position, report = prefill(model, ids, cache, KnormPress(0.25), record_kept=True)
    assert position == 40 and cache.get_seq_length() == 30
    assert abs(report.compression_ratio - 0.25) < 1e-6
    kept = report.kept_indices[0]  # (batch, kv heads, kept) positions of the prompt
    assert kept.shape[-1] == 30 and int(kept.max()) < 40
    # The kept keys are the prefill's own keys at those positions (nothing recomputed).
    full = DynamicCache(config=model.config)
    prefill(model, ids, full)
    idx = kept[..., None].expand(-1, -1, -1, full.layers[0].keys.shape[-1])
    torch.testing.assert_close(cache.layers[0].keys, full.layers[0].keys.gather(2, idx))


def test_rerotated_keys_continue_after_the_kept_length():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, random_ids(40, seed=2), cache, KeyRerotationPress(KnormPress(0.5)))
    assert position == 20 == cache.get_seq_length()


def test_a_prompt_past_the_trained_positions_warns_once_naming_both_numbers():
    config = tiny_config("llama")
    config.max_position_embeddings = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(
        UserWarning, match=r"the prompt holds 40 tokens, more than the model's max_position_embeddings=32"
    ):
        prefill(model, random_ids(40), DynamicCache(config=model.config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefill(model, random_ids(40, seed=1), DynamicCache(config=model.config))  # the same length: said already
        prefill(model, random_ids(32), DynamicCache(config=model.config))  # within the trained positions
    with pytest.warns(UserWarning, match="holds 48 tokens"):
        with KnormPress(0.5)(model):  # under a press, outside the generation layer (model.generate's prefill)
            model(input_ids=random_ids(48), use_cache=True)


# ---- chunked prefill ---------------------------------------------------------------------------------------------
def _layers(cache):
    return [read_layer(cache, i) for i in range(len(cache.layers))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("kind", [DynamicCache, VarlenCache])
def test_uncompressed_chunks_equal_one_forward(arch, kind):
    """Each chunk attends to the cache plus itself at its original positions: without compression the cache (and the
    next forward's logits) equal a one-forward prefill's, sliding-window layers included."""
    model = tiny_model(arch)
    ids = random_ids(45, batch=2, seed=3)
    whole, chunked = kind(config=model.config), kind(config=model.config)
    prefill(model, ids, whole)
    assert prefill(model, ids, chunked, chunk_size=8) == (45, None)
    for (k1, v1), (k2, v2) in zip(_layers(whole), _layers(chunked)):
        torch.testing.assert_close(k2, k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)
    nxt = random_ids(1, batch=2, seed=4)
    with torch.no_grad(), compressed_attention(model):
        logits = [model(input_ids=nxt, **cache_kwargs(model, c), position_ids=torch.full((2, 1), 45)).logits
                  for c in (whole, chunked)]  # fmt: skip
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def _greedy_reference(norms: torch.Tensor, bounds: list[int], ratio: float, heads_share: bool,
                      then: float | None = None) -> list[set]:  # fmt: skip
    """Plain-Python chunked Knorm on one sequence: ``norms`` ``(kv_heads, n)`` key norms (static at layer 0: its keys
    depend on the token and its position only). After each chunk the layer keeps ``round(seen * (1 - ratio))`` tokens
    per head, the lowest norms among what it held plus the chunk; with ``heads_share`` (AdaKV without safeguard) the
    layer keeps heads times that, the lowest norms of any head. ``then``: a second Knorm's ratio applied to that
    count (a composition: the lowest norms of the lowest norms are the lowest norms)."""
    heads = norms.shape[0]
    held = [[] for _ in range(heads)]
    for start, end in zip(bounds, bounds[1:]):
        held = [h + list(range(start, end)) for h in held]
        k = round(end * (1 - ratio))
        k = k if then is None else round(k * (1 - then))
        if heads_share:
            ranked = sorted((float(norms[h, p]), h, p) for h in range(heads) for p in held[h])[: k * heads]
            held = [[p for _, hh, p in ranked if hh == h] for h in range(heads)]
        else:
            held = [sorted(h, key=lambda p, i=i: float(norms[i, p]))[:k] for i, h in enumerate(held)]
    return [set(h) for h in held]


@pytest.mark.parametrize("batch, chunk", [(1, 7), (2, 12), (3, 30)])
@pytest.mark.parametrize("kind", ["uniform", "adaptive", "per_layer", "composed"])
def test_chunked_knorm_keeps_what_a_plain_reference_keeps(batch, chunk, kind):
    """Layer 0's kept positions and stored keys, against :func:`_greedy_reference` on the one-forward keys (a
    per-layer press with 0.4 at layer 0 keeps there what KnormPress(0.4) keeps; its other layers keep their own
    budgets)."""
    model = tiny_model("qwen2")  # 2 kv heads
    ids = random_ids(61, batch=batch, seed=chunk)
    adaptive = kind == "adaptive"
    ratios = ([0.4] + [0.7, 0.1] * len(attention_layers(model)))[: len(attention_layers(model))]
    press = {"uniform": lambda: KnormPress(0.4), "adaptive": lambda: AdaKVPress(KnormPress(0.4), alpha_safeguard=0.0),
             "per_layer": lambda: PerLayerCompressionPress(KnormPress(), ratios),
             "composed": lambda: ComposedPress([KnormPress(0.4), KnormPress(0.5)])}[kind]()  # fmt: skip
    then = 0.5 if kind == "composed" else None
    full = DynamicCache(config=model.config)
    prefill(model, ids, full)
    keys0, values0 = read_layer(full, 0)
    cache = VarlenCache(config=model.config) if adaptive else DynamicCache(config=model.config)
    _, report = prefill(model, ids, cache, press, record_kept=True, chunk_size=chunk)
    bounds = chunk_bounds(61, chunk)
    assert len(bounds) > 2 and max(b - a for a, b in zip(bounds, bounds[1:])) <= chunk
    assert report.original_lengths[0] == 61 and report.n_records == len(bounds[1:]) * len(cache.layers)
    kept = report.kept_indices[0]
    stored = cache.layers[0].padded_keys_values()[0] if adaptive else read_layer(cache, 0)[0]
    for b in range(batch):
        want = _greedy_reference(keys0[b].float().norm(dim=-1), bounds, 0.4, adaptive, then)
        for h, positions in enumerate(want):
            got = [p for p in kept[b, h].tolist() if p >= 0]
            assert set(got) == positions
            assert int(report.kept_lengths[0][b, h]) == len(positions)
            # The cache holds the prefill's own keys of those tokens, in the recorded order.
            torch.testing.assert_close(stored[b, h, : len(got)], keys0[b, h, got], atol=1e-5, rtol=1e-5)
    assert int(report.kept_lengths[0].sum()) == batch * 2 * (round(round(61 * 0.6) * 0.5) if then else round(61 * 0.6))
    if kind == "per_layer":
        for i in range(1, len(cache.layers)):
            assert cache.get_seq_length(i) == round(61 * (1 - ratios[i]))


@pytest.mark.parametrize(
    "press",
    [
        lambda: SnapKVPress(0.5, window_size=4),
        lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),
        lambda: KnormPress(target_size=16),
        lambda: TOVAPress(0.3),
        lambda: PyramidKVPress(0.5, window_size=4),
    ],  # fmt: skip
)
def test_every_layer_ends_at_the_budget_of_the_whole_prompt(press):
    model = tiny_model("llama")
    press = press()
    cache = VarlenCache(config=model.config) if press.capabilities.head_variable else DynamicCache(config=model.config)
    _, report = prefill(model, random_ids(70, seed=9), cache, press, chunk_size=20)
    modules = attention_layers(model)
    for i in range(len(cache.layers)):
        per_head = press.press.n_kept(70, modules[i]) if isinstance(press, AdaKVPress) else press.n_kept(70, modules[i])
        lengths = cache.head_lengths(i) if isinstance(cache, VarlenCache) else torch.tensor([[cache.get_seq_length(i)]])
        assert int(lengths.sum()) == lengths.numel() * per_head
        assert report.original_lengths[i] == 70


def test_chunk_size_errors_leave_the_cache_empty():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1 or None \(one forward\), got"):
            prefill(model, random_ids(20), cache, KnormPress(0.5), chunk_size=bad)
    for press, reason in (
        (ObservedAttentionPress(0.5), ": ObservedAttentionPress reads the attention weights of the whole prompt"),
        (ChunkPress(KnormPress(0.5)), ": ChunkPress decides the kept tokens itself, from the whole prompt"),
        (PerLayerCompressionPress(ObservedAttentionPress(), [0.5] * 2),
         ": its press: ObservedAttentionPress reads the attention weights"),
        (ComposedPress([KnormPress(0.3), AdaKVPress(KnormPress(0.5))]),
         r": presses\[1\] \(AdaKVPress\) keeps per-head lengths, which the next chunk's first press would cut"),
        (ComposedPress([ObservedAttentionPress(0.3), ThinKPress(0.5)]),
         r": presses\[0\]: ObservedAttentionPress reads the attention weights"),
    ):  # fmt: skip
        message = f"{type(press).__name__} cannot compress a prefill chunk by chunk{reason}"
        with pytest.raises(ValueError, match=message + ".*accepted: presses that score tokens .*, ThinKPress, "
                           "MiniCachePress, and ComposedPress of those; pass chunk_size=None"):  # fmt: skip
            prefill(model, random_ids(20), cache, press, chunk_size=8)
    with pytest.raises(ValueError, match="window_size"):  # the window must fit in every chunk
        prefill(model, random_ids(30), cache, SnapKVPress(0.5, window_size=12), chunk_size=10)
    assert cache.get_seq_length() == 0
    prefill(model, random_ids(20), cache, KnormPress(0.5), chunk_size=8)  # still usable
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_later_chunk_attends_to_the_compressed_cache_like_an_explicit_mask(arch):
    """Independent reference for a chunk over a compressed cache: the first chunk compressed alone, the second run by
    the model's own attention with an explicit mask (every kept token, causal within the chunk), then Knorm's
    selection in plain torch. Every layer must hold the same keys and values."""
    model = tiny_model(arch)
    ids = random_ids(40, seed=21)
    cache = DynamicCache(config=model.config)
    prefill(model, ids, cache, KnormPress(0.5), chunk_size=20)

    ref = DynamicCache(config=model.config)
    prefill(model, ids[:, :20], ref, KnormPress(0.5))  # 10 kept per head
    mask = torch.ones(1, 1, 20, 30, dtype=torch.bool)
    mask[..., 10:] = torch.ones(20, 20, dtype=torch.bool).tril()
    with torch.no_grad():
        model.model(input_ids=ids[:, 20:], **cache_kwargs(model.model, ref), attention_mask=mask,
                    position_ids=torch.arange(20, 40)[None])  # fmt: skip
    for i, (keys, values) in enumerate(_layers(ref)):
        kept = (-keys.float().norm(dim=-1)).topk(20, dim=-1).indices.sort(dim=-1).values[..., None]
        got_k, got_v = read_layer(cache, i)
        torch.testing.assert_close(got_k, keys.gather(2, kept.expand(-1, -1, -1, keys.shape[-1])), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_v, values.gather(2, kept.expand(-1, -1, -1, values.shape[-1])), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def _next_logits(model, cache, token: torch.Tensor, position: int) -> torch.Tensor:
    with torch.no_grad(), compressed_attention(model):
        out = model(input_ids=token, **cache_kwargs(model, cache), position_ids=torch.tensor([[position]]),
                    use_cache=True)  # fmt: skip
    return out.logits[0, -1].double()


@pytest.mark.parametrize(
    "press, quantization",
    [(None, {"bits": 8, "group_size": 32}),
     (lambda: KnormPress(0.5), {"bits": 8, "group_size": 32}),
     (lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)), {"bits": 8, "group_size": 32}),
     (lambda: SnapKVPress(0.4, window_size=4), {"bits": 8, "group_size": 32, "method": "kvquant"})],
)  # fmt: skip
def test_chunks_into_a_quantized_cache_quantize_what_the_full_precision_chunks_keep(press, quantization):
    """Chunk by chunk into a QuantizedCache: each head keeps the tokens a full-precision chunked prefill keeps, and the
    next token's logits match that cache's up to 8-bit rounding. kvquant stores keys before RoPE: every stored slot
    records the prompt position of the token a full-precision prefill kept there."""
    from kvpress.cache.quantized_cache import QuantizedCache
    from kvpress.cache.rotary import rotary_table
    from kvpress.cache.varlen_layer import VarlenLayer

    model = tiny_model("llama", head_dim=32)
    ids, token = random_ids(64, seed=31), random_ids(1, seed=32)
    reference = VarlenCache(config=model.config)
    _, report = prefill(model, ids, reference, press() if press else None, record_kept=press is not None,
                        chunk_size=16)  # fmt: skip
    rope = rotary_table(model) if quantization.get("method") == "kvquant" else None
    cache = QuantizedCache(config=model.config, quantization=quantization, rope=rope)
    prefill(model, ids, cache, press() if press else None, chunk_size=16)
    for i, layer in enumerate(cache.layers):
        assert type(layer).__name__ == "QuantizedVarlenLayer" and layer.ragged
        assert torch.equal(cache.head_lengths(i), reference.head_lengths(i))
        assert layer.memory_bytes() < reference.layers[i].memory_bytes() if isinstance(reference.layers[i],
               VarlenLayer) and reference.layers[i].ragged else True  # fmt: skip
        store = layer.store
        if getattr(store, "positions", None) is not None:
            segs, kept = store.segs, report.kept_indices[i].reshape(-1, report.kept_indices[i].shape[-1])
            for seg in range(segs.ctx_len.shape[0]):
                first, n = int(segs.cu_groups[seg]) * segs.group_size, int(segs.ctx_len[seg])
                assert store.positions[first : first + n].tolist() == kept[seg, :n].tolist()
    want, got = _next_logits(model, reference, token, 64), _next_logits(model, cache, token, 64)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


THINK, MINICACHE = ThinKPress(0.5, window_size=4), MiniCachePress(start_layer=0, retention_ratio=0.2)


# gemma3's tiny config has no two adjacent full-attention layers for MiniCache to merge.
@pytest.mark.parametrize("arch, press", [("llama", THINK), ("qwen3", THINK), ("gemma3", THINK), ("llama", MINICACHE),
                                         ("qwen3", MINICACHE)])  # fmt: skip
def test_whole_context_presses_act_once_after_the_last_chunk(arch, press):
    """ThinK's channels and MiniCache's merges are chosen from the whole context: chunks keep every token whole, and
    after the last one the press acts as on a one-forward prefill (same layer types, channels and contents)."""
    model = tiny_model(arch)
    ids = random_ids(40, batch=2, seed=31)
    whole, chunked = DynamicCache(config=model.config), DynamicCache(config=model.config)
    prefill(model, ids, whole, press)
    prefill(model, ids, chunked, press, chunk_size=9)
    assert [type(layer).__name__ for layer in chunked.layers] == [type(layer).__name__ for layer in whole.layers]
    assert {type(layer).__name__ for layer in whole.layers} & {"ChannelPrunedLayer", "MergedLayer"}
    for a, b in zip(whole.layers, chunked.layers):
        if hasattr(a, "key_channels"):
            assert torch.equal(a.key_channels, b.key_channels)
    for (k1, v1), (k2, v2) in zip(_layers(whole), _layers(chunked)):
        torch.testing.assert_close(k2, k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)


def test_think_after_a_token_press_chooses_channels_from_the_kept_tokens_after_the_last_chunk():
    """ComposedPress([Knorm, ThinK]) chunk by chunk: the tokens Knorm alone keeps chunk by chunk, their keys narrowed
    to the channels ThinK scores on them with the last chunk's queries."""
    model = tiny_model("llama")
    ids = random_ids(48, seed=32)
    think = ThinKPress(0.5, window_size=4)
    composed, knorm_only = DynamicCache(config=model.config), DynamicCache(config=model.config)
    prefill(model, ids, composed, ComposedPress([KnormPress(0.5), think]), chunk_size=16)
    inputs = {}

    def capture(module, args, kwargs, output):
        inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in attention_layers(model)]
    try:
        prefill(model, ids, knorm_only, KnormPress(0.5), chunk_size=16)
    finally:
        for handle in handles:
            handle.remove()
    for i, module in enumerate(attention_layers(model)):
        keys, values = read_layer(knorm_only, i)
        hidden, pe = inputs[i]  # the last chunk's
        with torch.no_grad():
            want = think.compress(module, hidden, keys, values, None, {"position_embeddings": pe})
        layer = composed.layers[i]
        assert type(layer).__name__ == "ChannelPrunedLayer"
        assert torch.equal(layer.key_channels, want.key_channels)
        torch.testing.assert_close(layer.pruned_keys, want.keys, rtol=0, atol=0)
        torch.testing.assert_close(layer.values, values, rtol=0, atol=0)
