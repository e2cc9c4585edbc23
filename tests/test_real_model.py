"""SmolLM2-135M-Instruct (offline) retrieves a number hidden in a ~1500-token haystack, with and without compression.

The haystack is varied, digit-free filler (``kvpress.needle``), so the needle holds the only number of the context.
The first number of each answer must be exactly the hidden one: a truncated or altered number (``4821`` for
``48213``) fails.

Phrasing matters for a 135M model under compression. With the question "What is the magic number?" alone, the
query-aware SnapKV window attends "magic number" but hardly the digits that follow, and its pooling (7 tokens) then
keeps the first digits of the number only (answers such as ``4821``); ending the question with "Give only the
number." makes the window attend the digits themselves, and every method answered exactly at every tried depth.
"""

from __future__ import annotations

import re

import pytest
from transformers import DynamicCache, pipeline

from kvpress.needle import build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress

pytestmark = pytest.mark.slow

N_TOKENS = 1500
NEEDLE = "The magic number is {number}."
QUESTION = " What is the magic number? Give only the number."
ANSWER_PREFIX = "The magic number is"
NUMBERS = (48213, 73915, 26847)
DEPTHS = (0.5, 0.25)
METHODS = {
    "no press": (None, False),
    "knorm 0.5": (KnormPress(0.5), False),
    "snapkv 0.5 query-aware": (SnapKVPress(0.5), True),
}


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    return pipeline(TASK, model=model, tokenizer=tokenizer)


def _prompt_tokens(tokenizer, context: str, question: str) -> int:
    """Tokens of the chat-templated prompt up to the end of ``context + question`` (what the pipeline prefills)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + question}], add_generation_prompt=True, tokenize=False
    )
    prompt = rendered[: rendered.index(context + question) + len(context + question)]
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("number", NUMBERS)
@pytest.mark.parametrize("method", list(METHODS))
def test_hidden_number_retrieved(smollm2, method, number, depth):
    tokenizer = smollm2.tokenizer
    context = build_needle_context(tokenizer, N_TOKENS, NEEDLE.format(number=number), depth=depth, seed=0)
    assert abs(len(tokenizer(context, add_special_tokens=False).input_ids) - N_TOKENS) <= 0.02 * N_TOKENS
    press, query_aware = METHODS[method]
    cache = DynamicCache(config=smollm2.model.config)
    answer = smollm2(
        context, question=QUESTION, answer_prefix=ANSWER_PREFIX, press=press, query_aware=query_aware,
        cache=cache, max_new_tokens=8,
    )["answer"]
    found = re.search(r"\d+", answer)
    assert found is not None and found.group() == str(number), f"{method} at depth {depth}: {answer!r}"
    # The cache really holds the (compressed) prompt: half of its tokens in every layer under a 0.5 press.
    n = _prompt_tokens(tokenizer, context, QUESTION if query_aware else "")
    kept = n if press is None else round(n * 0.5)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [kept] * smollm2.model.config.num_hidden_layers
