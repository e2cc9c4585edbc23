"""EvalConfig: YAML and overrides, resolved config round trips, the run plan, and errors that name the bad field."""

import itertools

import pytest
import yaml

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress_evaluation.config import EvalConfig, load_config, parse_config, ratio_text
from kvpress_evaluation.registry import NO_PRESS


def _write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_yaml_file_with_overrides(tmp_path):
    path = _write(
        tmp_path,
        {
            "press": {"name": "snapkv", "window_size": 16},
            "compression_ratios": [0.25, 0.5],
            "benchmark_options": {"tasks": ["niah_single_1"], "lengths": [512], "n_examples": 3},
            "kv_quantization": {"bits": 4, "group_size": 32, "residual_length": 64},
            "seed": 1,
        },
    )
    config = load_config(
        path,
        {"seed": 5, "benchmark_options": {"n_examples": 7}, "kv_quantization": {"bits": 2}, "query_aware": True},
    )
    assert config.seed == 5 and config.query_aware is True
    assert config.presses == [{"name": "snapkv", "window_size": 16}]
    # Mappings merge key by key: the file's other options stay.
    assert config.benchmark_options["tasks"] == ["niah_single_1"] and config.benchmark_options["lengths"] == [512]
    assert config.benchmark_options["n_examples"] == 7
    assert config.kv_quantization == QuantizationConfig(bits=2, group_size=32, residual_length=64)
    # A press override replaces the file's press.
    assert load_config(path, {"presses": ["knorm"]}).presses == [{"name": "knorm"}]


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parse_config(
        {
            "presses": ["none", {"name": "adakv", "press": "snapkv", "alpha_safeguard": 0.3}, "think"],
            "compression_ratios": [0.1, 0.5],
            "kv_quantization": {"bits": 8},
            "fraction": 0.5,
        }
    )
    text = config.to_yaml()
    assert "ruler" in text and "alpha_safeguard: 0.3" in text
    assert load_config(_write(tmp_path, text)) == config
    # Defaults of the benchmark options are filled in, so the file shows everything the run used.
    assert set(config.benchmark_options) == {"tasks", "lengths", "n_examples", "qa_path", "dataset"}
    for run in config.runs():
        narrowed = config.for_run(run)
        assert narrowed.runs() == [run]
        assert load_config(_write(tmp_path, narrowed.to_yaml(), "run.yaml")) == narrowed


def test_defaults_are_safe_and_offline():
    config = EvalConfig()
    assert config.model == "smollm2" and config.trust_remote_code is False
    assert config.presses == [{"name": NO_PRESS}] and config.benchmark == "ruler"


def test_run_plan_sweeps_presses_that_take_a_ratio():
    presses = [
        "none",
        "knorm",
        {"name": "chunk", "press": "tova", "chunk_length": 64},
        {"name": "streaming_llm", "target_size": 100},
        {"name": "think", "key_channel_compression_ratio": 0.5},
    ]
    ratios = [0.125, 0.5, 0.75]
    config = parse_config({"presses": presses, "compression_ratios": ratios, "kv_quantization": {"bits": 4}})
    expected = ["none_kv4"]
    expected += [f"knorm_{r}_kv4" for r in ("0.125", "0.50", "0.75")]
    expected += [f"chunk-tova_{r}_kv4" for r in ("0.125", "0.50", "0.75")]
    expected += ["streaming_llm_kv4", "think_kv4"]
    runs = config.runs()
    assert [r.name for r in runs] == expected
    swept = [r for r in runs if r.ratio not in (None, 0.0)]
    assert [r.ratio for r in swept] == ratios * 2
    for run in swept:
        inner = run.press["press"] if run.press["name"] == "chunk" else run.press
        assert inner["compression_ratio"] == run.ratio
    # Other storages name themselves, so their runs never overwrite KIVI's.
    gear = parse_config({"presses": ["knorm"], "compression_ratios": [0.5], "kv_quantization": {"method": "gear"}})
    assert [r.name for r in gear.runs()] == ["knorm_0.50_gear4"]
    assert runs[0].ratio == 0.0 and runs[-1].ratio is None and runs[-2].press == presses[3]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.125, 0.5, 0.333, 0.9375])
def test_ratio_text_tells_ratios_apart(ratio):
    text = ratio_text(ratio)
    assert float(text) == ratio
    if round(ratio, 2) == ratio:
        assert len(text.split(".")[1]) == 2


def test_attention_follows_the_presses():
    assert parse_config({"presses": ["knorm"]}).attention() == "sdpa"
    assert parse_config({"presses": ["knorm", "observed_attention"]}).attention() == "eager"
    assert parse_config({"presses": ["knorm"], "attn_implementation": "eager"}).attention() == "eager"


BAD = [
    ({"compresion_ratios": [0.5]}, "compresion_ratios"),
    ({"compression_ratios": [1.0]}, "compression_ratios"),
    ({"compression_ratios": []}, "compression_ratios"),
    ({"compression_ratios": [0.5, 0.5]}, "compression_ratios"),
    ({"fraction": 0}, "fraction"),
    ({"fraction": 0.5, "n_examples": 3}, "n_examples"),
    ({"n_examples": 0}, "n_examples"),
    ({"max_context_length": -1}, "max_context_length"),
    ({"batch_size": 2, "query_aware": True}, "batch_size"),
    ({"device": "gpu"}, "device"),
    ({"device": "cuda", "device_map": "auto", "model": "some/model"}, "device_map"),
    ({"device_map": "auto"}, "device_map"),
    ({"dtype": "float8"}, "dtype"),
    ({"attn_implementation": "flash"}, "attn_implementation"),
    ({"model": " "}, "model"),
    ({"presses": []}, "presses"),
    ({"presses": ["snapk"]}, "presses[0].name"),
    ({"presses": ["knorm", {"name": "snapkv", "windw_size": 8}]}, "presses[1]: 'windw_size'"),
    ({"presses": [{"name": "adakv"}]}, "'press'"),
    ({"presses": [{"name": "adakv", "press": "none"}]}, "presses[0].press"),
    ({"presses": [{"name": "composed", "presses": ["knorm", "bogus"]}]}, "presses[0].presses[1].name"),
    ({"presses": [{"name": "snapkv", "window_size": 0}]}, "window_size"),
    ({"press": "knorm", "presses": ["tova"]}, "press"),
    ({"presses": ["knorm", "knorm"]}, "label"),
    ({"presses": ["observed_attention"], "attn_implementation": "sdpa"}, "attn_implementation"),
    ({"benchmark": "rulerr"}, "benchmark"),
    ({"benchmark_options": {"task": ["niah_single_1"]}}, "benchmark_options (ruler): task"),
    ({"benchmark_options": {"tasks": ["niah_single_9"]}}, "tasks"),
    ({"benchmark_options": {"qa_path": "/no/such/file.jsonl"}}, "qa_path"),
    ({"benchmark_options": {"dataset": "./no/such/dir"}}, "dataset"),
    ({"kv_quantization": {"bits": 5}}, "kv_quantization.bits"),
    ({"kv_quantization": {"bitz": 4}}, "kv_quantization.bitz"),
    ({"cuda_graph": True, "device": "cpu"}, "cuda_graph"),
    ({"prefill_chunk_size": 0}, "prefill_chunk_size"),
    ({"sparse_prefill": "/no/such/patterns.json"}, "sparse_prefill"),
]


@pytest.mark.parametrize("data, field", BAD, ids=[b[1] for b in BAD])
def test_bad_fields_are_named(data, field):
    with pytest.raises(ValueError) as info:
        parse_config(data)
    message = str(info.value)
    assert field in message and "\n" not in message


def test_good_variants_of_the_bad_fields_pass():
    # Each bad case above differs from a valid config only in the named field.
    good = [
        {"compression_ratios": [0.0, 0.5]},
        {"fraction": 1.0},
        {"n_examples": 3},
        {"batch_size": 2},
        {"device": "cuda:1"},
        {"device_map": "auto", "model": "some/model"},
        {"presses": [{"name": "composed", "presses": ["knorm", "tova"]}]},
        {"presses": ["knorm", {"name": "knorm", "label": "knorm2"}]},
        {"presses": ["observed_attention"], "attn_implementation": "eager"},
        {"kv_quantization": {"bits": 2}},
        {"prefill_chunk_size": 64},
    ]
    for data in good:
        parse_config(data)


def test_yaml_is_parsed_without_executing_anything(tmp_path):
    path = _write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ValueError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    assert load_config(_write(tmp_path, "")) == EvalConfig()


def test_every_combination_of_presses_and_ratios_has_a_distinct_directory():
    names = ["knorm", "tova", {"name": "adakv", "press": "knorm"}, {"name": "key_rerotation", "press": "knorm"}]
    for k in (1, 2, 3):
        for combo in itertools.combinations(names, k):
            runs = parse_config({"presses": list(combo), "compression_ratios": [0.2, 0.25, 0.3]}).runs()
            assert len({r.name for r in runs}) == len(runs) == 3 * k
