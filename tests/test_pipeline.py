"""The "kv-press-text-generation" pipeline on tiny models.

References are computed independently of the pipeline: ``model.generate`` on the whole tokenized prompt, or a press
applied by hand followed by greedy decoding with the model's own attention (sdpa/eager, not the "kvpress" function).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.compression_summary import CompressionSummary
from kvpress.generation import CompressedContext
from kvpress.pipeline import TASK, KVPressTextGenerationPipeline, join_question
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.kvcompose_press import KVComposePress
from kvpress.presses.kvzip_press import KVzipPress
from kvpress.presses.minicache_press import MiniCachePress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.quest_press import QuestPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.think_press import ThinKPress
from tests.fixtures_pipeline import (
    chat_prompt,
    eos_ids,
    greedy_generate,
    greedy_tokens,
    random_text,
    smollm2_tokenizer,
    text_model,
    text_pipeline,
)

# Questions start with a space so that tokenizing context and question apart or together gives the same ids.
QUESTIONS = [" Where is the old river stone?", " Who rang the clock tower bell?", " What did the baker sell?"]
PRESSES = {
    "none": None,
    "knorm": KnormPress(0.5),
    "snapkv": SnapKVPress(0.5, window_size=4, kernel_size=3),
}


def _split(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """The whole prompt as (text up to the end of ``question``, the rest: template suffix and answer prefix)."""
    full = chat_prompt(tokenizer, context, question, answer_prefix)
    end = full.index(context + question) + len(context + question)
    return full[:end], full[end:]


def _manual_answer(model, tokenizer, prompt: str, tail: str, press, max_new_tokens: int):
    """Prefill ``prompt`` under ``press`` (by hand), then greedy-decode after ``tail`` with the model's own attention.

    Uniform compression leaves every full-attention layer with the same length, so the model's own causal masks
    (sized from the cache) stay exact: this decoding does not use the "kvpress" attention function at all.
    Returns ``(answer, cache after the prefill, report)``.
    """
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    eos = eos_ids(model, tokenizer)
    with torch.no_grad():
        with press(model) as report:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache), use_cache=True)
        prefilled = [(layer.keys, layer.values) for layer in cache.layers]
        position, new = ids.shape[1], tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids
        generated = []
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + new.shape[1])[None]
            logits = model(input_ids=new, **cache_kwargs(model, cache), position_ids=positions, use_cache=True).logits
            position += new.shape[1]
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            generated.append(token)
            new = torch.tensor([[token]])
    return tokenizer.decode(generated, skip_special_tokens=True), prefilled, report


def test_registered_by_import():
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    model, tok = text_model(), smollm2_tokenizer()
    pipe = pipeline(TASK, model=model, tokenizer=tok)
    assert isinstance(pipe, KVPressTextGenerationPipeline)
    assert pipe.model is model and pipe.tokenizer is tok


@pytest.mark.parametrize("answer_prefix", ["", " The answer is"])
def test_no_press_equals_generate(arch, attn, answer_prefix):
    model, tok = text_model(arch, attn), smollm2_tokenizer()
    pipe = text_pipeline(arch, attn)
    for seed, question in enumerate(QUESTIONS[:2]):
        context = random_text(30 + 25 * seed, seed=seed)
        ref = greedy_generate(model, tok, chat_prompt(tok, context, question, answer_prefix), max_new_tokens=10)
        assert ref  # a random model does not stop at once; an empty answer would make the test vacuous
        kwargs = dict(question=question, answer_prefix=answer_prefix, max_new_tokens=10)
        assert pipe(context, **kwargs)["answer"] == ref
        assert pipe(context, press=KnormPress(0.0), **kwargs)["answer"] == ref
        assert pipe(context, press=KnormPress(0.0), query_aware=True, **kwargs)["answer"] == ref


def test_plain_prompt_without_chat_template_equals_generate():
    model, tok = text_model("qwen3"), smollm2_tokenizer()
    pipe = text_pipeline("qwen3")
    context, question = random_text(40, seed=5), QUESTIONS[2]
    ref = greedy_generate(model, tok, tok.bos_token + context + question + "\n" + " Answer:", max_new_tokens=8)
    got = pipe(context, question=question, answer_prefix=" Answer:", use_chat_template=False, max_new_tokens=8)
    assert got["answer"] == ref


def test_answer_prefix_is_fed_and_not_returned():
    model, tok = text_model("mistral"), smollm2_tokenizer()
    pipe = text_pipeline("mistral")
    context, question, prefix = random_text(35, seed=6), QUESTIONS[0], " The old river stone is near the"
    with_prefix = pipe(context, question=question, answer_prefix=prefix, max_new_tokens=6)["answer"]
    assert with_prefix == greedy_generate(model, tok, chat_prompt(tok, context, question, prefix), 6)
    # The prefix changes the continuation (it is fed) and is not echoed at the start of the answer.
    assert with_prefix != pipe(context, question=question, max_new_tokens=6)["answer"]
    assert not with_prefix.startswith(prefix.strip())


@pytest.mark.parametrize("press", ["none", "knorm"])
def test_max_new_tokens_respected(press):
    model, tok = text_model("llama"), smollm2_tokenizer()
    context, question = random_text(45, seed=7), QUESTIONS[1]
    prompt, _ = _split(tok, context, "", "")
    tail = chat_prompt(tok, context, question)[len(prompt) :]
    pipe, answers = text_pipeline("llama"), []
    for n in (1, 3, 7):
        answers.append(pipe(context, question=question, press=PRESSES[press], max_new_tokens=n)["answer"])
        if PRESSES[press] is None:
            ref = greedy_generate(model, tok, chat_prompt(tok, context, question), n)
        else:
            ref = _manual_answer(model, tok, prompt, tail, PRESSES[press], n)[0]
        assert answers[-1] == ref
    assert answers[0] and len(answers[0]) < len(answers[1]) < len(answers[2])


@pytest.mark.parametrize("press", ["none", "knorm"])
def test_stops_at_eos(press):
    """Declare the 4th greedy token an EOS id: the answer must end right before its first occurrence."""
    model, tok = text_model("qwen2"), smollm2_tokenizer()
    pipe = text_pipeline("qwen2")
    context, question = random_text(30, seed=8), QUESTIONS[0]
    prompt, tail = _split(tok, context, question, "")
    if PRESSES[press] is None:
        ids = tok(prompt + tail, add_special_tokens=False, return_tensors="pt").input_ids
        tokens = greedy_tokens(model, tok, ids, max_new_tokens=10)
    else:
        full = pipe(context, question=question, press=PRESSES[press], max_new_tokens=10)["answer"]
        tokens = tok(full, add_special_tokens=False).input_ids
    stop = tokens[3]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, stop]
    try:
        answer = pipe(context, question=question, press=PRESSES[press], max_new_tokens=10)["answer"]
    finally:
        model.generation_config.eos_token_id = original
    assert answer == tok.decode(tokens[: tokens.index(stop)], skip_special_tokens=True)
    assert len(answer) > 0


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("press", ["none", "knorm", "snapkv"])
def test_questions_equal_separate_calls(arch, press, query_aware):
    pipe = text_pipeline(arch)
    context = random_text(50, seed=9)
    kwargs = dict(press=PRESSES[press], query_aware=query_aware, answer_prefix=" A:", max_new_tokens=6)
    together = pipe(context, questions=QUESTIONS, **kwargs)
    separate = [pipe(context, question=q, **kwargs)["answer"] for q in QUESTIONS]
    assert together == {"answers": separate}


@pytest.mark.parametrize("press", ["snapkv", "knorm"])
def test_query_aware_equals_manual_compression(arch, attn, press):
    model, tok = text_model(arch, attn), smollm2_tokenizer()
    context, question, prefix = random_text(40, seed=10), QUESTIONS[1], " A:"
    prompt, tail = _split(tok, context, question, prefix)
    ref, _, report = _manual_answer(model, tok, prompt, tail, PRESSES[press], max_new_tokens=8)
    n = report.original_lengths[report.compressed_layers[0]]
    assert all(report.mean_kept(i) == round(n * 0.5) for i in report.compressed_layers)  # compression really happened
    got = text_pipeline(arch, attn)(
        context, question=question, answer_prefix=prefix, press=PRESSES[press], query_aware=True, max_new_tokens=8
    )
    assert got["answer"] == ref


def test_compressed_context_without_question_equals_manual(arch):
    """Not query-aware: the context alone is compressed, then question and answer are decoded after it."""
    model, tok = text_model(arch), smollm2_tokenizer()
    context, question = random_text(40, seed=11), QUESTIONS[2]
    prompt, _ = _split(tok, context, "", "")
    full = chat_prompt(tok, context, question)
    ref, _, _ = _manual_answer(model, tok, prompt, full[len(prompt) :], PRESSES["knorm"], max_new_tokens=8)
    got = text_pipeline(arch)(context, question=question, press=PRESSES["knorm"], max_new_tokens=8)
    assert got["answer"] == ref


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("press", ["knorm", "snapkv"])
def test_user_cache_holds_the_compressed_context(arch, press, query_aware):
    model, tok = text_model(arch), smollm2_tokenizer()
    context = random_text(45, seed=12)
    cache = DynamicCache(config=model.config)
    text_pipeline(arch)(
        context, questions=QUESTIONS[:2], press=PRESSES[press], query_aware=query_aware, cache=cache, max_new_tokens=4
    )
    # Reference: the press applied by hand to what the pipeline compresses (query-aware: context + last question).
    prompt, tail = _split(tok, context, QUESTIONS[1] if query_aware else "", "")
    _, ref, report = _manual_answer(model, tok, prompt, tail, PRESSES[press], max_new_tokens=1)
    assert len(cache.layers) == len(ref) == model.config.num_hidden_layers
    assert report.compressed_layers
    for i, (layer, (keys, values)) in enumerate(zip(cache.layers, ref)):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        if i in report.kept_lengths:
            assert (report.kept_lengths[i] == layer.keys.shape[-2]).all()
            assert layer.keys.shape[-2] == round(report.original_lengths[i] * 0.5)


def test_max_context_length_truncates_the_context():
    model, tok = text_model("phi3"), smollm2_tokenizer()
    context, question = random_text(60, seed=13), QUESTIONS[0]
    prompt, _ = _split(tok, context, "", "")
    tail = chat_prompt(tok, context, question)[len(prompt) :]
    encode = lambda text: tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    assert encode(prompt).shape[1] > 50
    ids = torch.cat([encode(prompt)[:, :50], encode(tail)], dim=1)
    ref = tok.decode(greedy_tokens(model, tok, ids, 8), skip_special_tokens=True)
    got = text_pipeline("phi3")(context, question=question, max_context_length=50, max_new_tokens=8)["answer"]
    assert got == ref
    assert got != text_pipeline("phi3")(context, question=question, max_new_tokens=8)["answer"]


# ---- how the question joins the context --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("context", "question", "joined"),
    [
        ("It rained.", "Why?", "\nWhy?"),  # no whitespace at the junction: a newline
        ("It rained.", " Why?", " Why?"),  # the question brings its own separator
        ("It rained.\n", "Why?", "Why?"),  # so does the context
        ("It rained.", "\n\nQuestion: why?", "\n\nQuestion: why?"),  # prompt formats with their own separators
        ("It rained.", "", ""),  # no question: nothing appended
        ("", "Why?", "\nWhy?"),  # a saved context (its text unknown): a newline
    ],
)
def test_join_question(context, question, joined):
    assert join_question(context, question) == joined


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_question_without_leading_whitespace_reads_as_a_new_line(arch, use_chat_template):
    """The model reads ``context + "\\n" + question``, exactly as ``model.generate`` on that text would."""
    model, tok = text_model(arch), smollm2_tokenizer()
    pipe = text_pipeline(arch)
    context, question = random_text(40, seed=14), QUESTIONS[0].strip()
    if use_chat_template:
        text = chat_prompt(tok, context, "\n" + question)
    else:
        text = tok.bos_token + context + "\n" + question + "\n"
    ref = greedy_generate(model, tok, text, max_new_tokens=8)
    got = pipe(context, question=question, use_chat_template=use_chat_template, max_new_tokens=8)["answer"]
    assert got == ref
    # Token for token, the pipeline's prompt is that text (so the answer check above cannot pass by chance).
    parts = pipe.preprocess(context, questions=[question], answer_prefix="", max_context_length=None,
                            query_aware=False, use_chat_template=use_chat_template, return_report=False)  # fmt: skip
    ids = torch.cat([parts["prompts"][0], parts["tails"][0]], dim=1)
    assert ids.tolist() == tok(text, add_special_tokens=False, return_tensors="pt").input_ids.tolist()


def test_questions_without_leading_whitespace_each_get_their_own_answer():
    """Each of several questions is answered as ``model.generate`` answers its own full prompt."""
    model, tok = text_model("llama"), smollm2_tokenizer()
    context = random_text(50, seed=15)
    questions = [q.strip() for q in QUESTIONS]
    together = text_pipeline("llama")(context, questions=questions, max_new_tokens=6)["answers"]
    assert together == [greedy_generate(model, tok, chat_prompt(tok, context, "\n" + q), 6) for q in questions]


# ---- return_report ----------------------------------------------------------------------------------------------------
def _uncompressed_bytes(model, tok, context: str, question: str = "") -> tuple[int, int]:
    """``(prompt tokens, bytes of a DynamicCache holding them)``, measured by prefilling the prompt without a press."""
    prompt, _ = _split(tok, context, join_question(context, question) if question else "", "")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, cache), use_cache=True)
    return ids.shape[1], layer_memory_bytes(cache)


@pytest.mark.parametrize("press", ["none", "knorm", "snapkv"])
def test_report_of_a_dynamic_cache(arch, press):
    model, tok = text_model(arch), smollm2_tokenizer()
    context = random_text(45, seed=16)
    cache = DynamicCache(config=model.config)
    out = text_pipeline(arch)(context, question="Why?", press=PRESSES[press], cache=cache, return_report=True,
                              max_new_tokens=3)  # fmt: skip
    report = out["report"]
    assert isinstance(report, CompressionSummary) and set(out) == {"answer", "report"}
    n, full = _uncompressed_bytes(model, tok, context)
    assert (report.prefill_tokens, report.kv_bytes_uncompressed) == (n, full)
    assert report.cache == "DynamicCache"
    if press == "none":
        assert report.press is None and report.compression_ratio == 0.0 and report.kv_bytes == full
        assert report.layers is None
    else:
        assert report.press == repr(PRESSES[press]) and report.layers.compressed_layers
        assert report.compression_ratio == pytest.approx(0.5, abs=0.5 / n)
        assert report.kv_bytes < full
    assert layer_memory_bytes(cache) == report.kv_bytes  # after the call, the cache holds the compressed context
    assert report.saved_bytes == full - report.kv_bytes
    assert report.memory_ratio == pytest.approx(report.kv_bytes / full)
    assert report.as_dict()["saved_bytes"] == report.saved_bytes and "layers" not in report.as_dict()


def test_reports_of_several_questions():
    model, tok = text_model("qwen2"), smollm2_tokenizer()
    pipe = text_pipeline("qwen2")
    context = random_text(40, seed=17)
    shared = pipe(context, questions=QUESTIONS, press=PRESSES["knorm"], return_report=True, max_new_tokens=2)
    assert len(shared["reports"]) == 3 and shared["reports"][0] is shared["reports"][2]  # one compression
    aware = pipe(context, questions=QUESTIONS, press=PRESSES["snapkv"], query_aware=True, return_report=True,
                 max_new_tokens=2)  # fmt: skip
    for question, report in zip(QUESTIONS, aware["reports"]):  # one compression per question
        n, full = _uncompressed_bytes(model, tok, context, question)
        assert (report.prefill_tokens, report.kv_bytes_uncompressed) == (n, full)
        assert report.kv_bytes == pytest.approx(full * (round(n * 0.5) / n), rel=0, abs=full / n)
    assert "reports" not in pipe(context, questions=QUESTIONS, max_new_tokens=2)


@pytest.mark.parametrize("query_aware", [False, True])
def test_recorded_kept_tokens_are_those_of_the_prompt_that_answered(query_aware):
    model, tok = text_model("llama"), smollm2_tokenizer()
    context = random_text(50, seed=18)
    press = AdaKVPress(SnapKVPress(compression_ratio=0.5, window_size=4))
    out = text_pipeline("llama")(context, question="Why?", press=press, query_aware=query_aware, return_report=True,
                                 record_kept=True, max_new_tokens=2)  # fmt: skip
    summary = out["report"]
    prompt, _ = _split(tok, context, join_question(context, "Why?") if query_aware else "", "")
    expected_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(summary.prompt_ids, expected_ids) and summary.prefill_tokens == len(expected_ids)
    report, kept = summary.layers, 0
    for layer in report.compressed_layers:
        mask = report.kept_mask(layer)
        assert mask.shape == (1, model.config.num_key_value_heads, len(expected_ids))
        assert torch.equal(mask.sum(-1), report.kept_lengths[layer])
        assert bool(mask[..., -4:].all())  # SnapKV keeps its observation window
        assert report.scores[layer].shape == mask.shape
        kept += int(mask.sum())
    assert kept < 0.51 * len(expected_ids) * model.config.num_key_value_heads * len(report.compressed_layers)
    plain = text_pipeline("llama")(context, question="Why?", press=press, query_aware=query_aware, return_report=True,
                                   max_new_tokens=2)  # fmt: skip
    assert plain["answer"] == out["answer"] and not plain["report"].layers.kept_indices


def test_record_kept_needs_a_report_and_a_press():
    pipe = text_pipeline("llama")
    with pytest.raises(ValueError, match="record_kept=True records .* pass return_report=True and a press"):
        pipe("A context.", question="Why?", press=PRESSES["knorm"], record_kept=True)
    with pytest.raises(ValueError, match="record_kept=True records"):
        pipe("A context.", question="Why?", return_report=True, record_kept=True)
    with pytest.raises(ValueError, match="record_kept must be True or False, got 1"):
        pipe("A context.", question="Why?", press=PRESSES["knorm"], return_report=True, record_kept=1)


def test_report_without_a_context_is_an_error():
    with pytest.raises(ValueError, match="return_report=True reports the prefill of a context; context=None"):
        text_pipeline("llama")(None, question="Why?", cache=DynamicCache(), return_report=True)
    with pytest.raises(ValueError, match="return_report must be True or False, got 'yes'"):
        text_pipeline("llama")("A context.", question="Why?", return_report="yes")


@pytest.mark.parametrize(
    "press",
    [DecodingPress(KnormPress(), compression_interval=4, target_size=24),
     PrefillDecodingPress(SnapKVPress(0.5, window_size=4), DecodingPress(KnormPress(), 4, 24)),
     PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), DecodingPress(KnormPress(), 4, 24)),
     PrefillDecodingPress(AdaKVPress(KnormPress(0.5)), H2OPress(target_size=24)),
     QuestPress(page_size=4, token_budget=16, dense_layers=1)],
    ids=["decoding", "prefill+decoding", "head-variable+decoding", "head-variable+h2o", "quest"],
)  # fmt: skip
def test_decode_time_presses_equal_the_generation_layer(press):
    """The pipeline answers with the press active while decoding, as CompressedContext does on the same ids, and the
    questions of one call equal separate calls (the press's state starts fresh per answer)."""
    pipe = text_pipeline("llama")
    context = random_text(60, seed=11)
    kwargs = dict(press=press, answer_prefix=" A:", max_new_tokens=12)
    together = pipe(context, questions=QUESTIONS[:2], **kwargs)
    assert together == {"answers": [pipe(context, question=q, **kwargs)["answer"] for q in QUESTIONS[:2]]}
    prompt, tail = _split(pipe.tokenizer, context, QUESTIONS[0], " A:")
    ids = pipe.tokenizer(prompt[: prompt.index(context) + len(context)], add_special_tokens=False,
                         return_tensors="pt").input_ids  # fmt: skip
    tail_ids = pipe.tokenizer(QUESTIONS[0] + tail, add_special_tokens=False, return_tensors="pt").input_ids
    direct = CompressedContext.prefill(pipe.model, ids, press).generate(
        [tail_ids], 12, eos_ids(pipe.model, pipe.tokenizer)
    )[0]
    assert together["answers"][0] == pipe.tokenizer.decode(direct, skip_special_tokens=True)


@pytest.mark.parametrize("press", [KVzipPress(0.5, chunk_size=32, repeat_prompt_ids=(5, 6)), KVComposePress(0.5)],
                         ids=["kvzip", "kvcompose"])  # fmt: skip
def test_cross_layer_presses_equal_the_generation_layer(press):
    """Presses whose budget spans layers compress when the prefill forward ends: the model keeps half the prompt's
    pairs over all layers and heads, and the pipeline answers as CompressedContext does on the same ids."""
    pipe = text_pipeline("llama")
    context = random_text(60, seed=12)
    out = pipe(context, question=QUESTIONS[0], press=press, answer_prefix=" A:", max_new_tokens=10, return_report=True)
    prompt, tail = _split(pipe.tokenizer, context, QUESTIONS[0], " A:")
    ids = pipe.tokenizer(prompt[: prompt.index(context) + len(context)], add_special_tokens=False,
                         return_tensors="pt").input_ids  # fmt: skip
    n = ids.shape[1]
    assert out["report"].compression_ratio == pytest.approx(1 - round(n * 0.5) / n, abs=1e-6)
    assert out["report"].cache == ("VarlenCache" if press.capabilities.head_variable else "DynamicCache")
    tail_ids = pipe.tokenizer(QUESTIONS[0] + tail, add_special_tokens=False, return_tensors="pt").input_ids
    direct = CompressedContext.prefill(pipe.model, ids, press).generate([tail_ids], 10, eos_ids(pipe.model, pipe.tokenizer))
    assert out["answer"] == pipe.tokenizer.decode(direct[0], skip_special_tokens=True)


@pytest.mark.parametrize("press", [None, SnapKVPress(0.5, window_size=4), AdaKVPress(KnormPress(0.5)),
                                   ThinKPress(0.5, window_size=4), MiniCachePress(start_layer=0)],
                         ids=["none", "snapkv", "adakv", "think", "minicache"])  # fmt: skip
def test_prefill_chunk_size_equals_the_generation_layer(press):
    """``prefill_chunk_size`` prefills the context chunk by chunk, as ``CompressedContext.prefill(chunk_size=)`` does
    on the same ids; without a press the answers equal a one-forward prefill's."""
    pipe = text_pipeline("llama")
    context = random_text(90, seed=12)
    out = pipe(context, question=QUESTIONS[0], press=press, max_new_tokens=10, prefill_chunk_size=24,
               return_report=True)  # fmt: skip
    prompt, tail = _split(pipe.tokenizer, context, QUESTIONS[0], "")
    ids = pipe.tokenizer(prompt[: prompt.index(context) + len(context)], add_special_tokens=False,
                         return_tensors="pt").input_ids  # fmt: skip
    tail_ids = pipe.tokenizer(QUESTIONS[0] + tail, add_special_tokens=False, return_tensors="pt").input_ids
    direct = CompressedContext.prefill(pipe.model, ids, press, chunk_size=24)
    answer = direct.generate([tail_ids], 10, eos_ids(pipe.model, pipe.tokenizer))[0]
    assert out["answer"] == pipe.tokenizer.decode(answer, skip_special_tokens=True)
    assert out["report"].kv_bytes == direct.summaries[0].kv_bytes
    if press is None:
        assert out["answer"] == pipe(context, question=QUESTIONS[0], max_new_tokens=10)["answer"]
    else:  # ThinK and MiniCache keep every token (their saving is in bytes)
        ratio = 0.0 if isinstance(press, (ThinKPress, MiniCachePress)) else 0.5
        assert out["report"].compression_ratio == pytest.approx(ratio, abs=1 / ids.shape[1])
        assert out["report"].kv_bytes < out["report"].kv_bytes_uncompressed
