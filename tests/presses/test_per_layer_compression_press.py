"""PerLayerCompressionPress: one ratio per layer, inner scores reused, inner press untouched, decoding afterwards."""

import dataclasses

import pytest
import torch

from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import (
    ProjectionPress,
    assert_decode_matches_reference,
    assert_hooks_removed_after_error,
    assert_pipeline_matches_plain_decoding,
    compressed_prefill,
    dense_prefill,
    gather,
    projection_scores,
)

RATIOS = [0.2, 0.55, 0.8]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n", [23, 40])
def test_kept_counts_and_selection_match_reference(arch, batch, n):
    model = tiny_model(arch)
    ids = random_ids(n, batch, seed=n + batch)
    inner = ProjectionPress(compression_ratio=0.1, seed=n)
    press = PerLayerCompressionPress(inner, RATIOS)
    cache, report = compressed_prefill(model, press, ids)
    dense, _ = dense_prefill(model, ids)
    assert report.compressed_layers == sorted(dense)
    for i, (keys, values) in dense.items():
        k = round(n * (1 - RATIOS[i]))
        assert torch.equal(report.kept_lengths[i], torch.full((batch, 2), k))
        expected = projection_scores(keys.double(), seed=n).topk(k, dim=-1).indices.sort(-1).values  # original order
        torch.testing.assert_close(cache.layers[i].keys, gather(keys, expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, gather(values, expected), atol=1e-5, rtol=1e-5)
    assert inner == ProjectionPress(compression_ratio=0.1, seed=n)  # the wrapped press is not modified


def test_window_scorer_keeps_its_window():
    model = tiny_model("qwen3")
    n, window = 36, 5
    ids = random_ids(n, 2, seed=3)
    cache, _ = compressed_prefill(model, PerLayerCompressionPress(SnapKVPress(window_size=window), RATIOS), ids)
    dense, _ = dense_prefill(model, ids)
    for i, (keys, _) in dense.items():
        kept = cache.layers[i].keys
        assert kept.shape[2] == round(n * (1 - RATIOS[i]))
        torch.testing.assert_close(kept[:, :, -window:], keys[:, :, -window:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_after_uneven_layers(arch, batch):
    model = tiny_model(arch)
    n, q_len = 32, 4
    ids = random_ids(n + q_len, batch, seed=11 + batch)
    cache, report = compressed_prefill(model, PerLayerCompressionPress(KnormPress(), [0.1, 0.5, 0.75]), ids[:, :n])
    lengths = {cache.layers[i].keys.shape[2] for i in report.compressed_layers}
    assert len(lengths) == len(report.compressed_layers)  # every compressed layer has its own length
    logits = assert_decode_matches_reference(model, cache, ids[:, n:], start=n)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, n:]
    assert not torch.allclose(logits, full, atol=1e-4)


def test_no_compression_decodes_like_the_full_model(arch):
    """Anchor for the decode reference: with ratios 0 the cache is whole and both paths equal a plain forward."""
    model = tiny_model(arch)
    n, q_len = 20, 4
    ids = random_ids(n + q_len, 2, seed=5)
    cache, report = compressed_prefill(model, PerLayerCompressionPress(KnormPress(), [0.0] * 3), ids[:, :n])
    assert all(v.eq(n).all() for v in report.kept_lengths.values())
    logits = assert_decode_matches_reference(model, cache, ids[:, n:], start=n)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, n:]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-4)


def test_compression_ratio_is_the_mean():
    assert PerLayerCompressionPress(KnormPress(), [0.1, 0.2, 0.6]).compression_ratio == pytest.approx(0.3)


def test_pipeline_generates_from_uneven_layers():
    lengths = assert_pipeline_matches_plain_decoding(PerLayerCompressionPress(KnormPress(), [0.1, 0.5, 0.75]))
    assert len(set(lengths)) == 3


def test_bad_parameters():
    with pytest.raises(ValueError, match="ScorerPress"):
        PerLayerCompressionPress(object(), [0.5])
    with pytest.raises(ValueError, match="non-empty list"):
        PerLayerCompressionPress(KnormPress(), [])
    with pytest.raises(ValueError, match="non-empty list"):
        PerLayerCompressionPress(KnormPress(), 0.5)
    with pytest.raises(ValueError, match=r"compression_ratios\[1\]"):
        PerLayerCompressionPress(KnormPress(), [0.5, 1.0, 0.2])
    model = tiny_model("llama")
    for ratios in ([0.5, 0.5], [0.5] * 4):
        press = PerLayerCompressionPress(KnormPress(), ratios)
        with pytest.raises(ValueError, match="exactly 3 ratios"):
            press.validate(model)
        with pytest.raises(ValueError, match="exactly 3 ratios"), press(model):
            pass
    # The inner press's needs are the wrapper's: SnapKV's window must fit the context.
    with pytest.raises(ValueError, match="window_size"):
        compressed_prefill(model, PerLayerCompressionPress(SnapKVPress(window_size=30), RATIOS), random_ids(20))


def test_capabilities_are_the_inner_press():
    press = PerLayerCompressionPress(SnapKVPress(), RATIOS)
    assert press.capabilities == SnapKVPress().capabilities  # chunked prefill included
    assert dataclasses.is_dataclass(press)


def test_hooks_removed_after_error():
    assert_hooks_removed_after_error(tiny_model("phi3"), PerLayerCompressionPress(KnormPress(), RATIOS), random_ids(16))
