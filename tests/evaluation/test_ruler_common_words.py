"""cwe: the answers are the 10 most repeated words of the numbered list, with RULER's repeat counts."""

import re
from collections import Counter

import pytest

from kvpress_evaluation.ruler.common_words import FEWSHOT_MIN_TOKENS
from kvpress_evaluation.ruler.generate import generate_ruler
from tests.fixtures_pipeline import smollm2_tokenizer

HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)


def _entries(numbered):
    """Words of ``1. w 2. w ...``, checking that the numbering runs 1, 2, 3... without gaps."""
    pairs = re.findall(r"(\d+)\. (\S+)", numbered)
    assert [int(i) for i, _ in pairs] == list(range(1, len(pairs) + 1))
    return [w for _, w in pairs]


@pytest.mark.parametrize("target, common, uncommon", [(512, 6, 1), (2048, 6, 1), (4096, 30, 3)])
def test_answers_are_the_most_repeated_words(target, common, uncommon):
    for row in generate_ruler(smollm2_tokenizer(), "cwe", target, 2, seed=4):
        parts = row["context"].split(HEADER)
        assert len(parts) == (3 if target >= FEWSHOT_MIN_TOKENS else 2)
        counts = Counter(_entries(parts[-1]))
        assert sorted(w for w, c in counts.items() if c == common) == sorted(row["answers"])
        assert len(row["answers"]) == 10 and len(set(row["answers"])) == 10
        others = [c for w, c in counts.items() if w not in row["answers"]]
        assert others and set(others) == {uncommon}
        assert row["question"] == "Question: What are the 10 most common words in the above list? "
        assert row["answer_prefix"] == "Answer: The top 10 words that appear most often in the list are:"
        if len(parts) == 3:
            # The one-shot example's answer names its own list's 10 most repeated words, in a numbered list.
            example_list, example_answer = parts[1].split("\nQuestion:")[0], parts[1].rsplit("are: ", 1)[1]
            example_counts = Counter(_entries(example_list))
            top = max(example_counts.values())
            assert sorted(_entries(example_answer)) == sorted(w for w, c in example_counts.items() if c == top)
            assert not set(example_counts) & set(counts)


def test_long_lists_take_pseudo_words_beyond_the_real_ones():
    row = generate_ruler(smollm2_tokenizer(), "cwe", 16384, 1, seed=0)[0]
    words = _entries(row["context"].split(HEADER)[-1])
    assert len(set(words)) > 462 and all(re.fullmatch("[a-z]+", w) for w in words)
