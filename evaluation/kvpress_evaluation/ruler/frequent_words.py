"""RULER's frequent words extraction (fwe): name the three most frequent coded words of a Zipf-distributed text."""

from __future__ import annotations

import functools
import math
import random
import string
from dataclasses import dataclass

from .ordering import StableOrder
from .prompt import Prompt, Sampler
from .templates import FWE_ANSWER_PREFIX, FWE_MARKER, FWE_TEMPLATE, render

NOISE_WORD = "..."


@functools.cache
def zeta(s: float) -> float:
    """Riemann zeta for ``s > 1``: partial sum to 1000 plus the Euler-Maclaurin tail (error below 1e-12)."""
    if s <= 1:
        raise ValueError(f"alpha must be > 1, got {s}")
    n = 1000
    partial = math.fsum(k**-s for k in range(1, n))
    return partial + n ** (1 - s) / (s - 1) + 0.5 * n**-s + s * n ** (-s - 1) / 12


def zipf_counts(total: int, vocab_size: int, alpha: float) -> list[int]:
    """RULER's occurrence counts: ``int(total * k**-alpha / zeta(alpha))`` for rank ``k = 1..vocab_size``."""
    z = zeta(alpha)
    return [int(total * k**-alpha / z) for k in range(1, vocab_size + 1)]


@dataclass(frozen=True)
class FrequentWordsTask:
    """Coded words (random lowercase strings) with Zipf counts; rank 1 is the noise word ``...``.

    The vocabulary has ``max((target_tokens - 50) // 50, 5)`` words as in RULER; the haystack size is the total
    ``W`` of the Zipf law, then extra noise words fill the remainder. The answers are ranks 2 to 4; ``W`` starts
    where their counts are strictly above rank 5's.
    """

    name: str = "fwe"
    alpha: float = 2.0
    word_length: int = 6
    max_new_tokens: int = 50

    def __post_init__(self):
        if self.alpha <= 1:
            raise ValueError(f"alpha must be > 1, got {self.alpha}")

    def sampler(self, rng: random.Random, target_tokens: int, index: int) -> Sampler:
        vocab_size = max((target_tokens - 50) // 50, 5)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(self.word_length)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = NOISE_WORD
        answers = words[1:4]
        order = StableOrder(rng.getrandbits(64))

        def build(n: int, m: int = 0) -> Prompt:
            counts = zipf_counts(n, vocab_size, self.alpha)
            # One step of W can add several words at once (floors of several ranks cross together); the gap left is
            # filled with extra noise words, which the instructions say to ignore and which never change the answers.
            counts[0] += m
            text = order.arrange(words, counts)
            return render(FWE_TEMPLATE, FWE_ANSWER_PREFIX, FWE_MARKER, answers, context=" ".join(text))

        return Sampler(build, low=self._smallest_total(vocab_size), fine=True)

    def _smallest_total(self, vocab_size: int) -> int:
        """The least ``W`` whose counts rank the answers (ranks 2-4) strictly above every other coded word."""
        total = 1
        while True:
            c = zipf_counts(total, min(vocab_size, 5), self.alpha)
            if c[1] > c[2] > c[3] > c[4]:
                return total
            total += 1


TASKS = {"fwe": FrequentWordsTask()}
