"""VarlenCache: head-variable storage against a dense cache that masks the pruned positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from kvpress.cache.attention import compressed_attention
from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.test_adakv_press import reference_budgets

# ---- a dense reference: the full cache, with per-(layer, sequence, head) masks of the kept positions -----------
_MASKS: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
    """Dense float64 attention where the prefill positions outside ``_MASKS[layer]`` (batch, kv_heads, n) are hidden."""
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = hq // hkv
    logits = (query.double() @ key.double().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
    visible = torch.ones(b, hkv, q_len, kv_len, dtype=torch.bool)
    kept = _MASKS.get(module.layer_idx)
    if kept is not None:
        visible[..., : kept.shape[-1]] &= kept[:, :, None, :]
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    cols = torch.arange(kv_len)[None, :]
    visible &= cols <= pos
    if sliding_window:
        visible &= (pos - cols) < sliding_window
    logits = logits.masked_fill(~visible.repeat_interleave(g, 1), float("-inf"))
    out = logits.softmax(-1) @ value.double().repeat_interleave(g, 1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvpress_test_masked", _masked_attention)


# AdaKV's per-head counts, recomputed one sequence at a time (window tokens, then the floor, then the best leftovers).
_reference_budgets = reference_budgets


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_adakv_decoding_matches_masked_dense_reference(arch, ratio):
    model = tiny_model(arch)
    n, batch = 36, 2
    ids = random_ids(n, batch)
    # No pooling: max-pooled scores tie, and ties would make the reference's choice ambiguous.
    inner = SnapKVPress(ratio, window_size=4, kernel_size=1)
    press = AdaKVPress(inner, alpha_safeguard=0.5)

    # Reference selection, recomputed from the full prefill with the inner press's scores.
    full = DynamicCache(config=model.config)
    captured = {}

    def grab(module, args, kwargs, output):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in layers]
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, full))
    for hd in handles:
        hd.remove()
    _MASKS.clear()
    expected_lengths = {}
    for m in layers:
        if getattr(m, "sliding_window", None):
            continue
        hs, pe = captured[m.layer_idx]
        keys = full.layers[m.layer_idx].keys
        with torch.no_grad():
            scores = inner.score(m, hs, keys, full.layers[m.layer_idx].values, None, {"position_embeddings": pe})
        k = round(n * (1 - ratio))
        lengths = _reference_budgets(scores.float(), k, 0.5)
        mask = torch.zeros(batch, keys.shape[1], n, dtype=torch.bool)
        order = scores.argsort(dim=-1, descending=True)
        for b in range(batch):
            for h in range(keys.shape[1]):
                mask[b, h, order[b, h, : lengths[b, h]]] = True
        _MASKS[m.layer_idx] = mask
        expected_lengths[m.layer_idx] = lengths

    cache = VarlenCache(config=model.config)
    with torch.no_grad(), press(model) as report:
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    for idx, lengths in expected_lengths.items():
        assert torch.equal(report.kept_lengths[idx], lengths)
        assert torch.equal(cache.head_lengths(idx), lengths)
        assert int(lengths.sum()) == batch * lengths.shape[1] * round(n * (1 - ratio))

    question = random_ids(4, batch, seed=7)
    steps = [question] + [random_ids(1, batch, seed=8 + s) for s in range(3)]
    pos = n
    for step_ids in steps:
        positions = torch.arange(pos, pos + step_ids.shape[1])[None].expand(batch, -1)
        with torch.no_grad():
            with compressed_attention(model):
                out = model(input_ids=step_ids, **cache_kwargs(model, cache), position_ids=positions).logits
            model.set_attn_implementation("kvpress_test_masked")
            try:
                ref = model(input_ids=step_ids, **cache_kwargs(model, full), position_ids=positions).logits
            finally:
                model.set_attn_implementation("sdpa")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        pos += step_ids.shape[1]


def _kv_bytes(n_tokens: int, model) -> int:
    cfg = model.config
    return 2 * n_tokens * cfg.num_key_value_heads * cfg.head_dim * 4


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_memory_is_what_is_kept(ratio):
    model = tiny_model("llama")
    n = 200
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), AdaKVPress(KnormPress(ratio))(model):
        model.model(input_ids=random_ids(n), **cache_kwargs(model.model, cache))
    layers = model.config.num_hidden_layers
    kept = round(n * (1 - ratio))
    metadata = layers * (4 * (model.config.num_key_value_heads + 1) + 4)  # int32 cu_seqlens + tail_lens per layer
    assert cache.memory_bytes() == layers * _kv_bytes(kept, model) + metadata
    full = layers * _kv_bytes(n, model)
    assert abs(cache.memory_bytes() - metadata - (1 - ratio) * full) <= 0.02 * full


def test_snapshot_restore_and_crop():
    model = tiny_model("qwen2")
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), AdaKVPress(KnormPress(0.5))(model):
        model.model(input_ids=random_ids(30), **cache_kwargs(model.model, cache))
    state = snapshot_cache(cache)
    before = [cache.head_lengths(i).clone() for i in range(len(cache.layers))]
    with torch.no_grad(), compressed_attention(model):
        ref = model(input_ids=random_ids(3, seed=2), **cache_kwargs(model, cache), position_ids=torch.arange(30, 33)[None]).logits
        model(input_ids=random_ids(5, seed=3), **cache_kwargs(model, cache), position_ids=torch.arange(33, 38)[None])
        assert all(torch.equal(cache.head_lengths(i), before[i] + 8) for i in range(len(before)))
        restore_cache(cache, state)
        assert all(torch.equal(cache.head_lengths(i), before[i]) for i in range(len(before)))
        again = model(input_ids=random_ids(3, seed=2), **cache_kwargs(model, cache), position_ids=torch.arange(30, 33)[None]).logits
        torch.testing.assert_close(again, ref)
        for layer in cache.layers:
            layer.crop(-3)
        assert all(torch.equal(cache.head_lengths(i), before[i]) for i in range(len(before)))
    with pytest.raises(ValueError, match="crop takes a negative count"):
        cache.layers[0].crop(-1)


def test_batch_select_matches_running_alone():
    model = tiny_model("llama")
    ids = random_ids(24, batch=3)
    both = VarlenCache(config=model.config)
    alone = VarlenCache(config=model.config)
    press = AdaKVPress(KnormPress(0.5))
    with torch.no_grad():
        with press(model):
            model.model(input_ids=ids, **cache_kwargs(model.model, both))
            model.model(input_ids=ids[2:], **cache_kwargs(model.model, alone))
        for layer in both.layers:
            layer.batch_select_indices(torch.tensor([2]))
        q = random_ids(2, seed=5)
        with compressed_attention(model):
            a = model(input_ids=q, **cache_kwargs(model, both), position_ids=torch.arange(24, 26)[None]).logits
            b = model(input_ids=q, **cache_kwargs(model, alone), position_ids=torch.arange(24, 26)[None]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch indices must be in"):
        both.layers[0].batch_select_indices(torch.tensor([1]))


def test_save_and_load_answer_without_prefill(tmp_path, arch):
    model = tiny_model(arch)
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), AdaKVPress(SnapKVPress(0.5, window_size=4))(model):
        model.model(input_ids=random_ids(30, batch=2), **cache_kwargs(model.model, cache))
    path = tmp_path / "ctx.safetensors"
    cache.save(path)
    loaded = VarlenCache.load(path)
    q = random_ids(3, batch=2, seed=9)
    pos = torch.arange(30, 33)[None].expand(2, -1)
    with torch.no_grad(), compressed_attention(model):
        a = model(input_ids=q, **cache_kwargs(model, cache), position_ids=pos).logits
        b = model(input_ids=q, **cache_kwargs(model, loaded), position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert loaded.memory_bytes() <= cache.memory_bytes()


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a kvpress VarlenCache file"):
        VarlenCache.load(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "layout"])
def test_load_of_a_damaged_file_names_the_file_and_the_problem(tmp_path, damage):
    model = tiny_model("llama")
    cache = VarlenCache(config=model.config)
    with torch.no_grad(), AdaKVPress(SnapKVPress(0.5, window_size=4))(model):
        model.model(input_ids=random_ids(20), **cache_kwargs(model.model, cache))
    good = tmp_path / "good.safetensors"
    cache.save(good)
    before = cache.memory_bytes()
    path = tmp_path / f"{damage}.safetensors"
    raw = good.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file whose layout names tensors it does not hold
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(good), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("1.")}
        save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError) as err:
        VarlenCache.load(path)
    message = str(err.value)
    assert str(path) in message and message.startswith("VarlenCache.load: ")
    if damage == "layout":
        assert "holds no valid VarlenCache" in message and "missing" in message
    else:
        assert "is not a readable safetensors file" in message
    # The source cache is untouched and the good file still loads.
    assert cache.memory_bytes() == before and VarlenCache.load(good).memory_bytes() <= before
    with pytest.raises(FileNotFoundError, match="VarlenCache.load: no file"):
        VarlenCache.load(tmp_path / "missing.safetensors")


def test_bad_lengths_leave_layer_unchanged():
    layer = VarlenLayer()
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, k)
    with pytest.raises(ValueError, match="lengths must have shape"):
        layer.replace(CompressedKV(k, k, head_lengths=torch.tensor([[6, 1]])))
    assert not layer.ragged and torch.equal(layer.keys, k)


def test_head_variable_press_on_dense_cache_is_refused_and_cache_kept():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    ids = random_ids(20)
    with pytest.raises(ValueError, match="VarlenCache"):
        with torch.no_grad(), AdaKVPress(KnormPress(0.5))(model):
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    # Layer 0 holds the full prefill untouched; the model still runs normally.
    assert cache.layers[0].keys.shape[-2] == 20
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_gqa_kernel_path_equals_sdpa_for_uniform_lengths():
    """Uniform lengths through VarlenCache give the same logits as a DynamicCache with the same press."""
    model = tiny_model("mistral")
    ids = random_ids(32, batch=2)
    c1, c2 = VarlenCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        for c in (c1, c2):
            with KnormPress(0.5)(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, c))
        pos = torch.arange(32, 36)[None].expand(2, -1)
        q = random_ids(4, batch=2, seed=1)
        with compressed_attention(model):
            a = model(input_ids=q, **cache_kwargs(model, c1), position_ids=pos).logits
            b = model(input_ids=q, **cache_kwargs(model, c2), position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert F.mse_loss(a, b).item() < 1e-10
