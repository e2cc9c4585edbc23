"""fwe: Zipf counts against a float64 reference, and the answers are the three most frequent coded words."""

import math
import random
from collections import Counter

import pytest

from kvpress_evaluation.ruler.frequent_words import FrequentWordsTask, zeta, zipf_counts
from kvpress_evaluation.ruler.generate import generate_ruler
from tests.fixtures_pipeline import smollm2_tokenizer

# Published values of the Riemann zeta function.
ZETA = {
    1.5: 2.612375348685488,
    2.0: math.pi**2 / 6,
    2.5: 1.341487257250917,
    3.0: 1.2020569031595942,
    4.0: math.pi**4 / 90,
}


@pytest.mark.parametrize("s", list(ZETA))
def test_zeta_matches_published_values(s):
    assert zeta(s) == pytest.approx(ZETA[s], rel=1e-12)


def test_zipf_counts_match_the_formula():
    rng = random.Random(0)
    for _ in range(50):
        total, size, alpha = rng.randint(1, 100_000), rng.randint(1, 400), rng.choice(list(ZETA))
        z = ZETA[alpha]
        reference = [int(total * k**-alpha / z) for k in range(1, size + 1)]
        got = zipf_counts(total, size, alpha)
        # Flooring may differ only where total * p lands within rounding distance of an integer.
        assert all(abs(a - b) <= 1 for a, b in zip(got, reference)) and sum(a != b for a, b in zip(got, reference)) <= 1


@pytest.mark.parametrize("target", [512, 4096])
def test_answers_are_the_three_most_frequent_coded_words(target):
    for row in generate_ruler(smollm2_tokenizer(), "fwe", target, 2, seed=9):
        text = row["context"].split("Find the three most frequently appeared coded words. ", 1)[1]
        counts = Counter(text.split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..."
        assert sorted(ranked[1:4]) == sorted(row["answers"])
        # Strictly more frequent than every other coded word: the answer is unambiguous.
        assert min(counts[a] for a in row["answers"]) > max(
            c for w, c in counts.items() if w not in row["answers"][:3] and w != "..."
        )
        vocab_size = (target - 50) // 50
        assert len(counts) <= vocab_size and all(
            len(w) == 6 and w.isalpha() and w.islower() for w in counts if w != "..."
        )
        # Coded words have the Zipf counts of some total W; the noise word has at least its Zipf count (it also fills
        # the budget's remainder).
        coded = sorted((c for w, c in counts.items() if w != "..."), reverse=True)
        totals = [
            total
            for total in range(1, 20 * sum(counts.values()))
            if [c for c in zipf_counts(total, vocab_size, 2.0)[1:] if c] == coded
        ]
        assert totals and counts["..."] >= zipf_counts(totals[0], 1, 2.0)[0]


def test_alpha_must_exceed_one():
    with pytest.raises(ValueError, match="alpha must be > 1"):
        FrequentWordsTask(alpha=1.0)
