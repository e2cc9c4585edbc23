"""Pipeline with ``kv_quantization``: answers against greedy decoding by hand over a QuantizedCache, batches, several
questions across flushes, a press that brings its own quantization, and bad input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache, pipeline

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.rotary import rotary_table
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import prefill
from kvpress.pipeline import TASK
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from tests.fixtures_pipeline import chat_prompt, eos_ids, random_text, smollm2_tokenizer, text_model

QUESTIONS = [" Where is the old river stone?", " Who rang the bell?"]
PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(0.5),
    "adakv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),
    "snapkv": lambda: SnapKVPress(0.5, window_size=4),
}


def quant_text_model(arch: str):
    """A tiny random ``arch`` model with the SmolLM2 tokenizer's vocabulary and head dimension 32 (the shared text
    models use 16, which no quantization group size divides)."""
    return text_model(arch, head_dim=32)


def quant_pipeline(arch: str):
    return pipeline(TASK, model=quant_text_model(arch), tokenizer=smollm2_tokenizer())


def manual_answer(model, tokenizer, context, question, press, quantization, max_new_tokens, query_aware=False,
                  chunk_size=None):  # fmt: skip
    """Prefill the prompt up to the context (or the question) under ``press`` into a QuantizedCache by hand (with
    ``chunk_size``: through :func:`kvpress.generation.prefill`), then decode greedily under the "kvpress" attention
    function. The cache is not compacted: its first decoding forward quantizes any layer the press left dense."""
    full = chat_prompt(tokenizer, context, question)
    prefix = context + question if query_aware else context
    cut = full.index(prefix) + len(prefix)

    def encode(text):
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    ids, tail = encode(full[:cut]), encode(full[cut:])
    rope = rotary_table(model) if quantization.pre_rope else None
    cache = QuantizedCache(config=model.config, quantization=quantization, rope=rope)
    eos, generated = eos_ids(model, tokenizer), []
    with torch.no_grad():
        if chunk_size is not None:
            prefill(model, ids, cache, press, chunk_size=chunk_size)
        elif press is None:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        else:
            with press(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        position = ids.shape[1]
        with compressed_attention(model):
            for _ in range(max_new_tokens):
                positions = torch.arange(position, position + tail.shape[1])[None]
                token = (
                    model(input_ids=tail, **cache_kwargs(model, cache), position_ids=positions).logits[0, -1].argmax()
                )
                if int(token) in eos:
                    break
                generated.append(int(token))
                position += tail.shape[1]
                tail = token.view(1, 1)
    return tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("arch", "press_name", "method", "bits"),
    [("llama", "none", "kivi", 2), ("llama", "adakv", "kivi", 8), ("qwen3", "knorm", "kivi", 4),
     ("qwen3", "adakv", "kivi", 2), ("gemma3", "knorm", "kivi", 8), ("llama", "none", "kvquant", 2),
     ("llama", "adakv", "kvquant", 4), ("qwen3", "snapkv", "gear", 2), ("gemma3", "knorm", "gear", 4)],
)  # fmt: skip
def test_answers_equal_decoding_by_hand_across_flushes(arch, press_name, method, bits):
    """The pipeline builds the storage the method names (with the model's rotary table for KVQuant's pre-RoPE keys)
    and answers as greedy decoding by hand over the same cache."""
    pipe = quant_pipeline(arch)
    # residual_length 32 and 40 new tokens: every answer flushes the tail at least once, and the cache is restored
    # to the quantized context between questions.
    quantization = {"bits": bits, "group_size": 32, "residual_length": 32, "method": method}
    context = random_text(70, seed=1)
    out = pipe(context, questions=QUESTIONS, press=PRESSES[press_name](), kv_quantization=quantization,
               max_new_tokens=40)  # fmt: skip
    config = QuantizationConfig(**quantization)
    expected = [
        manual_answer(pipe.model, pipe.tokenizer, context, q, PRESSES[press_name](), config, 40) for q in QUESTIONS
    ]
    assert out["answers"] == expected
    assert len(set(expected)) == len(expected)  # distinct answers: restoring between questions matters


@pytest.mark.parametrize(("press_name", "method"), [("adakv", "kivi"), ("snapkv", "kvquant"), ("none", "kivi")])
def test_chunked_prefill_into_a_quantized_cache(press_name, method):
    """``prefill_chunk_size`` with ``kv_quantization``: the pipeline prefills chunk by chunk and quantizes what the
    press kept (answers as by hand), holding fewer bytes than the same chunked prefill at full precision."""
    pipe = quant_pipeline("llama")
    quantization = {"bits": 4, "group_size": 32, "residual_length": 32, "method": method}
    context = random_text(90, seed=4)
    out = pipe(context, questions=QUESTIONS, press=PRESSES[press_name](), kv_quantization=quantization,
               prefill_chunk_size=40, max_new_tokens=12, return_report=True)  # fmt: skip
    config = QuantizationConfig(**quantization)
    expected = [manual_answer(pipe.model, pipe.tokenizer, context, q, PRESSES[press_name](), config, 12,
                              chunk_size=40) for q in QUESTIONS]  # fmt: skip
    assert out["answers"] == expected
    full = pipe(context, question=QUESTIONS[0], press=PRESSES[press_name](), prefill_chunk_size=40, max_new_tokens=1,
                return_report=True, cache=VarlenCache(config=pipe.model.config))["report"]  # fmt: skip
    report = out["reports"][0]
    assert report.cache == "QuantizedCache"
    assert report.compression_ratio == pytest.approx(full.compression_ratio)
    assert report.kv_bytes < 0.45 * full.kv_bytes


def test_key_rerotation_is_refused_with_pre_rope_keys():
    pipe = quant_pipeline("llama")
    press = KeyRerotationPress(KnormPress(0.5))
    with pytest.raises(ValueError, match="pre_rope=False"):
        pipe(
            random_text(40), question=QUESTIONS[0], press=press, kv_quantization={"method": "kvquant", "group_size": 32}
        )
    out = pipe(random_text(40), question=QUESTIONS[0], press=press, max_new_tokens=3,
               kv_quantization={"method": "kvquant", "group_size": 32, "pre_rope": False})  # fmt: skip
    assert isinstance(out["answer"], str)


def test_query_aware_equals_decoding_by_hand():
    pipe = quant_pipeline("llama")
    quantization = QuantizationConfig(bits=4, group_size=32, residual_length=32)
    context = random_text(60, seed=2)
    cache = QuantizedCache(config=pipe.model.config, quantization=quantization)
    out = pipe(context, questions=QUESTIONS, press=PRESSES["snapkv"](), query_aware=True, cache=cache,
               max_new_tokens=12)  # fmt: skip
    expected = [
        manual_answer(pipe.model, pipe.tokenizer, context, q, PRESSES["snapkv"](), quantization, 12, query_aware=True)
        for q in QUESTIONS
    ]
    assert out["answers"] == expected
    again = pipe(context, questions=QUESTIONS, press=PRESSES["snapkv"](), query_aware=True,
                 kv_quantization=quantization, max_new_tokens=12)  # fmt: skip
    assert again == out
    # The cache holds the last question's compressed prompt, quantized: half of it per head.
    n = pipe._encode(pipe._split_template(context, None)[0]).shape[1] + pipe._encode(QUESTIONS[-1]).shape[1]
    for layer in cache.layers:
        assert isinstance(layer, QuantizedVarlenLayer) and layer.ragged and layer.tail_len == 0
        assert layer.seg_lens.tolist() == [[round(n * 0.5)] * layer.num_heads]


@pytest.mark.parametrize("press_name", ["none", "knorm"])
def test_user_cache_ends_up_quantized_even_without_compression(press_name, tmp_path):
    pipe = quant_pipeline("qwen3")
    quantization = QuantizationConfig(bits=2, group_size=32)
    context = random_text(50, seed=3)
    cache = QuantizedCache(config=pipe.model.config, quantization=quantization)
    out = pipe(context, question=QUESTIONS[0], press=PRESSES[press_name](), cache=cache, max_new_tokens=6)
    assert out == pipe(context, question=QUESTIONS[0], press=PRESSES[press_name](), kv_quantization=quantization,
                       max_new_tokens=6)  # fmt: skip
    n = pipe._encode(pipe._split_template(context, None)[0]).shape[1]
    kept = n if press_name == "none" else round(n * 0.5)
    dense_bytes = 0
    for layer in cache.layers:
        assert layer.ragged and layer.seg_lens.tolist() == [[kept] * layer.num_heads] and layer.tail_len == 0
        dense_bytes += 2 * layer.num_heads * kept * layer.head_dim * 4
    # 2-bit codes plus a scale and zero per group: well under a quarter of the float32 context.
    assert cache.memory_bytes() < 0.25 * dense_bytes
    # Saved and loaded, the quantized context answers without a prefill.
    cache.save(tmp_path / "context.safetensors")
    loaded = QuantizedCache.load(tmp_path / "context.safetensors")
    assert pipe(None, question=QUESTIONS[0], cache=loaded, max_new_tokens=6) == out


@pytest.mark.parametrize(
    ("press_name", "method"), [("none", "kivi"), ("knorm", "kivi"), ("adakv", "kivi"), ("adakv", "kvquant"),
                               ("knorm", "gear")],
)  # fmt: skip
def test_batch_equals_each_context_alone(press_name, method):
    pipe = quant_pipeline("llama")
    quantization = {"bits": 4, "group_size": 32, "method": method}
    contexts = [random_text(40 + 17 * i, seed=i) for i in range(3)]  # different lengths: no padding may enter
    stacked = []
    original = QuantizedCache.concatenate

    def spy(parts):
        stacked.append(original(parts))
        return stacked[-1]

    QuantizedCache.concatenate = staticmethod(spy)
    try:
        batch = pipe(contexts, questions=QUESTIONS, press=PRESSES[press_name](), kv_quantization=quantization,
                     max_new_tokens=6)  # fmt: skip
    finally:
        QuantizedCache.concatenate = original
    alone = [
        pipe(c, questions=QUESTIONS, press=PRESSES[press_name](), kv_quantization=quantization, max_new_tokens=6)
        for c in contexts
    ]
    assert batch == alone
    assert len(stacked) == 1 and stacked[0].layers[0].batch_size == 3
    assert all(isinstance(layer, QuantizedVarlenLayer) for layer in stacked[0].layers)


def test_sliding_window_batch_falls_back_to_one_context_at_a_time():
    pipe = quant_pipeline("gemma3")
    contexts = [random_text(30, seed=5), random_text(45, seed=6)]
    kwargs = {"question": "What?", "press": KnormPress(0.5), "kv_quantization": {"group_size": 32}, "max_new_tokens": 4}
    assert pipe(contexts, **kwargs) == [pipe(c, **kwargs) for c in contexts]


@dataclass
class QuantizedKnormPress(KnormPress):
    """A press that plans for a quantized cache (as a memory-budget press does) by carrying a ``quantization``."""

    quantization: QuantizationConfig | None = None


def test_press_quantization_is_used_and_conflicts_are_refused():
    pipe = quant_pipeline("llama")
    config = QuantizationConfig(bits=2, group_size=32, residual_length=32)
    context = random_text(50, seed=7)
    press = QuantizedKnormPress(0.5, quantization=config)
    expected = pipe(context, question=QUESTIONS[0], press=KnormPress(0.5), kv_quantization=config, max_new_tokens=8)
    assert pipe(context, question=QUESTIONS[0], press=press, max_new_tokens=8) == expected
    assert pipe(context, question=QUESTIONS[0], press=press, kv_quantization=config.model_dump(),
                max_new_tokens=8) == expected  # fmt: skip
    cache = QuantizedCache(config=pipe.model.config, quantization=config)
    assert pipe(context, question=QUESTIONS[0], press=press, cache=cache, max_new_tokens=8) == expected
    with pytest.raises(ValueError, match="differs from the quantization QuantizedKnormPress plans"):
        pipe(context, question=QUESTIONS[0], press=press, kv_quantization={"bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match="pass cache=None or a QuantizedCache with that quantization"):
        pipe(context, question=QUESTIONS[0], press=press, cache=VarlenCache(config=pipe.model.config))
    other = QuantizedCache(config=pipe.model.config, quantization={"bits": 8, "group_size": 32})
    with pytest.raises(ValueError, match="pass cache=None or a QuantizedCache with that quantization"):
        pipe(context, question=QUESTIONS[0], press=press, cache=other)
    assert other.get_seq_length() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_quantization": {"bits": 5}}, "kv_quantization is not a valid QuantizationConfig: bits: bits must be"),
        ({"kv_quantization": {"group_size": 48}}, "group_size: group_size must be one of 32, 64, 128, got 48"),
        ({"kv_quantization": {"group_size": 64}}, r"kv_quantization: group_size=64 must divide the head dimension 32"),
        ({"kv_quantization": "4bit"}, "kv_quantization must be a QuantizationConfig or a dict"),
        ({"kv_quantization": {"bits": 4, "group_size": 32}, "press": ThinKPress(0.5, window_size=4)},
         "ThinKPress prunes key channels"),
        ({"kv_quantization": {"group_size": 32}, "cache": "quantized"}, "give either cache= or kv_quantization="),
        ({"kv_quantisation": {"bits": 4}}, r"accepted: .*cuda_graph, kv_quantization"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_forward_and_leaves_the_pipeline_usable(kwargs, match):
    pipe = quant_pipeline("llama")
    context = random_text(40, seed=8)
    cache = None
    if kwargs.get("cache") == "quantized":
        cache = kwargs["cache"] = QuantizedCache(config=pipe.model.config, quantization={"group_size": 32})
    forwards = []
    handle = pipe.model.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            pipe(context, question=QUESTIONS[0], max_new_tokens=3, **kwargs)
        if cache is None:  # a batch builds its own cache
            with pytest.raises(ValueError, match=match):
                pipe([context, random_text(30, seed=9)], question=QUESTIONS[0], max_new_tokens=3, **kwargs)
    finally:
        handle.remove()
    assert not forwards
    if cache is not None:
        assert cache.get_seq_length() == 0
    good = {"bits": 4, "group_size": 32}
    first = pipe(context, question=QUESTIONS[0], kv_quantization=good, max_new_tokens=5)
    assert first == pipe(context, question=QUESTIONS[0], kv_quantization=QuantizationConfig(**good), max_new_tokens=5)


@pytest.mark.parametrize("press_name", ["none", "knorm", "adakv"])
def test_report_of_a_quantized_cache(press_name):
    pipe = quant_pipeline("llama")
    quantization = QuantizationConfig(bits=4, group_size=32)
    context = random_text(50, seed=4)
    cache = QuantizedCache(config=pipe.model.config, quantization=quantization)
    mine = pipe(context, question=QUESTIONS[0], press=PRESSES[press_name](), cache=cache, return_report=True,
                max_new_tokens=2)["report"]  # fmt: skip
    report = pipe(context, question=QUESTIONS[0], press=PRESSES[press_name](), kv_quantization=quantization,
                  return_report=True, max_new_tokens=2)["report"]  # fmt: skip
    assert report.as_dict() == mine.as_dict() and report.cache == "QuantizedCache"
    assert report.kv_bytes == cache.memory_bytes()
    # Uncompressed: the float32 context of a DynamicCache, measured.
    ids = pipe._encode(pipe._split_template(context, None)[0])
    dense = DynamicCache(config=pipe.model.config)
    with torch.no_grad():
        pipe.model.model(input_ids=ids, **cache_kwargs(pipe.model.model, dense))
    assert (report.prefill_tokens, report.kv_bytes_uncompressed) == (ids.shape[1], layer_memory_bytes(dense))
    kept = 1.0 if press_name == "none" else 0.5
    # 4-bit codes with a scale and a zero per group of 32, the last tokens short of a group in float32: under a third
    # of the float32 cache, on top of the tokens removed.
    assert report.kv_bytes < kept * report.kv_bytes_uncompressed / 3
    assert report.compression_ratio == pytest.approx(1 - kept, abs=1 / ids.shape[1])
