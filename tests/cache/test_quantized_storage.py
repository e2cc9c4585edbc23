"""KVQuant and GEAR storage in QuantizedCache on tiny random models: stacked with uniform and head-variable presses,
pre-RoPE keys at the right positions (after pruning and after flushes), sinks, batches, bytes, and bad input."""

from __future__ import annotations

import pytest
import torch

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.quantized_storage import DecomposedStorage, KiviStorage
from kvpress.cache.rotary import rotary_table
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress_kernels import DecomposedSegments, dequantize_decomposed
from tests.cache.test_quantized_cache import decode, prefill, quant_model
from tests.conftest import random_ids

PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(0.4),
    "snapkv": lambda: SnapKVPress(0.5, window_size=4),
    "adakv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),
}


def make_cache(model, **quantization):
    config = QuantizationConfig(group_size=32, residual_length=32, **quantization)
    rope = rotary_table(model) if config.pre_rope else None
    return QuantizedCache(config=model.config, quantization=config, rope=rope)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("press_name", sorted(PRESSES))
@pytest.mark.parametrize("method", ["kvquant", "gear"])
def test_decoding_follows_the_full_precision_cache(arch, press_name, method):
    """At 8 bits the decoded logits match the unquantized cache of the same press (pre-RoPE keys rotated back at the
    positions the press kept), and the error grows as the bits shrink; 45 decoded tokens flush one group."""
    model = quant_model(arch)
    n = 48
    ids = random_ids(n, 1, seed=5)
    full = VarlenCache(config=model.config)
    prefill(model, full, ids, PRESSES[press_name]())
    reference = decode(model, full, n, 40)
    errors = {}
    for bits in (2, 4, 8):
        cache = make_cache(model, bits=bits, method=method)
        prefill(model, cache, ids, PRESSES[press_name]())
        cache.compact()
        context = {i: cache.head_lengths(i) for i in range(len(cache.layers))}
        logits = decode(model, cache, n, 40)
        errors[bits] = (logits - reference).abs().max().item()
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer.store, DecomposedSegments) and layer.segs.bits == bits
            assert torch.equal(layer.seg_lens, context[i] + 32) and layer.tail_len == 45 - 32  # one flush
            tail = sum(t.numel() * t.element_size() for t in (layer.tail_k, layer.tail_v, layer.tail_lens))
            assert layer.memory_bytes() == layer.store.nbytes() + tail
    torch.testing.assert_close(logits, reference, atol=2e-2, rtol=0)  # 8 bits
    assert errors[8] < errors[4] < errors[2], errors


def test_pre_rope_keys_are_stored_unrotated_at_their_positions():
    """The stored keys, rotated back by the storage's own positions, are the keys the model cached; the positions
    are the ones the press kept, then the flushed tail's."""
    model = quant_model("llama")
    n = 40
    ids = random_ids(n, 1, seed=2)
    dense = VarlenCache(config=model.config)
    press = SnapKVPress(0.5, window_size=4)
    with press(model, record_kept=True) as report:
        prefill(model, dense, ids)
    cache = make_cache(model, bits=8, method="kvquant", sink_tokens=0)
    with press(model):
        prefill(model, cache, ids)
    rope = rotary_table(model)
    for i, layer in enumerate(cache.layers):
        kept = report.kept_indices[i][0]  # (kv_heads, n_kept) prefill positions, in storage order
        k, _, lens = dequantize_decomposed(layer.store, rope)
        assert torch.equal(layer.store.positions[: lens[0]].long(), kept[0, : lens[0]])
        exact = dense.layers[i].seg_k
        assert (k - exact).abs().max() < 0.02 * exact.abs().max()  # 8-bit codes of the un-rotated keys
    decode(model, cache, n, 35)  # 40 tokens added: one group of 32 flushed
    for layer in cache.layers:
        flushed = layer.store.positions.view(-1, 32)[-1]
        assert torch.equal(flushed.long(), torch.arange(n, n + 32))
        assert int(layer.tail_start[0]) == n + 32


def test_sink_tokens_are_kept_whole():
    model = quant_model("qwen3")
    ids = random_ids(64, 1, seed=3)
    cache = make_cache(model, bits=2, method="kvquant", outlier_ratio=0.0, sink_tokens=2)
    prefill(model, cache, ids)
    cache.compact()
    for layer in cache.layers:
        o = layer.store.k_outliers
        rows = torch.repeat_interleave(torch.arange(o.cu.numel() - 1), o.cu.diff().long()) * 32 + o.pos.long() // 32
        assert torch.equal(rows.unique(), torch.tensor([0, 1, 64, 65]))  # two kv heads, positions 0 and 1 each


def test_concatenate_and_batch_select_keep_each_sequence():
    """Sequences calibrated apart (their own level tables) stacked in one batch decode as each alone."""
    model = quant_model("llama")
    caches = []
    for seed, n in ((0, 30), (1, 45)):
        cache = make_cache(model, bits=4, method="kvquant")
        prefill(model, cache, random_ids(n, seed=seed), AdaKVPress(KnormPress(0.5)))
        cache.next_positions = [n]
        caches.append(cache)
    state = [snapshot_cache(c) for c in caches]
    stacked = QuantizedCache.concatenate(caches)
    layer = stacked.layers[0]
    assert layer.store.k_levels.shape == (2 * model.config.num_key_value_heads, 16)
    assert layer.tail_start.tolist() == [30, 45]
    steps = [random_ids(3, 2, seed=9)] + [random_ids(1, 2, seed=10 + s) for s in range(34)]
    pos = torch.tensor([[30], [45]])
    together = []
    with torch.no_grad(), compressed_attention(model):
        for x in steps:
            together.append(
                model(input_ids=x, **cache_kwargs(model, stacked), position_ids=pos + torch.arange(x.shape[1])).logits
            )  # noqa: E501
            pos = pos + x.shape[1]
        for b, (cache, s) in enumerate(zip(caches, state)):
            restore_cache(cache, s)
            p = int(cache.next_positions[0])
            for x, ref in zip(steps, together):
                alone = model(
                    input_ids=x[b : b + 1],
                    **cache_kwargs(model, cache),
                    position_ids=p + torch.arange(x.shape[1])[None],
                )  # noqa: E501
                torch.testing.assert_close(alone.logits, ref[b : b + 1], atol=1e-5, rtol=1e-5)
                p += x.shape[1]
    stacked.layers[0].batch_select_indices(torch.tensor([1]))
    kept = stacked.layers[0]
    assert kept.tail_start.tolist() == [45 + 32] and kept.store.k_levels.shape[0] == model.config.num_key_value_heads


def test_storage_choice_and_bad_configuration():
    model = quant_model("llama")
    assert isinstance(make_cache(model, method="kivi")._dense_layer(0).storage, KiviStorage)
    assert isinstance(make_cache(model, method="gear")._dense_layer(0).storage, DecomposedStorage)
    with pytest.raises(ValueError, match="rotary table"):
        QuantizedCache(config=model.config, quantization={"method": "kvquant", "group_size": 32})
    QuantizedCache(config=model.config, quantization={"method": "kvquant", "group_size": 32, "pre_rope": False})
    with pytest.raises(ValueError, match="rank is an option of method gear, not of method='kvquant'"):
        QuantizationConfig(method="kvquant", rank=2)
    with pytest.raises(ValueError, match=r"^quantization is not a valid QuantizationConfig: rank is an option"):
        QuantizationConfig.coerce({"method": "kivi", "rank": 4})
    with pytest.raises(ValueError, match="pre_rope"):
        QuantizationConfig.coerce({"method": "kvquant", "pre_rope": "yes"})
    with pytest.raises(ValueError, match="outlier_ratio must be in"):
        QuantizedCache(config=model.config, quantization={"method": "gear", "outlier_ratio": 0.7, "group_size": 32})


@pytest.mark.parametrize("method", ["kvquant", "gear"])
def test_save_and_load_round_trip(method, tmp_path):
    """Every correction, the key positions, the flushed groups, the tail and the rotary table come back; the loaded
    cache decodes as the saved one."""
    model = quant_model("qwen3")
    cache = make_cache(model, bits=2, method=method)
    prefill(model, cache, random_ids(40, 2), AdaKVPress(SnapKVPress(0.5, window_size=4)))
    fresh = tmp_path / f"{method}-context.safetensors"
    cache.save(fresh)  # right after compaction, keys and values share their low-rank block ids
    assert QuantizedCache.load(fresh).memory_bytes() == cache.memory_bytes()
    decode(model, cache, 40, 30, batch=2)  # 35 tokens added: one group flushed, 3 in the tail
    path = tmp_path / f"{method}.safetensors"
    cache.save(path)
    loaded = QuantizedCache.load(path)
    assert loaded.quantization == cache.quantization
    assert (loaded.rope is None) == (cache.rope is None)
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.seg_lens, b.seg_lens) and a.tail_len == b.tail_len == 3
        assert a.store.nbytes() == b.store.nbytes() and a.memory_bytes() >= b.memory_bytes()
        assert (a.tail_start is None and b.tail_start is None) or torch.equal(a.tail_start, b.tail_start)
    torch.testing.assert_close(decode(model, loaded, 75, 3, 2, seed=7), decode(model, cache, 75, 3, 2, seed=7))


def test_bytes_per_token_counts_the_corrections():
    kivi = QuantizationConfig(group_size=32)
    gear = QuantizationConfig(group_size=32, method="gear", rank=4, outlier_ratio=0.02)
    d = 64
    # Per token: rank 4 bf16 numbers for keys and for values; 2% outliers at (2 + 2) bytes each; int32 outlier
    # prefix sums and block ids per group of 32, keys and values. Per head: the context block's factors.
    per_group = 2 * 4 / 32 + 2 * 4 / 32
    assert gear.bytes_per_token(0, d) == pytest.approx(
        kivi.bytes_per_token(0, d) + 2 * 4 * 2 + 2 * d * 0.02 * 4 + per_group
    )
    assert gear.head_bytes(0, d) == 2 * 4 * d * 2 and kivi.head_bytes(0, d) == 0


@pytest.mark.parametrize("method", ["kvquant", "gear"])
def test_memory_budget_holds_with_the_corrections(method):
    """A byte budget planned with the corrections' per-token and per-head costs holds in the cache."""
    from kvpress.presses.memory_budget_press import MemoryBudgetPress

    model = quant_model("llama")
    n = 200
    quantization = QuantizationConfig(bits=2, group_size=32, residual_length=32, method=method)
    press = MemoryBudgetPress(SnapKVPress(window_size=4), budget_fraction=0.25, quantization=quantization)
    cache = make_cache(model, bits=2, method=method)
    prefill(model, cache, random_ids(n, 1, seed=8), press)
    full = n * model.config.num_key_value_heads * 2 * 32 * 4 * model.config.num_hidden_layers  # float32 model
    tails = sum(layer.tail_lens.numel() * 4 for layer in cache.layers)
    assert cache.memory_bytes() - tails <= 0.25 * full
    assert cache.memory_bytes() - tails <= press.planned_bytes(n, model.config, torch.float32) + 64 * len(cache.layers)


@pytest.mark.parametrize("method", ["kivi", "kvquant", "gear"])
def test_three_bit_storage_sits_between_two_and_four_bits(method):
    """3-bit codes (any method; KIVI's go through the decomposed storage without corrections): the decoding error
    lies between the 2-bit and the 4-bit one. Bytes: 10 codes to a word, so with head_dim 32 and groups of 32 a
    3-bit row needs as many words as a 4-bit one (4); the saving appears with wider heads and groups."""
    model = quant_model("llama")
    n = 48
    ids = random_ids(n, 1, seed=6)
    full = VarlenCache(config=model.config)
    prefill(model, full, ids, KnormPress(0.25))
    reference = decode(model, full, n, 8)
    errors, sizes = {}, {}
    for bits in (2, 3, 4):
        cache = make_cache(model, bits=bits, method=method)
        prefill(model, cache, ids, KnormPress(0.25))
        cache.compact()
        sizes[bits] = cache.memory_bytes()
        errors[bits] = (decode(model, cache, n, 8) - reference).abs().max().item()
        if bits == 3:
            assert all(isinstance(layer.storage, DecomposedStorage) for layer in cache.layers)
    assert errors[4] < errors[3] < errors[2], errors
    assert sizes[2] < sizes[3] <= sizes[4], sizes
