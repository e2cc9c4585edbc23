"""RULER's needle-in-a-haystack tasks: single, multi-key, multi-value and multi-query retrieval."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .haystack import DEPTHS, essay_with_needles, insert_at_fractions, noise_lines
from .prompt import Prompt, Sampler
from .templates import NIAH_ANSWER_PREFIX, NIAH_MARKER, NIAH_NEEDLE, NIAH_TEMPLATE, join_keys, render, singular
from .words import distinct_values, random_value

HAYSTACKS = ("noise", "essay", "needle")
VALUE_KINDS = ("words", "numbers", "uuids")


@dataclass(frozen=True)
class NiahTask:
    """A niah task: ``num_k`` keys with ``num_v`` values each, ``num_q`` of the keys queried.

    ``haystack``: ``"noise"`` (RULER's repeated sentences), ``"essay"`` (synthetic prose) or ``"needle"`` (distractor
    needles with fresh keys and values). Answers are the values of the queried keys, ``num_q * num_v`` strings.
    """

    name: str
    haystack: str
    type_k: str
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        for field in ("type_k", "type_v"):
            if getattr(self, field) not in VALUE_KINDS:
                raise ValueError(f"{field} must be one of {VALUE_KINDS}, got {getattr(self, field)!r}")
        if min(self.num_k, self.num_v, self.num_q) < 1 or self.num_q > self.num_k:
            raise ValueError(
                f"need 1 <= num_q <= num_k and num_v >= 1, got {self.num_k=}, {self.num_v=}, {self.num_q=}"
            )

    def sampler(self, rng: random.Random, target_tokens: int, index: int) -> Sampler:
        keys = distinct_values(self.type_k, self.num_k, rng)
        flat = distinct_values(self.type_v, self.num_k * self.num_v, rng, exclude=set(keys))
        values = {k: flat[i * self.num_v : (i + 1) * self.num_v] for i, k in enumerate(keys)}
        queried = rng.sample(keys, self.num_q)
        needles = [NIAH_NEEDLE.format(type_needle_v=self.type_v, key=k, value=v) for k in keys for v in values[k]]
        rng.shuffle(needles)
        answers = [v for k in queried for v in values[k]]

        template, prefix, type_needle_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, self.type_v
        if self.num_q * self.num_v == 1:
            template, _ = singular(template, type_needle_v)
            prefix, type_needle_v = singular(prefix, type_needle_v)
        fields = {"type_needle_v": type_needle_v, "query": join_keys(queried)}

        fractions = [rng.random() for _ in needles]
        depths = rng.sample(DEPTHS, len(needles))
        distractors = _Distractors(self.type_k, self.type_v, rng.getrandbits(64), exclude=set(keys) | set(flat))

        def build(n: int, m: int = 0) -> Prompt:
            if self.haystack == "essay":
                text = essay_with_needles(n, needles, depths)
            else:
                lines = distractors.first(n) if self.haystack == "needle" else noise_lines(n)
                text = "\n".join(insert_at_fractions(lines + noise_lines(m), needles, fractions))
            return render(template, prefix, NIAH_MARKER, answers, context=text, **fields)

        return Sampler(build, fine=self.haystack == "needle")


class _Distractors:
    """A lazily extended stream of distractor needles whose keys and values avoid the real ones."""

    def __init__(self, type_k: str, type_v: str, seed: int, exclude: set[str]):
        self.type_k, self.type_v, self.exclude = type_k, type_v, exclude
        self.rng = random.Random(seed)
        self.lines: list[str] = []

    def first(self, n: int) -> list[str]:
        while len(self.lines) < n:
            key, value = random_value(self.type_k, self.rng), random_value(self.type_v, self.rng)
            if key not in self.exclude and value not in self.exclude:
                self.lines.append(NIAH_NEEDLE.format(type_needle_v=self.type_v, key=key, value=value))
        return self.lines[:n]


TASKS = {
    task.name: task
    for task in (
        NiahTask("niah_single_1", "noise", "words", "numbers"),
        NiahTask("niah_single_2", "essay", "words", "numbers"),
        NiahTask("niah_single_3", "essay", "words", "uuids"),
        NiahTask("niah_multikey_1", "essay", "words", "numbers", num_k=4),
        NiahTask("niah_multikey_2", "needle", "words", "numbers"),
        NiahTask("niah_multikey_3", "needle", "uuids", "uuids"),
        NiahTask("niah_multivalue", "essay", "words", "numbers", num_v=4),
        NiahTask("niah_multiquery", "essay", "words", "numbers", num_k=4, num_q=4),
    )
}
