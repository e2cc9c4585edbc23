"""One generated RULER prompt before length accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Prompt:
    """A prompt split as the kvpress pipeline consumes it.

    ``context`` (instructions and haystack) is prefilled and compressed; ``question`` and ``answer_prefix`` follow it;
    ``answers`` are the gold strings scored by substring match.
    """

    context: str
    question: str
    answer_prefix: str
    answers: list[str]

    @property
    def text(self) -> str:
        """The whole prompt as RULER writes it (``TEMPLATE + ANSWER_PREFIX``)."""
        return self.context + self.question + self.answer_prefix


class Sampler(NamedTuple):
    """One sample's random draws, as a function of its haystack size.

    ``build(n, m)`` renders the prompt with ``n`` haystack units (noise sentences, essay words, distractor needles,
    distinct words, word occurrences or distractor documents) and ``m`` filler noise sentences (used only when
    ``fine``, to fill the gap smaller than one coarse unit). Valid ``n`` lie in ``[low, high]`` (``high=None``: no
    bound).
    """

    build: Callable[[int, int], Prompt]
    low: int = 0
    high: int | None = None
    fine: bool = False
