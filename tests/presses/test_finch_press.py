"""FinchPress: the context streams through a cache of fixed size chunk by chunk, the question's float64 attention
over (cache, chunk, question) choosing what stays; the question's length told by the caller."""

import pytest
import torch
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.generation import CompressedContext
from kvpress.generation import prefill as generation_prefill
from kvpress.presses import FinchPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, kept_positions, queries_f64


def capture_inputs(model):
    """Each full attention layer's (hidden states, cos, sin, keys) during a plain prefill."""
    seen, layers = {}, [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]

    def grab(module, args, kwargs, output):
        cos, sin = kwargs["position_embeddings"]
        seen[module.layer_idx] = (module, kwargs["hidden_states"].clone(), cos.clone(), sin.clone())

    return seen, [m.register_forward_hook(grab, with_kwargs=True) for m in layers]


def finch_reference(module, hidden, cos, sin, keys, q, k, chunk):
    """Kept positions per (sequence, kv head), by plain loops in float64."""
    b, h, n, _ = keys.shape
    queries = queries_f64(module, hidden, cos, sin)[:, :, -q:].detach()  # (b, H, q, d)
    groups = queries.shape[1] // h
    budget = max(0, k - q)
    out = torch.zeros(b, h, k, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            kept = []
            for start in range(0, n - q, chunk):
                kept += list(range(start, min(start + chunk, n - q)))
                if len(kept) <= budget:
                    continue
                seen = kept + list(range(n - q, n))
                ks = keys[bi, hi, seen].double()
                score = torch.zeros(len(kept), dtype=torch.float64)
                for g in range(groups):
                    qs = queries[bi, hi * groups + g]
                    logits = qs @ ks.T * module.scaling
                    for j in range(q):  # question token j sees the kept tokens and the question up to itself
                        logits[j, len(kept) + j + 1 :] = float("-inf")
                    score += logits.softmax(-1)[:, : len(kept)].sum(0) / groups
                order = sorted(range(len(kept)), key=lambda i: -float(score[i].detach()))[:budget]
                kept = sorted(kept[i] for i in order)
            out[bi, hi] = torch.tensor(sorted(kept + list(range(n - min(q, k), n))))
    return out


@pytest.mark.parametrize(("batch", "n", "q", "ratio", "chunk"),
                         [(1, 40, 6, 0.5, 8), (2, 37, 5, 0.6, 11), (1, 30, 3, 0.25, 64), (1, 24, 10, 0.75, 5)])  # fmt: skip
def test_kept_tokens_match_the_float64_chunk_loop(arch, batch, n, q, ratio, chunk):
    model = tiny_model(arch)
    ids = random_ids(n, batch, seed=n + q)
    seen, handles = capture_inputs(model)
    full = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model.model(input_ids=ids, **cache_kwargs(model.model, full))
    finally:
        for handle in handles:
            handle.remove()
    cache = DynamicCache(config=model.config)
    generation_prefill(model, ids, cache, FinchPress(ratio, chunk_length=chunk), question_length=q)
    k = round(n * (1 - ratio))
    for i in full_layers(model):
        module, hidden, cos, sin = seen[i]
        want = finch_reference(module, hidden, cos, sin, full.layers[i].keys, q, k, chunk)
        got = kept_positions(cache.layers[i].keys, full.layers[i].keys)
        assert torch.equal(got, want), i


def test_the_pipeline_tells_the_question_length_and_generate_takes_it_from_the_press():
    from tests.fixtures_pipeline import eos_ids, random_text, text_pipeline

    pipe = text_pipeline("llama")
    context, question = random_text(50, seed=3), " Where is the old river stone?"
    answer = pipe(context, question=question, press=FinchPress(0.5, chunk_length=16), query_aware=True,
                  max_new_tokens=6)["answer"]  # fmt: skip
    prompt = pipe.preprocess(context, [question], "", None, True, None, False)
    ids, n_question, tail = prompt["prompts"][0], prompt["question_lengths"][0], prompt["tails"][0]
    assert n_question == pipe.tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.shape[1]
    direct = CompressedContext.prefill(pipe.model, ids, FinchPress(0.5, chunk_length=16), question_length=n_question)
    eos = eos_ids(pipe.model, pipe.tokenizer)
    tokens = direct.generate([tail], 6, eos)[0]
    fixed = CompressedContext.prefill(pipe.model, ids, FinchPress(0.5, chunk_length=16, question_length=n_question))
    assert fixed.generate([tail], 6, eos)[0] == tokens
    assert answer == pipe.tokenizer.decode(tokens, skip_special_tokens=True)


def test_without_the_question_length_the_error_says_where_to_give_it():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="FinchPress needs the question's length: use the pipeline with query_aware"):
        generation_prefill(model, random_ids(30), DynamicCache(config=model.config), FinchPress(0.5))
    with pytest.raises(ValueError, match=r"question_length must be None or an int in \[1, 30\]"):
        generation_prefill(model, random_ids(30), DynamicCache(config=model.config), FinchPress(0.5),
                           question_length=31)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_length must be an int >= 1"):
        FinchPress(0.5, chunk_length=0)


def test_kept_tokens_keep_their_positions_and_the_budget_holds():
    model = tiny_model("qwen3")
    cache = DynamicCache(config=model.config)
    position, report = generation_prefill(model, random_ids(40), cache, FinchPress(0.5, chunk_length=8),
                                          question_length=5)  # fmt: skip
    assert position == 40 and all(report.mean_kept(i) == 20 for i in report.compressed_layers)
