"""Pipeline with the head-variable cache: automatic switch, batches of contexts, answering from a saved cache."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from tests.fixtures_pipeline import random_text, text_model, text_pipeline

QUESTIONS = ["Which word comes first?", "Name a colour from the text, please."]


def _contexts(n: int = 3) -> list[str]:
    # Different lengths on purpose: no padding may enter the cache.
    return [random_text(40 + 17 * i, seed=i) for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize(
    "make_press", [lambda: None, lambda: KnormPress(0.5), lambda: AdaKVPress(SnapKVPress(0.4, window_size=4))]
)
def test_batch_equals_each_context_alone(arch, make_press):
    pipe = text_pipeline(arch)
    contexts = _contexts()
    batch = pipe(contexts, questions=QUESTIONS, press=make_press(), max_new_tokens=6)
    alone = [
        pipe(c, questions=QUESTIONS, press=make_press(), max_new_tokens=6, cache=VarlenCache(config=pipe.model.config))
        for c in contexts
    ]
    assert batch == alone


def test_batch_with_one_question_list_per_context():
    pipe = text_pipeline("llama")
    contexts = _contexts(2)
    per = [["First?", "Second one?"], ["A much longer question about the text?", "Short?"]]
    batch = pipe(contexts, questions=per, press=KnormPress(0.25), max_new_tokens=5)
    alone = [
        pipe(c, questions=q, press=KnormPress(0.25), max_new_tokens=5, cache=VarlenCache(config=pipe.model.config))
        for c, q in zip(contexts, per)
    ]
    assert batch == alone


def test_batch_cache_holds_no_padding():
    pipe = text_pipeline("mistral")
    contexts = _contexts(3)
    lengths = [pipe._encode(pipe._split_template(c, None)[0]).shape[1] for c in contexts]
    caches = []
    original = VarlenCache.concatenate

    def spy(parts):
        out = original(parts)
        caches.append(out)
        return out

    VarlenCache.concatenate = staticmethod(spy)
    try:
        pipe(contexts, question="Why?", press=KnormPress(0.5), max_new_tokens=2)
    finally:
        VarlenCache.concatenate = original
    cache = caches[0]
    for i in range(len(cache.layers)):
        held = cache.head_lengths(i)
        assert held.tolist() == [[round(n * 0.5)] * held.shape[1] for n in lengths]


def test_sliding_window_models_fall_back_to_one_context_at_a_time():
    pipe = text_pipeline("gemma3")
    contexts = _contexts(2)
    batch = pipe(contexts, question="What?", press=KnormPress(0.5), max_new_tokens=4)
    alone = [pipe(c, question="What?", press=KnormPress(0.5), max_new_tokens=4) for c in contexts]
    assert batch == alone


def test_channel_pruning_falls_back_to_one_context_at_a_time():
    pipe = text_pipeline("llama")
    contexts = _contexts(2)
    batch = pipe(contexts, question="What?", press=ThinKPress(0.5, window_size=4), max_new_tokens=4)
    alone = [pipe(c, question="What?", press=ThinKPress(0.5, window_size=4), max_new_tokens=4) for c in contexts]
    assert batch == alone


def test_head_variable_press_gets_a_varlen_cache_automatically():
    pipe = text_pipeline("qwen2")
    context = random_text(60)
    press = AdaKVPress(SnapKVPress(0.5, window_size=4))
    auto = pipe(context, question="Why?", press=press, max_new_tokens=5)
    explicit = pipe(
        context, question="Why?", press=press, max_new_tokens=5, cache=VarlenCache(config=pipe.model.config)
    )
    assert auto == explicit


def test_head_variable_press_with_dense_cache_is_refused_before_any_forward():
    pipe = text_pipeline("llama")
    cache = DynamicCache(config=pipe.model.config)
    with pytest.raises(ValueError, match="cannot store; pass cache=None or a kvpress VarlenCache"):
        pipe(random_text(30), question="Why?", press=AdaKVPress(KnormPress(0.5)), cache=cache)
    assert cache.get_seq_length() == 0
    assert pipe(random_text(30), question="Why?", cache=cache, max_new_tokens=3)["answer"] is not None


def test_answer_from_a_saved_cache_without_prefill(tmp_path):
    pipe = text_pipeline("llama")
    context = random_text(70, seed=4)
    press = AdaKVPress(SnapKVPress(0.5, window_size=4))
    cache = VarlenCache(config=pipe.model.config)
    first = pipe(context, questions=QUESTIONS, press=press, max_new_tokens=6, cache=cache)
    path = tmp_path / "context.safetensors"
    cache.save(path)
    loaded = VarlenCache.load(path)
    assert loaded.next_positions == cache.next_positions
    model = text_model("llama")
    lengths = []
    handle = model.model.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        again = pipe(None, questions=QUESTIONS, max_new_tokens=6, cache=loaded)
    finally:
        handle.remove()
    assert again == first
    # Only question tails and single decode tokens run: the context (over 70 tokens) is never prefilled again.
    assert lengths and max(lengths) < 25
    assert loaded.memory_bytes() == cache.memory_bytes()


def test_resume_needs_a_filled_cache():
    pipe = text_pipeline("llama")
    with pytest.raises(ValueError, match="context=None answers from a saved compressed context"):
        pipe(None, question="Why?")
    with pytest.raises(ValueError, match="context=None answers from a saved compressed context"):
        pipe(None, question="Why?", cache=VarlenCache(config=pipe.model.config))


def test_batch_argument_errors():
    pipe = text_pipeline("llama")
    contexts = _contexts(2)
    with pytest.raises(ValueError, match="one per context"):
        pipe(contexts, questions=[["a?"]], max_new_tokens=2)
    with pytest.raises(ValueError, match="same number of questions"):
        pipe(contexts, questions=[["a?"], ["b?", "c?"]], max_new_tokens=2)
    with pytest.raises(ValueError, match="a batch builds its own VarlenCache"):
        pipe(contexts, question="a?", cache=VarlenCache(config=pipe.model.config))
    with pytest.raises(ValueError, match="pass the contexts one at a time"):
        pipe(contexts, question="a?", query_aware=True)
    with pytest.raises(ValueError, match=r"cuda_graph must be True, False or None \(automatic\)"):
        pipe(contexts[0], question="a?", cuda_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
            pipe(contexts[0], question="a?", cuda_graph=True)


def _dense_bytes(pipe, context: str) -> int:
    """Bytes of a DynamicCache holding the pipeline's context prompt, measured by prefilling it without a press."""
    ids = pipe._encode(pipe._split_template(context, None)[0])
    cache = DynamicCache(config=pipe.model.config)
    with torch.no_grad():
        pipe.model.model(input_ids=ids, **cache_kwargs(pipe.model.model, cache))
    return layer_memory_bytes(cache)


def test_report_of_a_head_variable_cache():
    pipe = text_pipeline("qwen3")
    context = _contexts(1)[0]
    cache = VarlenCache(config=pipe.model.config)
    report = pipe(context, question=QUESTIONS[0], press=AdaKVPress(SnapKVPress(0.4, window_size=4)), cache=cache,
                  return_report=True, max_new_tokens=3)["report"]  # fmt: skip
    assert report.cache == "VarlenCache" and report.kv_bytes == cache.memory_bytes()
    assert report.kv_bytes_uncompressed == _dense_bytes(pipe, context)
    # Per-head lengths differ, the total is the budget: 60% of the tokens of every layer.
    lengths = report.layers.kept_lengths[0]
    assert len(set(lengths.flatten().tolist())) > 1
    assert report.compression_ratio == pytest.approx(0.4, abs=1 / report.prefill_tokens)
    assert report.kv_bytes == pytest.approx(0.6 * report.kv_bytes_uncompressed, rel=0.05)


def test_report_of_channel_pruned_keys():
    pipe = text_pipeline("llama")
    context = _contexts(1)[0]
    cache = DynamicCache(config=pipe.model.config)
    report = pipe(context, question=QUESTIONS[0], press=ThinKPress(key_channel_compression_ratio=0.5, window_size=4),
                  cache=cache, return_report=True, max_new_tokens=3)["report"]  # fmt: skip
    assert report.compression_ratio == 0.0  # every token kept ...
    assert report.kv_bytes == layer_memory_bytes(cache) < report.kv_bytes_uncompressed  # ... with half the key channels
    assert report.kv_bytes_uncompressed == _dense_bytes(pipe, context)


@pytest.mark.parametrize("make_press", [lambda: None, lambda: AdaKVPress(SnapKVPress(0.4, window_size=4))])
def test_batch_reports_equal_each_context_alone(make_press):
    """Each context of a batch gets the report of its own compressed cache, in the ragged storage the batch stacks."""
    pipe = text_pipeline("llama")
    model = pipe.model
    contexts = _contexts()
    batch = pipe(contexts, questions=QUESTIONS, press=make_press(), return_report=True, max_new_tokens=2)
    for context, out in zip(contexts, batch):
        alone = pipe(context, question=QUESTIONS[0], press=make_press(), cache=VarlenCache(config=model.config),
                     return_report=True, max_new_tokens=2)["report"]  # fmt: skip
        assert out["reports"][0] is out["reports"][1]  # the questions share one compression
        got, want = out["reports"][0].as_dict(), alone.as_dict()
        for key in ("press", "cache", "prefill_tokens", "compression_ratio", "kv_bytes_uncompressed"):
            assert got[key] == want[key], key
        # Its bytes: the context prefilled alone under the press, then packed into ragged storage.
        ids = pipe._encode(pipe._split_template(context, None)[0])
        cache = VarlenCache(config=model.config)
        press = make_press()
        with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        cache.compact()
        assert got["kv_bytes"] == cache.memory_bytes()


def test_pipeline_decodes_through_a_graph_by_default_on_cuda(monkeypatch):
    """On CUDA, ``cuda_graph`` left at its default builds a compacted VarlenCache and replays captured steps, with the
    eager loop's answers; a press that acts at every step falls back to the eager loop, saying so once."""
    from transformers import pipeline

    from kvpress.generation import decode as decode_module
    from kvpress.pipeline import TASK
    from kvpress.presses.h2o_press import H2OPress
    from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
    from tests.fixtures_pipeline import smollm2_tokenizer
    from tests.generation.replayed_steps import graph_ready

    captures = []
    model = graph_ready(monkeypatch, text_model("llama"), captures)
    pipe = pipeline(TASK, model=model, tokenizer=smollm2_tokenizer())
    context = _contexts(1)[0]
    from kvpress.presses.quest_press import QuestPress

    quest = QuestPress(page_size=4, token_budget=16, dense_layers=1)
    for press in (None, AdaKVPress(SnapKVPress(0.4, window_size=4)), quest):
        eager = pipe(context, questions=QUESTIONS, press=press, max_new_tokens=6, cuda_graph=False)
        assert not captures
        cache = VarlenCache(config=model.config)
        auto = pipe(context, questions=QUESTIONS, press=press, max_new_tokens=6, cache=cache)
        assert auto == eager
        assert len(captures) == len(QUESTIONS)  # one capture per answer
        assert all(getattr(layer, "ragged", True) for layer in cache.layers)  # QuestLayers are paged
        captures.clear()
    every_step = PrefillDecodingPress(KnormPress(0.5), H2OPress(target_size=32))
    with pytest.warns(UserWarning, match="eager loop .*: H2OPress acts at every decode step"):
        pipe(context, question=QUESTIONS[0], press=every_step, max_new_tokens=4)
    assert not captures
    assert decode_module.graph_decoding_blocker(model, every_step) in decode_module._ANNOUNCED
