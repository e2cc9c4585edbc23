"""Middle truncation: exact against string slicing with a one-character-per-token tokenizer, then with SmolLM2's."""

import random

import pytest

from kvpress_evaluation.longbench.truncation import fit_prompt, truncate_middle
from tests.fixtures_pipeline import random_text, smollm2_tokenizer


class CharTokenizer:
    """One token per character, so that a cut at ``k`` tokens is ``text[:k]``: the reference is string slicing."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def random_string(rng, n):
    return "".join(rng.choice("abcdefghij \n") for _ in range(n))


def official_truncation(prompt: str, max_tokens: int) -> str:
    """LongBench's rule on characters: the first max_tokens // 2 and the last max_tokens - max_tokens // 2."""
    if len(prompt) <= max_tokens:
        return prompt
    head = max_tokens // 2
    return prompt[:head] + prompt[len(prompt) - (max_tokens - head) :]


def test_truncate_middle_keeps_head_and_tail():
    rng, tok = random.Random(0), CharTokenizer()
    for _ in range(300):
        text = random_string(rng, rng.randint(0, 60))
        budget = rng.randint(1, 70)
        assert truncate_middle(text, tok, budget) == official_truncation(text, budget)
        head = rng.randint(0, budget)
        expected = text if len(text) <= budget else text[:head] + text[len(text) - (budget - head) :]
        assert truncate_middle(text, tok, budget, head_tokens=head) == expected


def test_fit_prompt_cuts_inside_the_context_like_the_whole_prompt_rule():
    rng, tok = random.Random(1), CharTokenizer()
    for _ in range(500):
        context, question = random_string(rng, rng.randint(0, 80)), random_string(rng, rng.randint(0, 30))
        budget = rng.randint(1, 100)
        new_context, new_question = fit_prompt(context, question, tok, budget)
        # Same text as LongBench's truncation of the whole prompt...
        assert new_context + new_question == official_truncation(context + question, budget)
        # ... with the question whole whenever it fits in the kept tail, else everything in the context.
        if len(context) + len(question) <= budget or len(question) <= budget - budget // 2:
            assert new_question == question
        else:
            assert new_question == ""


def test_smollm2_tokens_at_both_ends_and_budget():
    tok = smollm2_tokenizer()
    text = random_text(600, seed=3)
    ids = tok.encode(text, add_special_tokens=False)
    for budget in (1, 2, 101, 256):
        cut = truncate_middle(text, tok, budget)
        head, tail = budget // 2, budget - budget // 2
        assert cut.startswith(tok.decode(ids[:head]))
        assert cut.endswith(tok.decode(ids[len(ids) - tail :]))
        # Re-encoding may merge a token or two across the seam.
        assert abs(len(tok.encode(cut, add_special_tokens=False)) - budget) <= 2
    assert truncate_middle(text, tok, len(ids)) == text


def test_smollm2_fit_prompt_keeps_question_and_budget():
    tok = smollm2_tokenizer()
    context, question = random_text(500, seed=4), "\n\nQuestion: which road leads north?\nAnswer:"
    n_question = len(tok.encode(question, add_special_tokens=False))
    for budget in (64, 200):
        new_context, new_question = fit_prompt(context, question, tok, budget)
        assert new_question == question
        assert new_context.startswith(tok.decode(tok.encode(context, add_special_tokens=False)[: budget // 2]))
        n = len(tok.encode(new_context, add_special_tokens=False)) + n_question
        assert budget - 2 <= n <= budget + 2
    # A question longer than the kept tail: the whole prompt is cut, nothing is left as question.
    new_context, new_question = fit_prompt(context, question, tok, 2 * n_question - 2)
    assert new_question == "" and new_context.startswith(context[:10])
    assert fit_prompt("short", question, tok, 1000) == ("short", question)


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True, None])
def test_bad_budget(max_tokens):
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        truncate_middle("abc", CharTokenizer(), max_tokens)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        fit_prompt("abc", "d", CharTokenizer(), max_tokens)


def test_bad_head_and_tokenizer():
    with pytest.raises(ValueError, match=r"head_tokens must be an int in \[0, max_tokens=4\]"):
        truncate_middle("abcdef", CharTokenizer(), 4, head_tokens=5)
    with pytest.raises(ValueError, match="tokenizer must have encode and decode"):
        truncate_middle("abc", len, 2)
