"""NonCausalAttnPress and CompactorPress: chunk attention without the causal mask (float64 queries and softmax),
z-scored, blended with leverage; sinks at both ends kept."""

import pytest
import torch

from kvpress.presses.compactor_press import CompactorPress
from kvpress.presses.non_causal_attn_press import NonCausalAttnPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, queries_f64, record_scores
from tests.presses.test_leverage_score_press import leverage_f64, zscore_f64


def chunk_attention_f64(rec, chunk: int) -> torch.Tensor:
    q = queries_f64(rec.module, rec.hidden, rec.cos, rec.sin)  # (b, heads, n, d)
    b, heads, n, _ = q.shape
    h_kv = rec.keys.shape[1]
    k = rec.keys.double().repeat_interleave(heads // h_kv, dim=1)
    out = torch.zeros(b, heads, n, dtype=torch.float64)
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        weights = (q[:, :, s] @ k[:, :, s].transpose(-1, -2) * rec.module.scaling).softmax(-1)
        out[:, :, s] = weights.sum(2)
    return zscore_f64(out.view(b, h_kv, heads // h_kv, n).mean(2))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("batch", "n", "chunk", "ratio"), [(1, 40, 16, 0.5), (2, 37, 10, 0.3), (3, 25, 64, 0.6)])
def test_non_causal_scores_match_the_float64_reference(arch, kv_heads, batch, n, chunk, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = NonCausalAttnPress(ratio, chunk_size=chunk)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n + 2))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        want = chunk_attention_f64(rec, chunk)
        torch.testing.assert_close(rec.scores.double(), want, rtol=1e-4, atol=1e-4)
        assert_keeps_top(cache.layers[i].keys, rec.keys, want, tol=1e-4)


@pytest.mark.parametrize(("ratio", "blending"), [(0.5, None), (0.3, 0.8), (0.6, 0.0)])
def test_compactor_blends_the_two_references_and_keeps_both_sink_ends(arch, ratio, blending):
    model = tiny_model(arch)
    n = 48
    press = CompactorPress(ratio, sink_size_start=3, sink_size_end=2, chunk_size=16, sketch_dimension=8,
                           blending=blending, seed=2)  # fmt: skip
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, 2, seed=9))
    beta = ratio if blending is None else blending
    for i, rec in seen.items():
        want = beta * leverage_f64(rec, 8, 2) + (1 - beta) * chunk_attention_f64(rec, 16)
        middle = slice(3, n - 2)
        torch.testing.assert_close(rec.scores.double()[..., middle], want[..., middle], rtol=2e-3, atol=2e-3)
        ranked = want.clone()
        ranked[..., :3], ranked[..., n - 2 :] = torch.inf, torch.inf
        assert_keeps_top(cache.layers[i].keys, rec.keys, ranked, tol=5e-3)


def test_compactor_needs_every_hidden_state_and_refuses_bad_blending():
    with pytest.raises(ValueError, match=r"blending must be a number in \[0, 1\] or None"):
        CompactorPress(0.5, blending=1.5)
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    keys = torch.randn(1, 2, 20, 16)
    pe = model.model.rotary_emb(keys, torch.arange(20)[None])
    with pytest.raises(ValueError, match="needs the hidden states of every cached token .* got 4 for 20 tokens"):
        NonCausalAttnPress(0.5).score(module, torch.randn(1, 4, 64), keys, keys, None, {"position_embeddings": pe})
