"""Isolation: importing kvpress only registers the pipeline; a press leaves no trace on the model it was used on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model

_IMPORT_PROBE = textwrap.dedent(
    """
    import json, types
    import torch
    import transformers
    import transformers.cache_utils, transformers.masking_utils, transformers.modeling_utils, transformers.pipelines
    import transformers.integrations.sdpa_attention
    import transformers.models.llama.modeling_llama
    from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.pipelines import PIPELINE_REGISTRY

    MODULES = [transformers.cache_utils, transformers.masking_utils, transformers.modeling_utils,
               transformers.pipelines, transformers.integrations.sdpa_attention,
               transformers.models.llama.modeling_llama, torch.nn.functional]

    def namespace(module):
        # Every non-module attribute, by identity: a monkey patch replaces one of them or adds one.
        return {k: id(v) for k, v in vars(module).items() if not isinstance(v, types.ModuleType)}

    def state():
        return {
            "attention": sorted(AttentionInterface._global_mapping),
            "masks": sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping),
            "tasks": sorted(PIPELINE_REGISTRY.get_supported_tasks()),
        }

    before, spaces = state(), [namespace(m) for m in MODULES]
    import kvpress
    from kvpress.cache.attention import compressed_attention
    from kvpress.cache.forward_keyword import cache_kwargs
    after = state()
    patched = [f"{m.__name__}.{k}" for m, s in zip(MODULES, spaces) for k, v in namespace(m).items() if s.get(k) != v]

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        with kvpress.KnormPress(0.5)(model):
            model.model(input_ids=torch.arange(1, 11)[None], **cache_kwargs(model.model, cache))
        after_press = state()
        with compressed_attention(model):
            model(input_ids=torch.tensor([[3]]), **cache_kwargs(model, cache), position_ids=torch.tensor([[10]]))
    print(json.dumps({"before": before, "after": after, "patched": patched, "after_press": after_press,
                      "after_decode": state(), "attn": model.config._attn_implementation}))
    """
)


def test_import_only_registers_the_pipeline():
    """Run in a fresh interpreter: this test process imported kvpress long ago."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    assert after["attention"] == before["attention"] and "kvpress" not in after["attention"]
    assert after["masks"] == before["masks"]
    assert set(after["tasks"]) - set(before["tasks"]) == {"kv-press-text-generation"}
    assert set(before["tasks"]) <= set(after["tasks"])
    assert report["patched"] == []
    # A prefill press needs no attention function; the "kvpress" one is registered on first decode, and the model's
    # own implementation is back afterwards. No mask function is ever registered for it.
    assert report["after_press"] == after
    assert report["after_decode"]["attention"] == sorted([*before["attention"], "kvpress"])
    assert report["after_decode"]["masks"] == before["masks"]
    assert report["attn"] == "sdpa"


def _module_state(model) -> dict:
    """Every attribute of every module, by identity; containers (hook and parameter dicts) also by their keys."""
    return {
        name: {k: (id(v), tuple(v) if isinstance(v, dict) else None) for k, v in vars(m).items()}
        for name, m in model.named_modules()
    }


def _compress(model, press, ids) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return cache


@dataclass
class _FailingPress(ScorerPress):
    """Raises inside the layer hook, in the middle of a forward."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        raise RuntimeError(f"scoring failed in layer {module.layer_idx}")


def test_press_adds_no_model_attribute(arch):
    model = tiny_model(arch)
    before = _module_state(model)
    ids = random_ids(20, batch=2)
    with torch.no_grad():
        logits = model(ids).logits
        with SnapKVPress(0.5, window_size=4)(model):
            model.model(input_ids=ids, **cache_kwargs(model.model, DynamicCache(config=model.config)))
            inside = _module_state(model)
        assert _module_state(model) == before
        assert torch.equal(model(ids).logits, logits)
    # Inside the block only hook dictionaries changed (gained entries); no attribute was added or replaced.
    for name, attrs in inside.items():
        assert attrs.keys() == before[name].keys()
        assert all(attrs[k][0] == before[name][k][0] for k in attrs)


@pytest.mark.parametrize("where", ["in a layer hook", "in the block"])
def test_exception_removes_hooks(where):
    model = tiny_model("qwen3")
    before = _module_state(model)
    ids = random_ids(16)
    with torch.no_grad():
        logits = model(ids).logits
        if where == "in a layer hook":
            with pytest.raises(RuntimeError, match="scoring failed in layer 0"):
                with _FailingPress(0.5)(model):
                    model.model(input_ids=ids, **cache_kwargs(model.model, DynamicCache(config=model.config)))
        else:
            with pytest.raises(KeyError, match="boom"):
                with KnormPress(0.5)(model):
                    raise KeyError("boom")
        assert _module_state(model) == before
        assert torch.equal(model(ids).logits, logits)
        # A press used afterwards compresses as usual (nothing stale keeps firing).
        cache = _compress(model, KnormPress(0.5), ids)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [8] * model.config.num_hidden_layers


def test_nested_presses_on_two_models():
    """Two models compressed in one nested block give exactly what each gives alone."""
    m1, m2 = tiny_model("llama"), tiny_model("gemma3", "eager")
    ids1, ids2 = random_ids(24, seed=1), random_ids(30, batch=2, seed=2)
    p1, p2 = KnormPress(0.25), SnapKVPress(0.5, window_size=4)
    alone1, alone2 = _compress(m1, p1, ids1), _compress(m2, p2, ids2)
    c1, c2 = DynamicCache(config=m1.config), DynamicCache(config=m2.config)
    with torch.no_grad(), p1(m1) as r1:
        with p2(m2) as r2:
            m2.model(input_ids=ids2, **cache_kwargs(m2.model, c2))
            m1.model(input_ids=ids1, **cache_kwargs(m1.model, c1))
    for cache, alone in ((c1, alone1), (c2, alone2)):
        for a, b in zip(cache.layers, alone.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert r1.compressed_layers == [0, 1, 2] and set(r1.original_lengths.values()) == {24}
    assert r2.compressed_layers == [2] and set(r2.original_lengths.values()) == {30}
    assert [layer.keys.shape[-2] for layer in c1.layers] == [18, 18, 18]
    assert c2.layers[2].keys.shape[-2] == 15
