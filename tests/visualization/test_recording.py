"""record_compression: the recorded kept positions are exactly what the cache holds, for every kind of press."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress import (
    AdaKVPress,
    ChunkPress,
    ComposedPress,
    KeyRerotationPress,
    KnormPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    ThinKPress,
    TOVAPress,
    VarlenCache,
)
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import read_layer
from kvpress.visualization import record_compression
from tests.conftest import ARCHITECTURES, tiny_model
from tests.presses.press_harness import full_layers

PRESSES = {
    "knorm": lambda: KnormPress(0.5),
    "snapkv": lambda: SnapKVPress(0.4, window_size=4),
    "streaming": lambda: StreamingLLMPress(0.6, n_sink=2),
    "random": lambda: RandomPress(0.5, seed=3),
    "tova": lambda: TOVAPress(0.5),
    "pyramidkv": lambda: PyramidKVPress(0.5, window_size=2, beta=2),
    "chunk": lambda: ChunkPress(KnormPress(0.5), chunk_length=11),
    "rerotation": lambda: KeyRerotationPress(KnormPress(0.5)),
    "composed": lambda: ComposedPress([KnormPress(0.3), SnapKVPress(0.4, window_size=3)]),
    "composed_think": lambda: ComposedPress([StreamingLLMPress(0.5), ThinKPress(0.5, window_size=4)]),
}


def _full_cache(model, ids):
    """Keys and values of every layer without compression: ``{layer: (keys, values)}`` ``(batch, kv, n, d)``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return {i: read_layer(cache, i) for i in range(len(cache.layers))}


def _gather(x, indices):
    return x.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))


# KeyRerotationPress refuses models with sliding-window layers (Gemma3).
CASES = [(a, name) for a in sorted(ARCHITECTURES) for name in sorted(PRESSES) if (a, name) != ("gemma3", "rerotation")]


@pytest.mark.parametrize(("arch", "name"), CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_uniform_press_kept_positions_are_the_cache_contents(name, batch, arch):
    torch.manual_seed(batch)
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (batch, int(torch.randint(24, 48, ()))))
    full = _full_cache(model, ids)
    report, cache = record_compression(model, PRESSES[name](), ids)
    assert isinstance(cache, DynamicCache)
    assert report.compressed_layers == full_layers(model)
    for layer in report.compressed_layers:
        keys, values = read_layer(cache, layer)
        indices = report.kept_indices[layer]
        assert indices.shape == values.shape[:3] and bool((indices >= 0).all())
        assert torch.equal(report.kept_lengths[layer], torch.full(values.shape[:2], values.shape[2]))
        # Values are never changed by a press: the cache's rows are the original rows at the recorded positions.
        assert torch.equal(values, _gather(full[layer][1], indices))
        if name not in ("rerotation", "composed_think"):  # re-rotated / channel-pruned keys are checked below
            assert torch.equal(keys, _gather(full[layer][0], indices))
        mask = report.kept_mask(layer)
        assert mask.shape == (batch, values.shape[1], ids.shape[1])
        assert torch.equal(mask.sum(-1), report.kept_lengths[layer])


def test_channel_pruned_keys_keep_their_recorded_tokens():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 40))
    full = _full_cache(model, ids)
    report, cache = record_compression(model, PRESSES["composed_think"](), ids)
    for layer in report.compressed_layers:
        keys, _ = read_layer(cache, layer)  # densified with zeros in the pruned channels of the older tokens
        expected = _gather(full[layer][0], report.kept_indices[layer])
        window = keys[:, :, -4:]
        assert torch.equal(window, expected[:, :, -4:])
        kept_channels = keys[:, :, :-4].ne(0).any(2)  # (batch, kv, d)
        assert torch.equal(keys[:, :, :-4], torch.where(kept_channels[:, :, None], expected[:, :, :-4], 0))


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("scorer", ["knorm", "snapkv"])
def test_head_variable_press_kept_positions_are_the_ragged_segments(alpha, scorer, arch):
    torch.manual_seed(int(alpha * 10))
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (2, 41))
    full = _full_cache(model, ids)
    inner = KnormPress(0.6) if scorer == "knorm" else SnapKVPress(0.6, window_size=4)
    report, cache = record_compression(model, AdaKVPress(inner, alpha_safeguard=alpha), ids)
    assert isinstance(cache, VarlenCache)
    for layer in report.compressed_layers:
        stored = cache.layers[layer]
        lengths = report.kept_lengths[layer]
        assert torch.equal(stored.seg_lens, lengths)
        indices = report.kept_indices[layer]
        b, h = lengths.shape
        for s in range(b * h):
            seq, head = divmod(s, h)
            rows = slice(int(stored.cu_seqlens[s]), int(stored.cu_seqlens[s + 1]))
            positions = indices[seq, head, : lengths[seq, head]]
            assert bool((indices[seq, head, lengths[seq, head] :] == -1).all())
            assert torch.equal(stored.seg_k[rows], full[layer][0][seq, head, positions])
            assert torch.equal(stored.seg_v[rows], full[layer][1][seq, head, positions])
        assert torch.equal(report.kept_mask(layer).sum(-1), lengths)


def test_scores_are_the_ones_that_chose_the_kept_tokens():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 33))
    full = _full_cache(model, ids)
    report, _ = record_compression(model, KnormPress(0.5), ids)
    for layer in report.compressed_layers:
        reference = -full[layer][0].double().norm(dim=-1)  # Knorm: the smaller the key norm, the higher the score
        torch.testing.assert_close(report.scores[layer].double(), reference, rtol=1e-6, atol=1e-6)
        kept = report.kept_mask(layer)
        # Every kept token scores at least as high as every dropped one of its head.
        lowest_kept = report.scores[layer].masked_fill(~kept, float("inf")).min(-1).values
        highest_dropped = report.scores[layer].masked_fill(kept, float("-inf")).max(-1).values
        assert bool((lowest_kept >= highest_dropped).all())


def test_nothing_is_recorded_unless_asked():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), KnormPress(0.5)(model) as report:
        model.model(input_ids=torch.randint(3, 128, (1, 20)), **cache_kwargs(model.model, cache))
    assert report.compressed_layers and not report.kept_indices and not report.scores
    with pytest.raises(KeyError, match="record_kept=True"):
        report.kept_mask(0)


def test_bad_arguments_are_named():
    model = tiny_model("llama")
    with (
        pytest.raises(ValueError, match="record_kept must be True or False"),
        KnormPress(0.5)(model, record_kept="yes"),
    ):
        pass
    with pytest.raises(ValueError, match="press must be a kvpress press"):
        record_compression(model, "knorm", torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, n\) tensor"):
        record_compression(model, KnormPress(0.5), torch.ones(4, dtype=torch.long))


def test_a_press_that_drops_tokens_without_saying_which_cannot_be_recorded():
    from dataclasses import dataclass

    from kvpress.presses.base_press import BasePress

    @dataclass
    class FirstHalfPress(BasePress):  # a press written outside the library, returning bare tensors
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys[:, :, : keys.shape[2] // 2], values[:, :, : keys.shape[2] // 2]

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(RuntimeError, match="without saying which.*keep_tokens"):
        record_compression(model, FirstHalfPress(), ids)
    with pytest.raises(RuntimeError, match="without saying which"):
        record_compression(model, ComposedPress([KnormPress(0.5), FirstHalfPress()]), ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), FirstHalfPress()(model) as report:  # without recording it runs as before
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    assert report.mean_kept(0) == 10
