"""Word lists and needle values."""

import random
import re

import pytest

from kvpress_evaluation.ruler.words import (
    ADJECTIVES,
    NOUNS,
    VERBS,
    distinct_values,
    random_value,
    real_words,
    word_keys,
    word_pool,
)


def test_lists_are_distinct_lowercase_words():
    for words in (ADJECTIVES, NOUNS, VERBS):
        assert len(set(words)) == len(words) and all(re.fullmatch("[a-z]+", w) for w in words)
    assert real_words() == tuple(sorted(set(ADJECTIVES + NOUNS + VERBS)))
    assert len(word_keys()) == len(ADJECTIVES) * len(NOUNS) == len(set(word_keys()))


@pytest.mark.parametrize("n", [1, 100, 462, 463, 5000])
def test_word_pool_is_real_words_first_then_fresh_pseudo_words(n):
    pool = word_pool(n, random.Random(n))
    real = set(real_words())
    assert len(pool) == n == len(set(pool))
    assert all(re.fullmatch("[a-z]+", w) for w in pool)
    head = min(n, len(real))
    assert set(pool[:head]) <= real and not set(pool[head:]) & real
    assert pool == word_pool(n, random.Random(n))


def test_word_pool_bound():
    with pytest.raises(ValueError, match="n must be at most"):
        word_pool(10**9, random.Random(0))


def test_values_have_the_needle_formats():
    rng = random.Random(1)
    for _ in range(200):
        number = random_value("numbers", rng)
        assert re.fullmatch(r"\d{7}", number) and 1_000_000 <= int(number) <= 9_999_999
        uuid = random_value("uuids", rng)
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid)
        adjective, noun = random_value("words", rng).split("-")
        assert adjective in ADJECTIVES and noun in NOUNS
    with pytest.raises(ValueError, match="kind must be one of"):
        random_value("dates", rng)


def test_distinct_values_avoid_the_excluded_ones():
    rng = random.Random(2)
    exclude = set(word_keys()[:-30])
    values = distinct_values("words", 30, rng, exclude)
    assert sorted(values) == sorted(word_keys()[-30:])
