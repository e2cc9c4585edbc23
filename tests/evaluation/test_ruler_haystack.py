"""Haystacks: noise lines, synthetic essay, sentence split and needle insertion against plain references."""

import random
import re

import pytest

from kvpress_evaluation.ruler.haystack import (
    DEPTHS,
    NOISE_SENTENCES,
    essay_with_needles,
    essay_words,
    insert_at_fractions,
    noise_lines,
    split_sentences,
)


def test_depths_are_rulers_forty_percentages():
    assert DEPTHS == tuple(round(x) for x in [100 * i / 39 for i in range(40)])
    assert len(set(DEPTHS)) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 23])
def test_noise_lines_hold_n_sentences_five_per_line(n):
    lines = noise_lines(n)
    sentences = [s for line in lines for s in split_sentences(line)]
    assert sentences == [NOISE_SENTENCES[i % 5] for i in range(n)]
    assert all(len(split_sentences(line)) == 5 for line in lines[:-1])


def test_insertion_matches_a_plain_reference():
    rng = random.Random(0)
    for _ in range(200):
        items = [f"i{k}" for k in range(rng.randint(0, 12))]
        needles = [f"n{k}" for k in range(rng.randint(1, 4))]
        fractions = [rng.random() for _ in needles]
        # Reference: walk the gaps in order and drop each needle (in its list order) into its gap.
        gaps = [min(int(f * (len(items) + 1)), len(items)) for f in fractions]
        expected = []
        for gap in range(len(items) + 1):
            expected += [n for n, g in zip(needles, gaps) if g == gap]
            if gap < len(items):
                expected.append(items[gap])
        assert insert_at_fractions(items, needles, fractions) == expected


def test_essay_is_one_fixed_text():
    long = essay_words(3000)
    assert essay_words(100) == long[:100] and len(long) == 3000
    sentences = split_sentences(" ".join(long))
    assert all(re.fullmatch(r"[A-Z][a-z ,\-]+[.?]", s) for s in sentences[:-1])


def test_split_sentences_on_end_punctuation_and_space():
    assert split_sentences("One. Two? Three!  Four a.b five") == ["One.", "Two?", "Three!", "Four a.b five"]


@pytest.mark.parametrize("depths", [[0], [100], [51], [13, 87, 44]])
def test_essay_needles_sit_at_their_depth(depths):
    needles = [f"NEEDLE{k}." for k in range(len(depths))]
    text = essay_with_needles(400, needles, depths)
    plain_text = " ".join(essay_words(400))
    without = text
    for needle in needles:
        without = without.replace(" " + needle, "").replace(needle + " ", "")
    assert without == plain_text
    n_sentences = len(split_sentences(plain_text))  # the last one may be cut mid-sentence, as in RULER
    # As in RULER, the needles go in their order to the sorted depths.
    for needle, depth in zip(needles, sorted(depths)):
        before = text[: text.index(needle)]
        for other in needles:
            before = before.replace(other, "")
        assert len(split_sentences(before)) == int(n_sentences * depth / 100)
