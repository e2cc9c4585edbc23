"""Press and benchmark registries: every press is reachable by name, nested and composed presses build from plain data,
the swept ratio lands on the outermost press that takes one, benchmarks import lazily, and errors name the culprit."""

import dataclasses
import inspect
import random

import pytest

import kvpress.presses as presses_module
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.presses import (
    AdaKVPress,
    AttentionEvictionPress,
    BasePress,
    ChunkPress,
    ComposedPress,
    CrossLayerPress,
    DuoAttentionPress,
    KeyRerotationPress,
    KnormPress,
    MemoryBudgetPress,
    PerLayerCompressionPress,
    RandomPress,
    ScorerPress,
    ScorerWrapperPress,
    SnapKVPress,
    ThinKPress,
    TOVAPress,
)
from kvpress_evaluation import registry
from kvpress_evaluation.benchmark import Benchmark
from kvpress_evaluation.ruler.benchmark import RulerBenchmark, RulerOptions

ABSTRACT = {BasePress, ScorerPress, ScorerWrapperPress, AttentionEvictionPress, CrossLayerPress}


def test_every_press_of_the_library_is_registered_once():
    exported = {
        obj
        for _, obj in inspect.getmembers(presses_module, inspect.isclass)
        if issubclass(obj, BasePress) and obj not in ABSTRACT
    }
    assert set(registry.PRESSES.values()) == exported
    assert len(registry.PRESSES) == len(exported)
    assert registry.NO_PRESS not in registry.PRESSES


# Valid non-default keyword arguments per scorer, drawn at random below.
SCORER_KWARGS = {
    "knorm": {},
    "tova": {},
    "snapkv": {"window_size": [8, 16, 64], "kernel_size": [3, 5], "pooling": ["max", "avg"]},
    "streaming_llm": {"n_sink": [0, 2, 8]},
    "random": {"seed": [0, 7]},
    "expected_attention": {"n_future_positions": [64, 256], "n_sink": [0, 4], "use_covariance": [True, False]},
    "pyramidkv": {"beta": [5, 20], "window_size": [16, 32]},
    "observed_attention": {},
}


@pytest.mark.parametrize("seed", range(5))
def test_built_presses_equal_direct_construction(seed):
    rng = random.Random(seed)
    for name, choices in SCORER_KWARGS.items():
        kwargs = {k: rng.choice(v) for k, v in choices.items() if rng.random() < 0.7}
        ratio = rng.choice([0.0, 0.25, 0.5])
        press = registry.build_press({"name": name, **kwargs, "compression_ratio": ratio})
        assert press == registry.PRESSES[name](compression_ratio=ratio, **kwargs)
    inner = {"name": "snapkv", "window_size": 16, "compression_ratio": 0.3}
    snap = SnapKVPress(compression_ratio=0.3, window_size=16)
    assert registry.build_press({"name": "adakv", "press": inner, "alpha_safeguard": 0.5}) == AdaKVPress(snap, 0.5)
    assert registry.build_press({"name": "chunk", "press": inner, "chunk_length": 32}) == ChunkPress(snap, 32)
    assert registry.build_press({"name": "key_rerotation", "press": "knorm"}) == KeyRerotationPress(KnormPress())
    layers = [0.1, 0.2, 0.3]
    built = registry.build_press({"name": "per_layer", "press": "tova", "compression_ratios": layers})
    assert built == PerLayerCompressionPress(TOVAPress(), layers)
    composed = registry.build_press(
        {"name": "composed", "presses": ["knorm", {"name": "think", "key_channel_compression_ratio": 0.5}]}
    )
    assert composed == ComposedPress([KnormPress(), ThinKPress(key_channel_compression_ratio=0.5)])
    assert registry.build_press("none") is None


def _innermost_ratio_holder(press):
    """Reference: the outermost press object whose class has a compression_ratio dataclass field."""
    if "compression_ratio" in {f.name for f in dataclasses.fields(press)}:
        return press
    if hasattr(press, "press") and isinstance(press.press, BasePress):
        return _innermost_ratio_holder(press.press)
    for inner in getattr(press, "presses", []):
        if "compression_ratio" in {f.name for f in dataclasses.fields(inner)}:
            return inner
    return None


def _random_spec(rng, depth=0):
    scorer = rng.choice(["knorm", "tova", "snapkv", "streaming_llm", "expected_attention"])
    kind = rng.choice(["plain", "adakv", "chunk", "key_rerotation", "composed"] if depth == 0 else ["plain"])
    if kind == "plain":
        return {"name": scorer}
    if kind == "composed":
        return {"name": "composed", "presses": [_random_spec(rng, 1), {"name": "think"}][: rng.choice([1, 2])]}
    return {"name": kind, "press": {"name": scorer}}


@pytest.mark.parametrize("seed", range(20))
def test_swept_ratio_lands_on_the_outermost_press_that_takes_one(seed):
    rng = random.Random(seed)
    spec = registry.normalize_press(_random_spec(rng))
    ratio = rng.choice([0.1, 0.5, 0.75])
    assert registry.takes_ratio(spec)
    press = registry.build_press(registry.with_ratio(spec, ratio))
    holder = _innermost_ratio_holder(press)
    assert holder is not None and holder.compression_ratio == ratio
    assert press.compression_ratio == pytest.approx(ratio)  # wrappers report the inner ratio; composed 1-(1-r)
    assert spec == registry.normalize_press(_random_spec(random.Random(seed)))  # the spec itself is not modified


def test_presses_with_their_own_budget_are_not_swept():
    for spec in ["none", "think", {"name": "knorm", "target_size": 64}, {"name": "snapkv", "compression_ratio": 0.3},
                 {"name": "adakv", "press": {"name": "knorm", "compression_ratio": 0.2}},
                 {"name": "composed", "presses": ["think"]}]:
        assert not registry.takes_ratio(registry.normalize_press(spec))
    with pytest.raises(ValueError, match="no swept compression_ratio"):
        registry.with_ratio(registry.normalize_press("think"), 0.5)
    # In a composition, a press with a fixed ratio keeps it and the next one gets the sweep.
    spec = registry.normalize_press({"name": "composed", "presses": [{"name": "knorm", "compression_ratio": 0.2},
                                                                     "tova"]})
    built = registry.build_press(registry.with_ratio(spec, 0.5))
    assert built == ComposedPress([KnormPress(0.2), TOVAPress(0.5)])


def test_budget_wrappers_take_the_sweep_as_their_own_budget():
    spec = registry.normalize_press({"name": "memory_budget", "press": "snapkv", "quantization": {"bits": 4}})
    for ratio in (0.0, 0.25, 0.75):
        press = registry.build_press(registry.with_ratio(spec, ratio))
        assert press == MemoryBudgetPress(SnapKVPress(), budget_fraction=1 - ratio, quantization=QuantizationConfig())
    fixed = {"name": "memory_budget", "press": "snapkv", "budget_bytes": 4096}
    assert not registry.takes_ratio(registry.normalize_press(fixed))
    # Per-layer ratios replace the inner budget, so a single swept ratio has nowhere to go.
    assert not registry.takes_ratio(registry.normalize_press({"name": "per_layer", "press": "knorm",
                                                              "compression_ratios": [0.5]}))


def test_duo_attention_takes_the_sweep_as_its_share_of_streaming_heads():
    spec = registry.normalize_press({"name": "duo_attention", "sink_size": 8})
    for ratio in (0.25, 0.75):
        assert registry.build_press(registry.with_ratio(spec, ratio)) == DuoAttentionPress(ratio, sink_size=8)
    assert not registry.takes_ratio(registry.normalize_press({"name": "duo_attention", "head_compression_ratio": 0.5}))
    with pytest.raises(ValueError, match="'compression_ratio' is not an argument of press 'duo_attention'"):
        registry.normalize_press({"name": "duo_attention", "compression_ratio": 0.5})


def test_seed_fills_presses_that_take_one():
    assert registry.build_press("random", seed=3) == RandomPress(seed=3)
    assert registry.build_press({"name": "random", "seed": 9}, seed=3) == RandomPress(seed=9)
    assert registry.build_press({"name": "adakv", "press": "random"}, seed=4) == AdaKVPress(RandomPress(seed=4))
    assert registry.build_press("knorm", seed=3) == KnormPress()


def test_labels():
    assert registry.press_label("snapkv") == "snapkv"
    assert registry.press_label({"name": "adakv", "press": "snapkv"}) == "adakv-snapkv"
    assert registry.press_label({"name": "composed", "presses": ["knorm", "think"]}) == "composed-knorm+think"
    assert registry.press_label({"name": "knorm", "label": "mine"}) == "mine"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("snapkvv", ["unknown press 'snapkvv'", "snapkv", "none"]),
        ({"window_size": 3}, ["unknown press None"]),
        (3, ["press name or a mapping"]),
        ({"name": "snapkv", "window": 3}, ["'window'", "window_size", "kernel_size"]),
        ({"name": "chunk"}, ["needs 'press'"]),
        ({"name": "adakv", "press": "none"}, ["not 'none'"]),
        ({"name": "composed", "presses": []}, ["non-empty list"]),
        ({"name": "composed", "presses": ["knorm", "none"]}, ["cannot be composed"]),
        ({"name": "none", "compression_ratio": 0.5}, ["takes no arguments"]),
        ({"name": "knorm", "label": ""}, ["label"]),
        ({"name": "adakv", "press": {"name": "think"}}, ["press (adakv)", "ScorerPress"]),
        ({"name": "knorm", "compression_ratio": 1.5}, ["press (knorm)", "compression_ratio"]),
        ({"name": "streaming_llm", "compression_ratio": 0.5, "target_size": 4}, ["target_size"]),
    ],
)
def test_bad_press_specs_name_the_problem(spec, words):
    with pytest.raises(ValueError) as info:
        registry.build_press(spec)
    for word in words:
        assert word in str(info.value)


def test_benchmarks_import_lazily_and_fail_alone(monkeypatch):
    assert registry.benchmark_class("ruler") is RulerBenchmark
    bench = registry.build_benchmark("ruler", {"lengths": [512], "n_examples": 2})
    assert isinstance(bench, RulerBenchmark) and bench.options == RulerOptions(lengths=[512], n_examples=2)
    for name in registry.BENCHMARKS:  # every registered benchmark implements the interface
        cls = registry.benchmark_class(name)
        assert issubclass(cls, Benchmark) and cls.name == name
    monkeypatch.setitem(registry.BENCHMARKS, "ghost", "kvpress_evaluation.no_such_module:Ghost")
    with pytest.raises(ValueError, match="'ghost' is not available"):
        registry.benchmark_class("ghost")
    assert registry.benchmark_class("ruler") is RulerBenchmark
    with pytest.raises(ValueError, match="accepted: ruler"):
        registry.benchmark_class("rulers")


def test_benchmark_options_errors_name_the_field():
    with pytest.raises(ValueError, match=r"benchmark_options \(ruler\): lengths"):
        registry.benchmark_options("ruler", {"lengths": [0]})
    with pytest.raises(ValueError, match=r"n_examplez: Extra inputs"):
        registry.benchmark_options("ruler", {"n_examplez": 1})
