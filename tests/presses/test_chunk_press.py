"""ChunkPress: each chunk keeps round(len * (1 - r)) of its own top tokens, scored on the chunk alone."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import (
    ProjectionPress,
    assert_hooks_removed_after_error,
    compressed_prefill,
    dense_prefill,
    gather,
    projection_scores,
    snapkv_reference,
)


def chunk_bounds(n, c):
    return [(s, min(s + c, n)) for s in range(0, n, c)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("n", "chunk", "ratio"), [(45, 16, 0.5), (40, 8, 0.3), (30, 64, 0.6), (37, 12, 0.9)])
def test_kept_counts_and_selection_match_reference(arch, batch, n, chunk, ratio):
    model = tiny_model(arch)
    ids = random_ids(n, batch, seed=n + batch)
    cache, report = compressed_prefill(model, ChunkPress(ProjectionPress(ratio, seed=chunk), chunk), ids)
    dense, _ = dense_prefill(model, ids)
    assert report.compressed_layers == sorted(dense)
    for i, (keys, values) in dense.items():
        scores = projection_scores(keys.double(), seed=chunk)
        expected = []
        for start, end in chunk_bounds(n, chunk):
            k = round((end - start) * (1 - ratio))
            if k:
                expected.append(start + scores[..., start:end].topk(k, dim=-1).indices.sort(-1).values)
        expected = torch.cat(expected, dim=-1)
        assert torch.equal(report.kept_lengths[i], torch.full((batch, 2), expected.shape[-1]))
        torch.testing.assert_close(cache.layers[i].keys, gather(keys, expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, gather(values, expected), atol=1e-5, rtol=1e-5)


@dataclass
class RecencyPress(ScorerPress):
    """Scores tokens by position: a global selection keeps only the end of the context."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return torch.arange(keys.shape[2], dtype=torch.float32).expand(keys.shape[:3])


def test_spreads_the_kept_tokens_over_the_context():
    model = tiny_model("llama")
    n, chunk = 30, 8
    ids = random_ids(n, 2)
    cache, _ = compressed_prefill(model, ChunkPress(RecencyPress(0.5), chunk), ids)
    dense, _ = dense_prefill(model, ids)
    # Chunks [0, 8), [8, 16), [16, 24), [24, 30) keep their last 4, 4, 4 and 3 tokens, in order.
    expected = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 27, 28, 29]).expand(2, 2, 15)
    for i, (keys, _) in dense.items():
        torch.testing.assert_close(cache.layers[i].keys, gather(keys, expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_window_scorer_scores_each_chunk_with_its_own_window(arch, batch):
    model = tiny_model(arch)
    n, chunk, window, ratio = 40, 16, 3, 0.5
    ids = random_ids(n, batch, seed=4)
    cache, _ = compressed_prefill(model, ChunkPress(SnapKVPress(ratio, window_size=window, kernel_size=1), chunk), ids)
    dense, records = dense_prefill(model, ids)
    for i, (keys, values) in dense.items():
        queries, scaling = records[i]
        expected = []
        for start, end in chunk_bounds(n, chunk):
            k = round((end - start) * (1 - ratio))
            past = snapkv_reference(queries[:, :, :end], scaling, keys[:, :, start:end], window, kernel=1)
            top = past.topk(k - window, dim=-1).indices
            window_idx = torch.arange(end - start - window, end - start).expand(batch, 2, window)
            expected.append(start + torch.cat([top, window_idx], dim=-1).sort(-1).values)
        expected = torch.cat(expected, dim=-1)
        torch.testing.assert_close(cache.layers[i].keys, gather(keys, expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[i].values, gather(values, expected), atol=1e-5, rtol=1e-5)


def test_no_compression_and_empty_chunks():
    model = tiny_model("phi3")
    ids = random_ids(20, 2)
    dense, _ = dense_prefill(model, ids)
    cache, _ = compressed_prefill(model, ChunkPress(KnormPress(0.0), 8), ids)
    for i, (keys, _) in dense.items():
        torch.testing.assert_close(cache.layers[i].keys, keys, atol=1e-5, rtol=1e-5)
    # 5-token chunks at r = 0.95 keep round(0.25) = 0 tokens each
    cache, report = compressed_prefill(model, ChunkPress(KnormPress(0.95), 5), ids)
    assert all(v.eq(0).all() for v in report.kept_lengths.values())


def test_bad_parameters():
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk_length"):
            ChunkPress(KnormPress(0.5), bad)
    with pytest.raises(ValueError, match="target_size"):
        ChunkPress(KnormPress(target_size=8), 16)
    with pytest.raises(ValueError, match="ScorerPress"):
        ChunkPress(ChunkPress(KnormPress(0.5)))
    press = ChunkPress(SnapKVPress(0.5, window_size=8), 16)
    press.check_length(40)  # chunks of 16, 16, 8
    with pytest.raises(ValueError, match="window_size=8"):
        press.check_length(36)  # the last chunk has 4 tokens
    with pytest.raises(ValueError, match="window_size=8"):
        compressed_prefill(tiny_model("qwen2"), press, random_ids(36))


def test_compression_ratio_and_capabilities():
    inner = SnapKVPress(0.4)
    assert ChunkPress(inner, 32).compression_ratio == 0.4
    # The inner press's needs; chunk-by-chunk prefill is the wrapper's own (ScorerPress alone supports it).
    assert ChunkPress(inner, 32).capabilities == dataclasses.replace(inner.capabilities, chunked_prefill=False)
    assert inner.capabilities.chunked_prefill


def test_hooks_removed_after_error():
    assert_hooks_removed_after_error(tiny_model("mistral"), ChunkPress(KnormPress(0.5), 4), random_ids(16))
