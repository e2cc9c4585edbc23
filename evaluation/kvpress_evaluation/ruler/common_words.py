"""RULER's common words extraction (cwe): name the 10 words repeated most often in a numbered list."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .ordering import StableOrder
from .prompt import Prompt, Sampler
from .templates import CWE_ANSWER_PREFIX, CWE_MARKER, CWE_TEMPLATE, render
from .words import word_pool

# Below this target the one-shot example (about 250 tokens) would leave too little room for the list itself.
FEWSHOT_MIN_TOKENS = 1024


def numbered(words: list[str]) -> str:
    """``1. w1 2. w2 ...`` (space separated, as RULER renders the list)."""
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))


@dataclass(frozen=True)
class CommonWordsTask:
    """``num_common`` words repeated ``freq_common`` times among others repeated ``freq_uncommon`` times.

    As in RULER, targets below 4096 tokens use 6 and 1 repeats, and a one-shot example (40 words, 10/3 repeats;
    below 4096: 20 words, 3/1) precedes the prompt; here it is left out below ``FEWSHOT_MIN_TOKENS``. The haystack
    size is the number of uncommon words.
    """

    name: str = "cwe"
    num_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    max_new_tokens: int = 120

    def sampler(self, rng: random.Random, target_tokens: int, index: int) -> Sampler:
        short = target_tokens < 4096
        freq_common, freq_uncommon = (6, 1) if short else (self.freq_common, self.freq_uncommon)
        example_size, example_freqs = (20, (3, 1)) if short else (40, (10, 3))
        # Each list entry costs at least one token, so ``target_tokens`` uncommon words always suffice.
        pool = word_pool(self.num_common + example_size + target_tokens, rng)
        example_words, words = pool[:example_size], pool[example_size:]
        order, example_order = StableOrder(rng.getrandbits(64)), StableOrder(rng.getrandbits(64))

        example_text = ""
        if target_tokens >= FEWSHOT_MIN_TOKENS:
            example = self._render(example_words, *example_freqs, example_order)
            example_text = example.text + " " + numbered(example.answers) + "\n"

        def build(n: int, m: int = 0) -> Prompt:
            prompt = self._render(words[: self.num_common + n], freq_common, freq_uncommon, order)
            return Prompt(example_text + prompt.context, prompt.question, prompt.answer_prefix, prompt.answers)

        return Sampler(build, high=len(words) - self.num_common)

    def _render(self, words: list[str], freq_common: int, freq_uncommon: int, order: StableOrder) -> Prompt:
        common = words[: self.num_common]
        counts = [freq_common] * len(common) + [freq_uncommon] * (len(words) - len(common))
        entries = order.arrange(words, counts)
        return render(CWE_TEMPLATE, CWE_ANSWER_PREFIX, CWE_MARKER, common, context=numbered(entries))


TASKS = {"cwe": CommonWordsTask()}
