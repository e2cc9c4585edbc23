"""DuoAttentionPress: streaming heads keep exactly the sinks and the recent window, retrieval heads every token;
heads classified from a published pattern file, or on the fly against a float64 softmax of the last queries."""

import pytest
import torch

from kvpress.cache import VarlenCache
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.presses import DuoAttentionPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, queries_f64
from tests.presses.test_kvcompose_press import record_layer_scores


def run(model, press, ids):
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), press(model, record_kept=True) as report:
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return cache, report


def assert_roles(report, layers, streaming, n, sink, recent):
    """Streaming heads hold exactly positions [0, sink) and [n - recent, n); the others all n positions."""
    window = set(range(min(sink, n))) | set(range(max(0, n - recent), n))
    for j, i in enumerate(layers):
        idx = report.kept_indices[i]
        for b in range(idx.shape[0]):
            for h in range(idx.shape[1]):
                held = {int(p) for p in idx[b, h] if p >= 0}
                assert held == (window if streaming[b, j, h] else set(range(n))), (i, b, h)


def outside_mass_f64(rec, n_queries, sink, recent):
    q = queries_f64(rec.module, rec.hidden, rec.cos, rec.sin)
    b, n_q, n, _ = q.shape
    w = min(n_queries, n)
    k = rec.keys.double().repeat_interleave(n_q // rec.keys.shape[1], dim=1)
    logits = q[:, :, -w:] @ k.transpose(-1, -2) * rec.module.scaling
    future = torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None]
    p = logits.masked_fill(future, float("-inf")).softmax(-1)
    outside = p[..., sink : max(sink, n - recent)].sum(-1).mean(-1)  # (b, heads)
    return outside.view(b, rec.keys.shape[1], -1).amax(-1)


@pytest.mark.parametrize(("batch", "n", "ratio", "sink", "recent", "n_queries"),
                         [(1, 40, 0.5, 4, 8, 16), (2, 33, 0.34, 2, 5, 64), (1, 25, 1.0, 3, 3, 4)])  # fmt: skip
def test_on_the_fly_roles_follow_the_float64_outside_mass(arch, batch, n, ratio, sink, recent, n_queries):
    model = tiny_model(arch)
    press = DuoAttentionPress(ratio, sink_size=sink, recent_size=recent, n_queries=n_queries)
    seen = record_layer_scores(press)
    cache, report = run(model, press, random_ids(n, batch, seed=n))
    layers = full_layers(model)
    mass = torch.stack([outside_mass_f64(seen[i], n_queries, sink, recent) for i in layers], 1)  # (b, L, h)
    got = torch.stack([seen[i].scores for i in layers], 1).double()
    torch.testing.assert_close(got, mass, rtol=1e-4, atol=1e-6)
    n_stream = round(ratio * mass[0].numel())
    flat = mass.flatten(1)
    streaming = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.argsort(1)[:, :n_stream], True)
    # Roles are decided by ranks: check the float64 ranking separates streaming from retrieval heads.
    if 0 < n_stream < flat.shape[1]:
        assert bool((flat.masked_fill(~streaming, -1).amax(1) <= flat.masked_fill(streaming, 2).amin(1) + 1e-6).all())
    assert_roles(report, layers, streaming.view_as(mass), n, sink, recent)
    kept = sum(int(report.kept_lengths[i].sum()) for i in layers)
    per_stream = len(set(range(min(sink, n))) | set(range(max(0, n - recent), n)))
    assert kept == batch * len(layers) * mass.shape[2] * n - int(streaming.sum()) * (n - per_stream)


def test_published_patterns_pick_the_lowest_gates_and_free_memory(tmp_path):
    model = tiny_model("llama")
    layers = full_layers(model)
    heads = model.config.num_key_value_heads
    gates = torch.rand(len(layers), heads, generator=torch.Generator().manual_seed(1))
    (tmp_path / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{g:.6f}" for g in row) for row in gates.tolist()) + "\n"
    )
    n = 48
    dense_cache, _ = run(model, DuoAttentionPress(0.0, patterns=str(tmp_path)), random_ids(n, 1, seed=3))
    cache, report = run(model, DuoAttentionPress(0.5, patterns=str(tmp_path), sink_size=4, recent_size=6),
                        random_ids(n, 1, seed=3))  # fmt: skip
    order = gates.flatten().argsort()[: round(0.5 * gates.numel())]
    streaming = torch.zeros(gates.numel(), dtype=torch.bool)
    streaming[order] = True
    assert_roles(report, layers, streaming.view(1, *gates.shape), n, 4, 6)
    assert layer_memory_bytes(cache) < 0.8 * layer_memory_bytes(dense_cache)


def test_bad_pattern_files_and_arguments_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="patterns: no DuoAttention pattern file"):
        DuoAttentionPress(0.5, patterns=str(tmp_path / "missing"))
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\t0.2\n0.3\tx\n")
    with pytest.raises(ValueError, match="not a table of numbers"):
        DuoAttentionPress(0.5, patterns=str(tmp_path))
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\t0.2\t0.3\n")
    press = DuoAttentionPress(0.5, patterns=str(tmp_path))
    with pytest.raises(ValueError, match=r"holds 1 layers x 3 kv heads; LlamaForCausalLM has 3 full-attention layers"):
        with press(tiny_model("llama")):
            pass
    with pytest.raises(ValueError, match=r"head_compression_ratio must be a number in \[0, 1\]"):
        DuoAttentionPress(1.5)
    with pytest.raises(ValueError, match="recent_size"):
        DuoAttentionPress(0.5, recent_size=-1)
