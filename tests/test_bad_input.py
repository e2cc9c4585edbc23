"""Bad input: one test per error. Each checks that the message names the parameter and the accepted values, and that
the model still answers exactly as before the error (no hook, attention setting or cache content left behind)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.pipeline import KVPressTextGenerationPipeline
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.quest_press import QuestPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.fixtures_pipeline import random_text, smollm2_tokenizer, text_model, text_pipeline

CONTEXT = random_text(40, seed=21)
QUESTION = " Where is the lantern?"


@dataclass
class QuestionPress(KnormPress):
    """A press that declares it needs the question inside the compressed prompt."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(needs_question=True)


@dataclass
class DecodePress(KnormPress):
    """A press that declares the decode phase."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(phase="decode")


def _answer(arch: str = "llama", attn: str = "sdpa", **kwargs) -> str:
    return text_pipeline(arch, attn)(CONTEXT, question=QUESTION, max_new_tokens=6, **kwargs)["answer"]


@pytest.fixture(scope="module")
def baseline() -> dict:
    """Answers computed before any error, per (arch, attn, press name)."""
    return {
        ("llama", "sdpa", None): _answer(),
        ("llama", "sdpa", "snapkv"): _answer(press=SnapKVPress(0.5, window_size=4)),
        ("llama", "eager", None): _answer(attn="eager"),
    }


def _n_hooks(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in [model, model.model, *attention_layers(model)]
    )


def _assert_still_answers(baseline, arch="llama", attn="sdpa"):
    """The model answers as before the error, with and without a press, and nothing was left on it."""
    model = text_model(arch, attn)
    assert model.config._attn_implementation == attn
    assert _n_hooks(model) == 0
    assert _answer(arch, attn) == baseline[(arch, attn, None)]
    if (arch, attn, "snapkv") in baseline:
        assert _answer(arch, attn, press=SnapKVPress(0.5, window_size=4)) == baseline[(arch, attn, "snapkv")]


def _assert_empty(cache) -> None:
    assert cache.get_seq_length() == 0
    assert all(not layer.is_initialized for layer in cache.layers)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", math.nan, True])
@pytest.mark.parametrize("press_cls", [KnormPress, SnapKVPress])
def test_compression_ratio_outside_unit_interval(baseline, press_cls, bad):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        press_cls(compression_ratio=bad)
    _assert_still_answers(baseline)


@pytest.mark.parametrize("bad", [0, -4, 2.0, "8"])
def test_target_size_not_a_positive_int(baseline, bad):
    with pytest.raises(ValueError, match="target_size must be a positive int"):
        KnormPress(target_size=bad)
    _assert_still_answers(baseline)


def test_target_size_given_with_a_ratio(baseline):
    with pytest.raises(ValueError, match="either compression_ratio or target_size, not both"):
        SnapKVPress(compression_ratio=0.5, target_size=16)
    _assert_still_answers(baseline)


@pytest.mark.parametrize("query_aware", [False, True])
def test_window_larger_than_context_rejected_before_the_cache_is_touched(baseline, query_aware):
    model, tok = text_model(), smollm2_tokenizer()
    n_context = len(tok.apply_chat_template([{"role": "user", "content": CONTEXT}], tokenize=False))  # > tokens
    press = SnapKVPress(0.5, window_size=n_context)
    forwards = []
    handle = model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    cache = DynamicCache(config=model.config)
    try:
        with pytest.raises(ValueError, match=rf"window_size={n_context} is larger than the context.*window_size <= "):
            text_pipeline()(CONTEXT, question=QUESTION, press=press, cache=cache, query_aware=query_aware)
    finally:
        handle.remove()
    assert forwards == []  # rejected before any forward
    _assert_empty(cache)
    # The same cache serves a valid call afterwards, with the answer of a fresh cache.
    assert _answer(press=SnapKVPress(0.5, window_size=4), cache=cache) == baseline[("llama", "sdpa", "snapkv")]
    _assert_still_answers(baseline)


def test_window_larger_than_context_leaves_a_direct_cache_empty(arch):
    """Direct ``with press(model)`` use: the check runs before layer 0 writes, so the cache stays empty and usable."""
    model = tiny_model(arch)
    ids = random_ids(12)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"window_size=13 is larger than the context \(12 tokens\)"):
            with SnapKVPress(0.5, window_size=13)(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        _assert_empty(cache)
        fresh = DynamicCache(config=model.config)
        for c in (cache, fresh):
            with SnapKVPress(0.5, window_size=4)(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, c))
    for a, b in zip(cache.layers, fresh.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_attention_weights_press_on_sdpa(baseline):
    config = text_model().config
    cache = DynamicCache(config=config)
    with pytest.raises(ValueError, match=r"needs attention weights.*attn_implementation='sdpa'.*accepted: 'eager'"):
        _answer(press=ObservedAttentionPress(0.5), cache=cache)
    _assert_empty(cache)
    _assert_still_answers(baseline)
    # The same press runs on the eager model, and compresses (so the error above was about sdpa only).
    assert _answer(attn="eager", press=ObservedAttentionPress(0.0)) == baseline[("llama", "eager", None)]
    full, compressed = DynamicCache(config=config), DynamicCache(config=config)
    _answer(attn="eager", cache=full)
    _answer(attn="eager", press=ObservedAttentionPress(0.5), cache=compressed)
    for a, b in zip(full.layers, compressed.layers, strict=True):
        assert b.keys.shape[-2] == round(a.keys.shape[-2] * 0.5)
    _assert_still_answers(baseline, attn="eager")


@pytest.mark.parametrize("context", ["", "   \n\t  "])
def test_empty_context(baseline, context):
    with pytest.raises(ValueError, match="context is empty"):
        text_pipeline()(context, question=QUESTION)
    _assert_still_answers(baseline)


def test_question_and_questions_together(baseline):
    with pytest.raises(ValueError, match="either question= or questions=, not both"):
        text_pipeline()(CONTEXT, question=QUESTION, questions=[QUESTION])
    _assert_still_answers(baseline)


@pytest.mark.parametrize("questions", [[], "a string", [QUESTION, 3]])
def test_questions_not_a_list_of_strings(baseline, questions):
    with pytest.raises(ValueError, match="questions must be a non-empty list of strings"):
        text_pipeline()(CONTEXT, questions=questions)
    _assert_still_answers(baseline)


def test_chat_template_requested_but_missing(baseline):
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = None
    pipe = text_pipeline(tokenizer=tok)
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer has no chat template"):
        pipe(CONTEXT, question=QUESTION, use_chat_template=True)
    # Without the request, the plain-text prompt is used: the same answer as asking for it explicitly.
    plain = _answer(use_chat_template=False)
    assert pipe(CONTEXT, question=QUESTION, max_new_tokens=6)["answer"] == plain
    _assert_still_answers(baseline)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.7}, {"do_sample": True, "top_k": 5}])
def test_unknown_pipeline_argument(baseline, kwargs):
    with pytest.raises(ValueError, match=r"unknown pipeline argument\(s\) .*accepted: question, questions"):
        text_pipeline()(CONTEXT, question=QUESTION, **kwargs)
    _assert_still_answers(baseline)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_new_tokens_not_positive(baseline, bad):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        text_pipeline()(CONTEXT, question=QUESTION, max_new_tokens=bad)
    _assert_still_answers(baseline)


def test_press_that_is_not_a_press(baseline):
    with pytest.raises(ValueError, match="press must be a kvpress press"):
        text_pipeline()(CONTEXT, question=QUESTION, press="knorm")
    _assert_still_answers(baseline)


def test_press_needing_the_question_without_query_aware(baseline):
    with pytest.raises(ValueError, match="needs the question in the compressed prompt: pass query_aware=True"):
        _answer(press=QuestionPress(0.5))
    assert _answer(press=QuestionPress(0.0), query_aware=True) == baseline[("llama", "sdpa", None)]
    _assert_still_answers(baseline)


def test_decode_phase_press_where_it_cannot_run(baseline):
    with pytest.raises(ValueError, match="cuda_graph=True replays captured steps, which run no press hooks.*DecodePr"):
        _answer(press=DecodePress(0.5), cuda_graph=True)
    rerotating = DecodingPress(KnormPress(), 4, 32, rerotate=True)
    with pytest.raises(
        ValueError,
        match=r"head-variable.*, and QuestPress, which compresses while decoding, needs one length for every head: "
        r"decode with a press that accepts head-variable layers \(DecodingPress with rerotate=False, H2OPress",
    ):
        _answer(press=PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), QuestPress(page_size=4, token_budget=16)))
    with pytest.raises(ValueError, match="in a DynamicCache only so far; got cache=VarlenCache: pass cache=None"):
        _answer(press=rerotating, cache=VarlenCache(config=text_model().config))
    config = tiny_model("llama", head_dim=32).config
    quantized = QuantizedCache(config=config, quantization=QuantizationConfig(group_size=32))
    with pytest.raises(ValueError, match="in a DynamicCache or VarlenCache only so far; got cache=QuantizedCache"):
        KVPressTextGenerationPipeline._check_decode_time(
            DecodingPress(KnormPress()), DecodingPress(KnormPress()).capabilities, quantized, None
        )
    _assert_still_answers(baseline)


def test_cache_not_empty(baseline):
    model = text_model()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=random_ids(5), **cache_kwargs(model.model, cache))
    before = [(layer.keys, layer.values) for layer in cache.layers]
    with pytest.raises(ValueError, match="cache must be empty"):
        _answer(cache=cache)
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, before))
    _assert_still_answers(baseline)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_context_length": 0}, "max_context_length must be a positive int or None"),
        ({"max_context_length": True}, "max_context_length must be a positive int or None"),
        ({"max_context_length": "64"}, "max_context_length must be a positive int or None"),
        ({"answer_prefix": 3}, "answer_prefix must be a string or None"),
        ({"query_aware": "yes"}, "query_aware must be True or False"),
        ({"use_chat_template": 1}, r"use_chat_template must be True, False or None \(automatic\)"),
        ({"cache": {}}, r"cache must be a transformers Cache \(e.g. DynamicCache\) or None"),
    ],
)
def test_other_argument_types(baseline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_pipeline()(CONTEXT, question=QUESTION, **kwargs)
    _assert_still_answers(baseline)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prefill_chunk_size": 0}, r"prefill_chunk_size must be an int >= 1 or None \(one forward\), got 0"),
        ({"prefill_chunk_size": "64"}, r"prefill_chunk_size must be an int >= 1 or None \(one forward\), got '64'"),
        ({"prefill_chunk_size": 16, "press": ObservedAttentionPress(0.5)},
         "ObservedAttentionPress cannot compress a prefill chunk by chunk: ObservedAttentionPress reads the attention "
         "weights.*pass "
         "prefill_chunk_size=None"),
    ],
)  # fmt: skip
def test_prefill_chunk_size_where_it_cannot_run(baseline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_pipeline()(CONTEXT, question=QUESTION, **kwargs)
    _assert_still_answers(baseline)
