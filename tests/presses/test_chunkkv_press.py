"""ChunkKVPress: whole chunks by the sum of their tokens' head-averaged scores (float64 reference), the same tokens in
every head, kept-whole tokens first."""

import pytest
import torch

from kvpress.presses.chunkkv_press import ChunkKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import tiny_model
from tests.presses.press_harness import full_layers, kept_positions, prefill, record_scores
from tests.presses.test_block_press import distinct_ids


def chunkkv_f64(scores: torch.Tensor, k: int, length: int) -> list:
    """Per sequence: kept-whole tokens, then chunks by summed head-mean score, then the next chunk's best tokens."""
    out = []
    for b in range(scores.shape[0]):
        s = scores[b].double()
        whole = [t for t in range(s.shape[-1]) if bool(s[:, t].isposinf().any())]
        token = torch.where(s.isfinite(), s, 0.0).mean(0).tolist()
        chunks = [list(range(c, min(c + length, len(token)))) for c in range(0, len(token), length)]
        chunks.sort(key=lambda c: sum(token[t] for t in c), reverse=True)
        ranked = whole + [t for c in chunks for t in sorted(c, key=lambda t: token[t], reverse=True) if t not in whole]
        out.append(sorted(ranked[:k]))
    return out


@pytest.mark.parametrize("inner", ["knorm", "snapkv"])
@pytest.mark.parametrize(("batch", "n", "length", "ratio"), [(1, 40, 5, 0.5), (2, 47, 6, 0.3), (2, 33, 4, 0.7)])
def test_whole_chunks_match_the_float64_reference(arch, inner, batch, n, length, ratio):
    model = tiny_model(arch)
    scorer = KnormPress(ratio) if inner == "knorm" else SnapKVPress(ratio, window_size=3, kernel_size=1)
    seen = record_scores(scorer)
    cache = prefill(model, ChunkKVPress(scorer, chunk_length=length), distinct_ids(model, n, batch, seed=n))
    assert sorted(seen) == full_layers(model)
    k = round(n * (1 - ratio))
    for i, rec in seen.items():
        got = kept_positions(cache.layers[i].keys, rec.keys)
        assert torch.equal(got, got[:, :1].expand_as(got))  # every head keeps the same tokens
        want = chunkkv_f64(rec.scores, k, length)
        for b, (mine, ref) in enumerate(zip(got[:, 0].tolist(), want)):
            if mine != ref:  # near-equal chunk sums (QK-norm models give every key about the same norm)
                token = torch.where(rec.scores[b].isfinite(), rec.scores[b].double(), 0.0).mean(0)
                assert abs(float(token[mine].sum() - token[ref].sum())) < 1e-5 * float(token.abs().sum())
