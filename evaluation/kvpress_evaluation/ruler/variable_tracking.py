"""RULER's variable tracking task: follow chains of ``VAR X = VAR Y`` assignments hidden in noise."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from .haystack import insert_at_fractions, noise_lines
from .prompt import Prompt, Sampler
from .templates import VT_ANSWER_PREFIX, VT_MARKER, VT_TEMPLATE, render


def _names(rng: random.Random, n: int, length: int) -> list[str]:
    """``n`` distinct uppercase variable names of ``length`` letters."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(length))
        if name not in names:
            names.append(name)
    return names


def _chains(names: list[str], values: list[int], num_hops: int) -> list[list[str]]:
    """One chain per value: ``VAR A = value``, then ``VAR B = VAR A `` per hop (trailing space as in RULER)."""
    chains = []
    for c, value in enumerate(values):
        chain_names = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        statements = [f"VAR {chain_names[0]} = {value}"]
        statements += [f"VAR {chain_names[j]} = VAR {chain_names[j - 1]} " for j in range(1, num_hops + 1)]
        chains.append(statements)
    return chains


def _haystack(n_sentences: int, chains: list[list[str]], fractions: list[list[float]]) -> str:
    """Noise lines with every statement at its own random gap; each chain's fractions are sorted, so every chain
    reads in assignment order."""
    pairs = sorted(
        ((f, s) for chain, chain_fractions in zip(chains, fractions) for f, s in zip(chain_fractions, chain)),
        key=lambda p: p[0],
    )
    lines = insert_at_fractions(noise_lines(n_sentences), [s for _, s in pairs], [f for f, _ in pairs])
    return "\n".join(lines)


@dataclass(frozen=True)
class VariableTrackingTask:
    """``num_chains`` chains of ``num_hops`` hops; the answers are the ``num_hops + 1`` names of chain 0.

    A one-shot example (3-letter names, its own value) always precedes the prompt, as in RULER. RULER builds it at
    500 tokens; here its haystack has ``clamp(target_tokens // 40, 5, 75)`` noise sentences so that short targets
    keep room for the real haystack.
    """

    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 4
    max_new_tokens: int = 30

    def __post_init__(self):
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError(f"num_chains and num_hops must be >= 1, got {self.num_chains=}, {self.num_hops=}")

    def sampler(self, rng: random.Random, target_tokens: int, index: int) -> Sampler:
        per_chain = self.num_hops + 1
        values = rng.sample(range(10000, 99999), 2 * self.num_chains)
        values, example_values = values[: self.num_chains], values[self.num_chains :]
        names = _names(rng, per_chain * self.num_chains, 5)
        chains = _chains(names, values, self.num_hops)
        fractions = [sorted(rng.random() for _ in chain) for chain in chains]

        example_names = _names(rng, per_chain * self.num_chains, 3)
        example_chains = _chains(example_names, example_values, self.num_hops)
        example_fractions = [sorted(rng.random() for _ in chain) for chain in example_chains]
        example_sentences = min(max(target_tokens // 40, 5), 75)
        example = self._render(example_sentences, example_chains, example_fractions, example_names, example_values[0])
        example_text = example.text + " " + " ".join(example.answers) + "\n"

        def build(n: int, m: int = 0) -> Prompt:
            prompt = self._render(n, chains, fractions, names, values[0])
            return Prompt(example_text + prompt.context, prompt.question, prompt.answer_prefix, prompt.answers)

        return Sampler(build)

    def _render(self, n: int, chains, fractions, names: list[str], value: int) -> Prompt:
        return render(
            VT_TEMPLATE,
            VT_ANSWER_PREFIX,
            VT_MARKER,
            names[: self.num_hops + 1],
            context=_haystack(n, chains, fractions),
            query=str(value),
            num_v=str(self.num_hops + 1),
        )


TASKS = {"vt": VariableTrackingTask()}
