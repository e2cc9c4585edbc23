"""KVzipPress: the attention each cached pair receives while the model reconstructs the context, against float64
softmaxes of the reconstruction's captured queries, and the budget shared across layers and heads."""

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache import VarlenCache
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import read_ragged_layer
from kvpress.presses import KVzipPress
from tests.conftest import random_ids, tiny_model
from tests.fixtures_pipeline import smollm2_tokenizer
from tests.presses.press_harness import full_layers, queries_f64


def reconstruction_scores_f64(model, ids, prompt, chunk_size, n_sink) -> dict:
    """Per full layer ``(batch, kv_heads, n)``: the largest float64 softmax weight each context key receives from
    the queries of every reconstruction chunk (prompt + chunk, placed after the context, over the full cache)."""
    b, n = ids.shape
    layers = full_layers(model)
    attn = {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")}
    best = {i: torch.zeros(b, model.config.num_key_value_heads, n, dtype=torch.float64) for i in layers}
    for start in range(0, n, chunk_size):
        cache = DynamicCache(config=model.config)
        captured = {}

        def grab(module, args, kwargs, output):
            captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

        with torch.no_grad():
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
            chunk = torch.cat(
                [torch.tensor(prompt, dtype=ids.dtype).expand(b, -1), ids[:, start : start + chunk_size]], 1
            )
            handles = [attn[i].register_forward_hook(grab, with_kwargs=True) for i in layers]
            try:
                positions = torch.arange(n, n + chunk.shape[1]).expand(b, -1)
                model.model(input_ids=chunk, position_ids=positions, **cache_kwargs(model.model, cache))
            finally:
                for handle in handles:
                    handle.remove()
        m = chunk.shape[1]
        for i in layers:
            hidden, (cos, sin) = captured[i]
            q = queries_f64(attn[i], hidden, cos, sin)
            k = cache.layers[i].keys.double()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = q @ k.transpose(-1, -2) * attn[i].scaling
            future = torch.arange(n + m)[None, :] > torch.arange(n, n + m)[:, None]
            w = logits.masked_fill(future, float("-inf")).softmax(-1)[..., :n].amax(-2)  # (b, heads, n)
            w = w.view(b, cache.layers[i].keys.shape[1], -1, n).amax(2)  # max over each kv head's group
            best[i] = torch.maximum(best[i], w)
    for s in best.values():
        s[..., :n_sink] = float("inf")
    return best


def kept_sets(report, layer):
    idx = report.kept_indices[layer]
    n = report.original_lengths[layer]
    kept = torch.zeros(*idx.shape[:2], n + 1, dtype=torch.bool)
    kept.scatter_(2, idx.clamp(min=-1) % (n + 1), True)
    return kept[..., :n]


@pytest.mark.parametrize(("batch", "n", "ratio", "chunk", "prompt", "layerwise"),
                         [(1, 30, 0.5, 64, (), False), (2, 41, 0.6, 16, (5, 9, 2), False),
                          (1, 33, 0.3, 11, (7,), True)])  # fmt: skip
def test_scores_and_budgets_match_the_float64_reconstruction(arch, batch, n, ratio, chunk, prompt, layerwise):
    model = tiny_model(arch, kv_heads=1) if arch == "llama" and batch == 2 else tiny_model(arch)
    ids = random_ids(n, batch, seed=n)
    press = KVzipPress(ratio, chunk_size=chunk, repeat_prompt_ids=prompt, layerwise=layerwise, n_sink=2)
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), press(model, record_kept=True) as report:
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    want = reconstruction_scores_f64(model, ids, prompt, chunk, n_sink=2)
    layers = full_layers(model)
    assert sorted(report.kept_lengths) == layers
    k = round(n * (1 - ratio))
    heads = want[layers[0]].shape[1]
    for i in layers:
        got = report.scores[i].double()
        finite = want[i].isfinite()
        torch.testing.assert_close(got[finite], want[i][finite], rtol=1e-4, atol=1e-6)
        assert bool(got[~finite].isposinf().all())
        if layerwise:
            assert torch.equal(report.kept_lengths[i].sum(1), torch.full((batch,), heads * k))
    total = sum(report.kept_lengths[i].sum(1) for i in layers)
    assert torch.equal(total, torch.full((batch,), len(layers) * heads * k))
    # No dropped pair outranks a kept one, over the whole model (per layer when layerwise), in float64.
    groups = [[i] for i in layers] if layerwise else [layers]
    for group in groups:
        kept = torch.stack([kept_sets(report, i) for i in group], 1)
        ref = torch.stack([want[i] for i in group], 1)
        lowest_kept = ref.masked_fill(~kept, float("inf")).flatten(1).amin(1)
        highest_dropped = ref.masked_fill(kept, float("-inf")).flatten(1).amax(1)
        assert bool((highest_dropped <= lowest_kept + 1e-6).all())
    for i in layers:  # the cache holds exactly the kept counts: memory is saved for real
        assert torch.equal(read_ragged_layer(cache, i)[2].cpu().long(), report.kept_lengths[i])


def test_the_paper_prompt_is_tokenized_without_special_tokens():
    tok = smollm2_tokenizer()
    press = KVzipPress.with_prompt(tok, 0.5, chunk_size=128)
    assert press.repeat_prompt_ids == tuple(
        tok("\n\nRepeat the previous context:\n", add_special_tokens=False).input_ids
    )
    assert press.compression_ratio == 0.5 and press.chunk_size == 128


def test_a_prefill_from_embeddings_is_refused_naming_input_ids():
    model = tiny_model("llama")
    cache = VarlenCache(config=model.config)
    embeds = model.model.embed_tokens(random_ids(20, 1, seed=0))
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad(), KVzipPress(0.5)(model):
        model.model(inputs_embeds=embeds, **cache_kwargs(model.model, cache))


@pytest.mark.parametrize(("kwargs", "match"), [({"chunk_size": 0}, "chunk_size must be an int >= 1"),
                                               ({"n_sink": -1}, "n_sink"), ({"layerwise": 1}, "layerwise"),
                                               ({"repeat_prompt_ids": (1, -2)}, "repeat_prompt_ids")])  # fmt: skip
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVzipPress(0.5, **kwargs)
