"""sparse_prefill: full patterns reproduce dense attention; sparse ones attend exactly where their blocks say, head by
head (against sdpa with an explicit mask); dense fallbacks are counted; it composes with a press."""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import read_layer
from kvpress.generation import prefill
from kvpress.presses.knorm_press import KnormPress
from kvpress.sparse_prefill import HeadPattern, SparsePrefillConfig, sparse_prefill
from kvpress.utils import full_attention_layer_indices
from tests.conftest import random_ids, tiny_model

BS = 16


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma3"])
def test_patterns_that_read_every_causal_block_equal_dense_attention(arch):
    model = tiny_model(arch)
    text = model.config.get_text_config(decoder=True)
    ids = random_ids(90, seed=2)
    full = HeadPattern(kind="a_shape", sink_blocks=0, local_blocks=100)
    config = SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads, full, block_size=BS,
                                         min_tokens=32)  # fmt: skip
    want = _logits(model, ids)
    with sparse_prefill(model, config) as report:
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Sliding-window layers (Gemma3) keep their dense windowed attention, as the press hooks leave them alone.
    assert report.sparse_calls == len(full_attention_layer_indices(text)) and report.density == 1.0
    assert report.dense_calls == {}
    assert model.config._attn_implementation == "sdpa"  # restored


def _explicit_a_shape(n: int, sink: int, local: int) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((j // BS < sink) | (j // BS > i // BS - local)) & (j <= i)


def test_each_head_reads_its_own_pattern_against_sdpa_with_explicit_masks():
    """Different A-shapes per query head (GQA 2:1): the logits equal a model whose attention is sdpa under each head's
    token mask built from the definition."""
    model = tiny_model("qwen2")
    text = model.config.get_text_config(decoder=True)
    heads = [
        HeadPattern(kind="a_shape", sink_blocks=h % 2, local_blocks=1 + h) for h in range(text.num_attention_heads)
    ]
    config = SparsePrefillConfig(layers={i: heads for i in range(text.num_hidden_layers)}, block_size=BS, min_tokens=32)
    ids = random_ids(100, seed=3)
    masks = torch.stack([_explicit_a_shape(100, p.sink_blocks, p.local_blocks) for p in heads])[None]

    def explicit(module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=masks, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_explicit_masks", explicit)
    model.set_attn_implementation("test_explicit_masks")
    try:
        want = _logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    with sparse_prefill(model, config) as report:
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < report.density < 1


def test_dense_fallbacks_are_counted_and_a_press_still_compresses():
    model = tiny_model("llama")
    text = model.config.get_text_config(decoder=True)
    config = SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads,
                                         HeadPattern(kind="vertical_slash", n_vertical=4, n_slash=2), block_size=BS,
                                         min_tokens=64)  # fmt: skip
    with sparse_prefill(model, config) as report:
        _logits(model, random_ids(40))
    assert report.sparse_calls == 0 and report.dense_calls == {"fewer than min_tokens=64 tokens": 3}
    ids = random_ids(120, seed=5)
    plain = DynamicCache(config=model.config)
    prefill(model, ids, plain, KnormPress(0.5))
    cache = DynamicCache(config=model.config)
    with sparse_prefill(model, config) as report:
        prefill(model, ids, cache, KnormPress(0.5))
    assert report.sparse_calls == 3 and report.density < 1
    keys, _ = read_layer(cache, 0)
    assert keys.shape[2] == 60  # the press kept half
    torch.testing.assert_close(keys, read_layer(plain, 0)[0])  # layer 0's keys do not depend on its attention
    with sparse_prefill(model, config) as report:  # a forward over a filled cache runs dense, and says so
        with torch.no_grad():
            model(input_ids=random_ids(2), **cache_kwargs(model, cache))
    assert "the cache already held tokens" in report.dense_calls


def test_config_files_and_mismatches_are_named(tmp_path):
    model = tiny_model("llama")
    text = model.config.get_text_config(decoder=True)
    config = SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads,
                                         HeadPattern(kind="block_sparse", top_blocks=3), block_size=BS)  # fmt: skip
    path = tmp_path / "patterns.json"
    config.save(path)
    assert SparsePrefillConfig.load(path) == config
    with sparse_prefill(model, path) as report:
        _logits(model, random_ids(8))
    assert report.sparse_calls == 0
    with pytest.raises(ValueError, match="does not exist"):
        SparsePrefillConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"layers": {"0": [{"kind": "diagonal"}]}}')
    with pytest.raises(ValueError, match="is not a valid pattern file"):
        SparsePrefillConfig.load(tmp_path / "bad.json")
    wrong_heads = SparsePrefillConfig(layers={0: [HeadPattern(kind="a_shape")] * 3})
    with pytest.raises(ValueError, match="layer 0 lists 3 head patterns; the model has 4 query heads"):
        with sparse_prefill(model, wrong_heads):
            pass
    with pytest.raises(ValueError, match="names layer 7; the model has layers 0..2"):
        with sparse_prefill(model, SparsePrefillConfig(layers={7: [HeadPattern(kind="a_shape")] * 4})):
            pass
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="one pattern per query head"):
        SparsePrefillConfig(layers={0: [HeadPattern(kind="a_shape")] * 4, 1: [HeadPattern(kind="a_shape")] * 2})


def test_the_pipeline_and_the_generation_layer_take_a_pattern_file(tmp_path):
    """``sparse_prefill=`` (pipeline) and ``sparse=`` (prefill): with patterns that read every block the answers are
    those of a dense prefill; a prompt under min_tokens warns that every layer ran dense; eager-attention presses
    are refused."""
    from kvpress.presses.observed_attention_press import ObservedAttentionPress
    from tests.fixtures_pipeline import random_text, text_pipeline

    pipe = text_pipeline("llama")
    text = pipe.model.config.get_text_config(decoder=True)
    full = HeadPattern(kind="a_shape", sink_blocks=0, local_blocks=1000)
    path = tmp_path / "p.json"
    SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads, full, block_size=BS,
                                min_tokens=32).save(path)  # fmt: skip
    context = random_text(120, seed=3)
    want = pipe(context, question="Which colour?", press=KnormPress(0.5), max_new_tokens=5, cuda_graph=False)
    got = pipe(context, question="Which colour?", press=KnormPress(0.5), max_new_tokens=5, sparse_prefill=path,
               cuda_graph=False)  # fmt: skip
    assert got == want
    short = SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads, full, block_size=BS,
                                        min_tokens=10_000)  # fmt: skip
    with pytest.warns(UserWarning, match="the sparse prefill ran every layer dense: ..fewer than min_tokens=10000 tokens': 3"):
        prefill(pipe.model, random_ids(50), DynamicCache(config=pipe.model.config), KnormPress(0.5), sparse=short)
    with pytest.raises(
        ValueError, match="ObservedAttentionPress reads the attention weights .* pass sparse_prefill=None"
    ):
        pipe(context, question="Which colour?", press=ObservedAttentionPress(0.5), sparse_prefill=path)
    with pytest.raises(ValueError, match="sparse_prefill must be a SparsePrefillConfig or the path of a pattern file"):
        pipe(context, question="Which colour?", sparse_prefill=3)
    assert pipe.model.config._attn_implementation == "sdpa"
