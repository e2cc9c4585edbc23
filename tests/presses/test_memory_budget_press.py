"""MemoryBudgetPress: kept counts derived from a byte budget at each layer's precision, memory held constant.

Every expected count is recomputed here from the storage layout (KIVI: keys per channel and values per token, in
groups of ``group_size`` with a scale and a zero each, codes packed in int32 words), with exact rational arithmetic.
Models have a head dimension of 32, the smallest one quantization groups tile.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    DynamicCache,
    LlamaConfig,
)

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.memory_budget_press import MemoryBudgetPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import assert_pipeline_matches_plain_decoding
from tests.presses.press_harness import record_scores

# Head dimension 32 everywhere (the shared tiny models' 16 is below the smallest group size); "llama_mqa" has one kv
# head for four query heads, the others two.
CONFIGS = {arch: (arch, None) for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")}
CONFIGS["llama_mqa"] = ("llama", 1)
HEAD_DIM = 32
WINDOW = 4  # SnapKV window of the tests (the default 32 would dominate such short contexts)


def model_of(arch: str, dtype: torch.dtype = torch.float32):
    base, kv_heads = CONFIGS[arch]
    return tiny_model(base, head_dim=HEAD_DIM, kv_heads=kv_heads, dtype=dtype)


def compressed_layers(config) -> list[int]:
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(kinds) if kind == "full_attention"]


# ---- independent reference of the storage cost ------------------------------------------------------------------
def reference_token_bytes(bits: int | None, group_size: int, head_dim: int, dtype_bytes: int) -> Fraction:
    """Bytes of one token of one kv-head: full precision, or KIVI-packed codes plus per-group scale and zero."""
    if bits is None:
        return Fraction(2 * head_dim * dtype_bytes)  # a key and a value row
    group_code_bytes = 4 * math.ceil(group_size * bits / 32)  # one group's codes fill whole int32 words
    group_bytes = group_code_bytes + 2 * dtype_bytes  # + scale + zero
    keys = Fraction(head_dim * group_bytes, group_size)  # each channel: one group per group_size tokens
    values = (head_dim // group_size) * group_bytes  # each token: head_dim / group_size groups of channels
    return keys + values


def reference_kept(n, layer, config, dtype_bytes, fraction=None, nbytes=None, bits=None, group_size=32, layer_bits=()):
    """Tokens per kv-head the budget pays for in ``layer`` (``layer_bits``: ``{layer: bits}`` overrides)."""
    kv, layers = config.num_key_value_heads, compressed_layers(config)
    if fraction is not None:
        budget = Fraction(str(fraction)) * n * kv * 2 * HEAD_DIM * dtype_bytes
    else:
        budget = Fraction(nbytes, len(layers))
    bits = dict(layer_bits).get(layer, bits)
    unit = 1 if bits is None else group_size  # quantized heads are stored in whole groups
    per_unit = kv * unit * reference_token_bytes(bits, group_size, HEAD_DIM, dtype_bytes)
    return min(n, math.floor(budget / per_unit) * unit)


def test_reference_cost_is_the_config_cost():
    for bits in (2, 4, 8):
        for g in (32, 64, 128):
            for dtype_bytes in (2, 4):
                q = QuantizationConfig(bits=bits, group_size=g, residual_length=g)
                assert q.bytes_per_token(0, 128, dtype_bytes) == reference_token_bytes(bits, g, 128, dtype_bytes)


# ---- kept counts on tiny models --------------------------------------------------------------------------------
# (budget_fraction, budget_bytes, bits, layer_bits)
CASES = {
    "fraction 16-bit": (0.3, None, None, ()),
    "fraction 4-bit": (0.1, None, 4, ()),
    "fraction 2-bit, layer 1 at 8": (0.1, None, 2, ((1, 8),)),
    "fraction 4-bit, layer 2 at 2": (0.08, None, 4, ((2, 2),)),
    "bytes 16-bit": (None, 12_000, None, ()),
    "bytes 8-bit, layer 0 at 4": (None, 20_000, 8, ((0, 4),)),
}


def make_press(inner, case, group_size=32):
    fraction, nbytes, bits, layer_bits = CASES[case]
    quantization = None
    if bits is not None:
        quantization = QuantizationConfig(
            bits=bits, group_size=group_size, residual_length=group_size, layer_bits=dict(layer_bits) or None
        )
    return MemoryBudgetPress(inner, budget_fraction=fraction, budget_bytes=nbytes, quantization=quantization)


def prefill(model, press, ids, cache=None):
    cache = cache if cache is not None else DynamicCache(config=model.config)
    with torch.no_grad(), press(model) as report:
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    return cache, report


def expected_counts(model, case, n, dtype_bytes=4):
    fraction, nbytes, bits, layer_bits = CASES[case]
    return {
        i: reference_kept(n, i, model.config, dtype_bytes, fraction, nbytes, bits, layer_bits=layer_bits)
        for i in compressed_layers(model.config)
    }


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_snapkv_keeps_the_budgeted_tokens(arch, case):
    model = model_of(arch)
    n, batch = 120, 2
    ids = random_ids(n, batch, seed=len(case))
    inner = SnapKVPress(window_size=WINDOW)
    scores = record_scores(inner)
    cache, report = prefill(model, make_press(inner, case), ids)
    expected = expected_counts(model, case, n)
    kv = model.config.num_key_value_heads
    assert report.compressed_layers == sorted(expected)
    for i, k in expected.items():
        assert torch.equal(report.kept_lengths[i], torch.full((batch, kv), k))
        if k == n:  # the budget covers the whole context: nothing to select
            continue
        # The kept tokens are the inner scorer's top k, in their original order; a budget smaller than the window
        # keeps the window's latest tokens (window scores are +inf, attention scores at most WINDOW).
        window = scores[i].scores.isposinf()
        ranking = torch.where(window, 1e6 + torch.arange(n, dtype=torch.float64), scores[i].scores.double())
        top = ranking.topk(k, dim=-1).indices.sort(-1).values
        kept = scores[i].keys.gather(2, top[..., None].expand(-1, -1, -1, HEAD_DIM))
        torch.testing.assert_close(cache.layers[i].keys, kept, rtol=0, atol=0)
    assert inner.target_size is None and inner.compression_ratio == 0.0  # the wrapped press is untouched


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "llama_mqa"])
def test_adakv_spends_the_budget_over_its_heads(arch, case):
    model = model_of(arch)
    n, batch = 100, 2
    ids = random_ids(n, batch, seed=7)
    press = make_press(AdaKVPress(SnapKVPress(window_size=WINDOW)), case)
    assert press.capabilities.head_variable
    cache, report = prefill(model, press, ids, VarlenCache(config=model.config))
    kv = model.config.num_key_value_heads
    for i, k in expected_counts(model, case, n).items():
        # Heads differ, but every sequence of the layer holds kv_heads * k tokens: the memory of k per head.
        assert torch.equal(report.kept_lengths[i].sum(-1), torch.full((batch,), kv * k))
        assert torch.equal(cache.head_lengths(i).long(), report.kept_lengths[i])
    # Same budget, same selection as AdaKV around SnapKV with that budget given directly (uniform cases).
    counts = set(expected_counts(model, case, n).values())
    if len(counts) == 1:
        direct, direct_report = prefill(
            model,
            AdaKVPress(SnapKVPress(window_size=WINDOW, target_size=counts.pop())),
            ids,
            VarlenCache(config=model.config),
        )
        for i in report.compressed_layers:
            assert torch.equal(report.kept_lengths[i], direct_report.kept_lengths[i])
            torch.testing.assert_close(cache.layers[i].seg_k, direct.layers[i].seg_k, rtol=0, atol=0)
            torch.testing.assert_close(cache.layers[i].seg_v, direct.layers[i].seg_v, rtol=0, atol=0)


def test_key_rerotation_keeps_the_budgeted_tokens():
    model = model_of("llama")
    n = 120
    ids = random_ids(n, 1, seed=2)
    press = make_press(KeyRerotationPress(KnormPress()), "fraction 2-bit, layer 1 at 8")
    assert press.capabilities.rerotates_positions
    cache, report = prefill(model, press, ids)
    for i, k in expected_counts(model, "fraction 2-bit, layer 1 at 8", n).items():
        assert cache.layers[i].keys.shape[2] == k and report.kept_lengths[i].eq(k).all()
    assert cache.layers[1].keys.shape[2] < cache.layers[0].keys.shape[2]  # 8-bit layer: fewer tokens


def test_cache_dtype_sets_the_token_cost():
    """Full-precision and scale bytes follow the cache dtype: a 2-byte cache keeps more tokens for the same bytes."""
    n = 400
    ids = random_ids(n, 1, seed=4)
    q8 = QuantizationConfig(bits=8, group_size=32, residual_length=32)
    # 8 bits, 2 kv-heads, one group of 32 tokens: 5120 bytes in float32, 4608 in bfloat16 (2-byte scales and zeros).
    for nbytes, quantization in ((12_000, None), (3 * 46_080, q8)):
        kept = {}
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            model = model_of("qwen3", dtype)
            press = MemoryBudgetPress(SnapKVPress(window_size=WINDOW), budget_bytes=nbytes, quantization=quantization)
            _, report = prefill(model, press, ids)
            bits = None if quantization is None else 8
            expected = {i: reference_kept(n, i, model.config, size, nbytes=nbytes, bits=bits) for i in range(3)}
            assert {i: int(v.max()) for i, v in report.kept_lengths.items()} == expected
            kept[size] = expected
        assert all(kept[2][i] > kept[4][i] for i in range(3))
    assert kept == {4: dict.fromkeys(range(3), 288), 2: dict.fromkeys(range(3), 320)}


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not None])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama_mqa"])
def test_quantized_cache_holds_the_planned_bytes(arch, case):
    """The press and the quantized cache agree: the cache holds the planned bytes plus its int32 lengths only."""
    model = model_of(arch)
    n, batch = 120, 2
    press = make_press(SnapKVPress(window_size=WINDOW), case)
    cache = QuantizedCache(config=model.config, quantization=press.quantization)
    _, report = prefill(model, press, random_ids(n, batch, seed=5), cache)
    assert {i: int(v.max()) for i, v in report.kept_lengths.items()} == expected_counts(model, case, n)
    extra = cache.memory_bytes() - batch * press.planned_bytes(n, model.config, model.dtype)
    segments = batch * model.config.num_key_value_heads
    assert 0 <= extra <= 3 * 4 * (3 * segments + 1 + batch)  # a few int32 per segment and sequence, per layer
    budget = batch * press.layer_budget_bytes(n, model.config, model.dtype) * 3
    assert cache.memory_bytes() - extra <= budget


def test_budget_above_the_context_keeps_everything():
    model = model_of("mistral")
    ids = random_ids(40, 1, seed=1)
    press = MemoryBudgetPress(
        SnapKVPress(window_size=WINDOW),
        budget_fraction=0.5,
        quantization=QuantizationConfig(bits=2, group_size=32, residual_length=32),
    )
    _cache, report = prefill(model, press, ids)
    assert all(v.eq(40).all() for v in report.kept_lengths.values())
    assert press.effective_compression_ratio(40, model.config, torch.float32) == 0.0


# ---- the plan: memory constant across per-layer bit widths -------------------------------------------------------
SMOLLM2_SHAPE = LlamaConfig(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    num_hidden_layers=30,
    head_dim=64,
    intermediate_size=1536,
)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(200, 50_000),
    fraction=st.floats(0.02, 1.0),
    by_bytes=st.booleans(),
    bits=st.sampled_from([None, 2, 4, 8]),
    group_size=st.sampled_from([32, 64]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_memory_stays_within_one_unit_per_layer_of_the_budget(seed, n, fraction, by_bytes, bits, group_size, dtype):
    """Stored bytes never exceed the budget, and miss it by less than one storage unit (a token at full precision,
    a group quantized) per layer; mixing bit widths across layers keeps the memory the same."""
    config = SMOLLM2_SHAPE
    kv, d, size, n_layers = 3, 64, dtype.itemsize, 30
    rng = random.Random(seed)
    layer_bits = {i: rng.choice([2, 4, 8]) for i in rng.sample(range(n_layers), rng.randint(0, n_layers))}
    full = n * n_layers * kv * 2 * d * size
    nbytes = max(1, round(fraction * full)) if by_bytes else None
    budget = Fraction(nbytes) if by_bytes else Fraction(str(fraction)) * full
    unit = 1 if bits is None else group_size
    totals, clamped = [], False
    for overrides in (None,) if bits is None else (None, layer_bits):  # uniform bits, then mixed
        q = None
        if bits is not None:
            q = QuantizationConfig(bits=bits, group_size=group_size, residual_length=group_size, layer_bits=overrides)
        press = MemoryBudgetPress(
            KnormPress(), budget_fraction=None if by_bytes else fraction, budget_bytes=nbytes, quantization=q
        )
        cost = {i: kv * reference_token_bytes(q and q.bits_for(i), group_size, d, size) for i in range(n_layers)}
        kept = {i: press.planned_tokens(n, i, config, dtype) for i in range(n_layers)}
        stored = {i: math.ceil(k / unit) * unit for i, k in kept.items()}  # a partial last group is stored padded
        for i in range(n_layers):
            # Each layer stores at most its share, and one more unit would not fit (unless all n are kept).
            assert stored[i] * cost[i] <= budget / n_layers
            assert kept[i] == n or (kept[i] % unit == 0 and (kept[i] + unit) * cost[i] > budget / n_layers)
            for j in range(n_layers):  # dearer tokens, fewer of them
                if cost[i] > cost[j]:
                    assert kept[i] <= kept[j]
        total = sum(stored[i] * cost[i] for i in range(n_layers))
        assert total <= budget
        clamped = clamped or any(k == n for k in kept.values())
        if not clamped:
            assert budget - total < unit * sum(cost.values())
        assert press.planned_bytes(n, config, dtype) == pytest.approx(float(total), rel=1e-12)
        assert press.effective_compression_ratio(n, config, dtype) == pytest.approx(
            1 - sum(kept.values()) / (n * n_layers), abs=1e-12
        )
        totals.append(total)
    if len(totals) == 2 and not clamped:
        # Both layouts fill the same budget to within one group per layer of the dearest precision.
        assert abs(totals[0] - totals[1]) < n_layers * kv * group_size * reference_token_bytes(8, group_size, d, size)


def test_unquantized_fraction_keeps_that_fraction_of_tokens():
    for fraction, n, kept in ((0.25, 1500, 375), (0.3, 10, 3), (0.125, 1000, 125), (1.0, 77, 77), (0.1, 30, 3)):
        press = MemoryBudgetPress(KnormPress(), budget_fraction=fraction)
        for dtype in (torch.float32, torch.bfloat16):
            assert press.planned_tokens(n, 4, SMOLLM2_SHAPE, dtype) == kept


def test_compression_ratio_property():
    assert MemoryBudgetPress(KnormPress(), budget_fraction=0.25).compression_ratio == pytest.approx(0.75)
    n = 1 << 20
    for bits in (2, 4, 8):
        for fraction in (0.1, 0.25, 0.5):
            q = QuantizationConfig(bits=bits, layer_bits={0: 8})
            press = MemoryBudgetPress(KnormPress(), budget_fraction=fraction, quantization=q)
            uniform = MemoryBudgetPress(
                KnormPress(), budget_fraction=fraction, quantization=QuantizationConfig(bits=bits)
            )
            exact = uniform.effective_compression_ratio(n, SMOLLM2_SHAPE, torch.bfloat16)
            assert press.compression_ratio == pytest.approx(exact, abs=65 / n)  # within one group of 64
    with pytest.raises(ValueError, match="budget_bytes=.*context length"):
        MemoryBudgetPress(KnormPress(), budget_bytes=10_000).compression_ratio  # noqa: B018


# ---- pipeline --------------------------------------------------------------------------------------------------
def test_pipeline_decodes_from_the_budgeted_cache():
    press = MemoryBudgetPress(KnormPress(), budget_fraction=0.4)
    lengths = assert_pipeline_matches_plain_decoding(press)
    assert len(set(lengths)) == 1 and 0 < lengths[0]


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget_fraction": 0.0}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_fraction": 1.5}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_fraction": -0.2}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_fraction": float("nan")}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_fraction": True}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_fraction": "0.5"}, "budget_fraction must be a number in \\(0, 1\\]"),
        ({"budget_bytes": 0}, "budget_bytes must be a positive int"),
        ({"budget_bytes": -100}, "budget_bytes must be a positive int"),
        ({"budget_bytes": 1000.0}, "budget_bytes must be a positive int"),
        ({}, "exactly one of budget_fraction .* and budget_bytes"),
        ({"budget_fraction": 0.5, "budget_bytes": 1000}, "exactly one of budget_fraction .* and budget_bytes"),
        (
            {"budget_fraction": 0.5, "quantization": {"bits": 5}},
            "quantization is not a valid QuantizationConfig: bits: bits must be one of 2, 3, 4, 8, got 5",
        ),
        (
            {"budget_fraction": 0.5, "quantization": {"group_size": 48}},
            "quantization is not a valid QuantizationConfig: group_size: group_size must be one of",
        ),
        (
            {"budget_fraction": 0.5, "quantization": {"layer_bits": {3: 16}}},
            "quantization is not a valid QuantizationConfig: layer_bits: layer_bits\\[3\\] must be",
        ),
        ({"budget_fraction": 0.5, "quantization": 4}, "quantization must be a QuantizationConfig"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBudgetPress(KnormPress(), **kwargs)


def test_quantization_dict_and_unsupported_bits():
    press = MemoryBudgetPress(
        KnormPress(), budget_fraction=0.5, quantization={"bits": 2, "group_size": 32, "residual_length": 32}
    )
    assert press.quantization == QuantizationConfig(bits=2, group_size=32, residual_length=32)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        MemoryBudgetPress(KnormPress(), budget_fraction=0.5, quantization={"bits": 5})


@pytest.mark.parametrize(
    "inner",
    [
        PyramidKVPress(),  # its own per-layer schedule would be silently replaced
        ChunkPress(KnormPress(0.5)),  # budgets each chunk, not the layer
        ThinKPress(0.5),  # prunes channels, not tokens
        AdaKVPress(PyramidKVPress()),
        "snapkv",
    ],
)
def test_presses_without_a_token_count_are_refused(inner):
    with pytest.raises(ValueError, match="press must be a ScorerPress with the default per-layer count"):
        MemoryBudgetPress(inner, budget_fraction=0.5)


def test_budget_too_small_for_one_token_per_head():
    model = model_of("llama")
    q = QuantizationConfig(bits=8, group_size=32, residual_length=32, layer_bits={2: 2})
    # 3 layers x 2 kv-heads x one group of 32 8-bit tokens (80 bytes each): at least 15360 bytes.
    with pytest.raises(ValueError, match="budget_bytes=15359 is too small.*accepted: budget_bytes >= 15360"):
        MemoryBudgetPress(KnormPress(), budget_bytes=15359, quantization=q).validate(model)
    with (
        pytest.raises(ValueError, match="budget_bytes=15359 is too small.*one group of 32 tokens"),
        MemoryBudgetPress(KnormPress(), budget_bytes=15359, quantization=q)(model),
    ):
        pass
    ids = random_ids(100, 1, seed=3)
    _, report = prefill(model, MemoryBudgetPress(KnormPress(), budget_bytes=15360, quantization=q), ids)
    assert [int(report.kept_lengths[i].max()) for i in range(3)] == [32, 32, 64]  # the 2-bit layer affords two groups
    # A fraction budget depends on the context: rejected before the first layer writes, the cache stays empty.
    press = MemoryBudgetPress(KnormPress(), budget_fraction=0.005)  # 60 tokens x 0.005 < one token
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="budget_fraction=0.005 is too small for a 60-token context.*>= 0.01667"):
        prefill(model, press, ids[:, :60], cache)
    assert cache.get_seq_length() == 0
    quantized = MemoryBudgetPress(KnormPress(), budget_fraction=0.1, quantization=q)  # 0.1 x 60 tokens < 32 at 8 bits
    with pytest.raises(ValueError, match="budget_fraction=0.1 is too small .*one group of 32 tokens.*>= 0.1667"):
        prefill(model, quantized, ids[:, :60], cache)
    assert cache.get_seq_length() == 0
    # The same press and cache then work on a context long enough for the budget.
    _, report = prefill(model, press, random_ids(400, 1, seed=3), cache)
    assert all(v.eq(2).all() for v in report.kept_lengths.values())


def test_model_must_fit_the_quantization():
    model = tiny_model("llama")  # head_dim 16: no group size tiles it
    press = MemoryBudgetPress(
        KnormPress(), budget_fraction=0.5, quantization=QuantizationConfig(group_size=32, residual_length=32)
    )
    with pytest.raises(ValueError, match="group_size=32 must divide the head dimension 16"):
        press.validate(model)
    press = MemoryBudgetPress(
        KnormPress(),
        budget_fraction=0.5,
        quantization=QuantizationConfig(group_size=32, residual_length=32, layer_bits={3: 8}),
    )
    with pytest.raises(ValueError, match="layer_bits names layer\\(s\\) \\[3\\].*accepted: layer indices 0..2"):
        press.validate(model_of("llama"))
    # The inner press's own checks still apply (SnapKV's window must fit the context).
    press = MemoryBudgetPress(SnapKVPress(window_size=50), budget_fraction=0.5)
    with pytest.raises(ValueError, match="window_size=50"):
        prefill(model_of("llama"), press, random_ids(30, 1))
