"""Needle in a haystack over a grid of context lengths and depths, scored by an exact match of the answer.

By default the needle is a passkey sentence whose 7-digit number is drawn per example from the seed: the model
cannot guess it or know it from training (unlike a famous fixed sentence), and the filler contains no digit, so the
number appears once in the context and finding it in the answer is an unambiguous test of retrieval. Any fixed needle
works too, e.g. ``needle: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny
day."``, ``question: "What is the best thing to do in San Francisco?"``, ``answer: "Dolores Park"``.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from kvpress.needle import build_needle_context

from ..benchmark import Benchmark, BenchmarkOptions, Example
from .heatmap import needle_cells, plot_needle_heatmap

PASSKEY = "{passkey}"
TASK = "needle"


class NeedleOptions(BenchmarkOptions):
    """The grid and the needle.

    Attributes:
        lengths: context lengths in tokens (the whole context, needle included; the question comes on top).
        depths: needle depths in percent of the filler before the needle (0: the context starts with the needle,
            100: it ends with it).
        needle: the sentence hidden in the context; ``{passkey}`` in it is replaced by the example's 7-digit number.
        question: asked after the context (on a new line).
        answer: the gold answer (``{passkey}`` replaced as in ``needle``); it must occur in the needle.
        n_per_cell: examples per (length, depth) cell, each with its own filler and passkey.
        max_new_tokens: generation length of each answer.
    """

    lengths: list[int] = Field(default_factory=lambda: [1000, 2000, 4000])
    depths: list[float] = Field(default_factory=lambda: [float(d) for d in range(0, 101, 10)])
    needle: str = f"The secret passkey for the blue vault is {PASSKEY}."
    question: str = "What is the secret passkey for the blue vault?"
    answer: str = PASSKEY
    n_per_cell: int = 1
    max_new_tokens: int = 32

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if not value or any(n <= 0 for n in value) or len(set(value)) != len(value):
            raise ValueError(f"lengths must be a non-empty list of distinct positive token counts, got {value}")
        return value

    @field_validator("depths")
    @classmethod
    def _depths(cls, value: list[float]) -> list[float]:
        if not value or any(math.isnan(d) or not 0 <= d <= 100 for d in value) or len(set(value)) != len(value):
            raise ValueError(f"depths must be a non-empty list of distinct percentages in [0, 100], got {value}")
        return value

    @field_validator("needle", "question", "answer")
    @classmethod
    def _text(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name} must be a non-empty string")
        return value.strip()

    @field_validator("n_per_cell", "max_new_tokens")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be a positive int, got {value}")
        return value

    @model_validator(mode="after")
    def _answer_in_needle(self):
        if PASSKEY in self.answer and PASSKEY not in self.needle:
            raise ValueError(f"answer uses {PASSKEY} but the needle has none: put {PASSKEY} in the needle")
        # Compared with the placeholders in place: an answer must be found in the needle whatever the passkey.
        if not answer_found(self.needle, self.answer):
            raise ValueError(f"answer {self.answer!r} must occur in the needle {self.needle!r} (as whole words)")
        return self


def answer_found(prediction: str, answer: str) -> bool:
    """True when ``answer`` occurs in ``prediction`` as whole words (or a whole number), ignoring case and how the
    words are spaced: ``"1234567"`` is found in ``"The passkey is 1234567."`` but not in ``"12345678"``."""
    text = " ".join(prediction.split()).lower()
    target = " ".join(answer.split()).lower()
    if not target:
        raise ValueError("answer must be a non-empty string")
    start = r"(?<!\w)" if target[0].isalnum() else ""
    end = r"(?!\w)" if target[-1].isalnum() else ""
    return re.search(start + re.escape(target) + end, text) is not None


def cell_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and ``parts``, stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256("|".join(map(str, (seed, TASK, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class NeedleBenchmark(Benchmark):
    """One example per (length, depth, repeat), ``meta = {"length": tokens, "depth": percent}``.

    Within a (length, repeat) the filler is drawn from one seed at every depth, so depths are compared on the same
    sentences (bar one at the needle's seam) and only the needle moves; the passkey differs in every example.
    """

    name = TASK
    Options = NeedleOptions
    task_names = (TASK,)

    def max_context_tokens(self) -> int:
        return max(self.options.lengths)

    def examples(self, tokenizer, seed: int, max_context_tokens: int | None = None) -> list[Example]:
        """The grid in order: lengths, then depths (as given), then repeats.

        Ids read ``needle_L<length>_d<depth>_r<repeat>_s<seed>`` (e.g. ``needle_L4000_d50_r0_s42``).

        Raises:
            ValueError: ``lengths`` beyond ``max_context_tokens``, or shorter than the needle.
        """
        options = self.options
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004  (bad input is a ValueError)
        if max_context_tokens is not None and max(options.lengths) > max_context_tokens:
            raise ValueError(
                f"lengths: {max(options.lengths)} tokens exceed the context budget of {max_context_tokens} tokens"
            )
        needle_tokens = len(tokenizer(options.needle.replace(PASSKEY, "1234567"), add_special_tokens=False).input_ids)
        if min(options.lengths) <= needle_tokens:
            raise ValueError(
                f"lengths: {min(options.lengths)} tokens leave no room around a {needle_tokens}-token needle"
            )

        examples = []
        for length in options.lengths:
            for depth in options.depths:
                for repeat in range(options.n_per_cell):
                    passkey = str(
                        random.Random(cell_seed(seed, length, f"{depth:g}", repeat)).randint(10**6, 10**7 - 1)
                    )
                    needle = options.needle.replace(PASSKEY, passkey)
                    context = build_needle_context(
                        tokenizer, length, needle, depth / 100, seed=cell_seed(seed, length, "haystack", repeat)
                    )
                    examples.append(
                        Example(
                            id=f"{TASK}_L{length}_d{depth:g}_r{repeat}_s{seed}",
                            task=TASK,
                            context=context,
                            question="\n" + options.question,
                            answers=[options.answer.replace(PASSKEY, passkey)],
                            max_new_tokens=options.max_new_tokens,
                            meta={"length": length, "depth": depth},
                        )
                    )
        return examples

    def score(self, task: str, predictions: list[str], examples: list[Example]) -> dict:
        """``string_match``: percentage of predictions containing their answer (see :func:`answer_found`), then the
        heatmap's breakdown: ``by_length`` ``{length: score}``, ``by_depth`` ``{depth: score}`` and ``by_cell``
        ``{length: {depth: score}}`` (keys as strings, for JSON)."""
        if task != TASK or any(e.task != TASK for e in examples):
            raise ValueError(f"task must be {TASK!r} (the only task of this benchmark), got {task!r}")
        if len(predictions) != len(examples) or not examples:
            raise ValueError(f"need one prediction per example, got {len(predictions)} for {len(examples)} examples")
        scored = [
            {"length": e.meta["length"], "depth": e.meta["depth"], "score": 100.0 * answer_found(p, e.answers[0])}
            for p, e in zip(predictions, examples)
        ]
        cells = needle_cells(scored)
        return {
            "string_match": cells.mean,
            "by_length": {str(n): _mean(scored, "length", n) for n in cells.lengths},
            "by_depth": {f"{d:g}": _mean(scored, "depth", d) for d in cells.depths},
            "by_cell": {
                str(n): {f"{d:g}": cells.means[i][j] for i, d in enumerate(cells.depths) if cells.counts[i][j]}
                for j, n in enumerate(cells.lengths)
            },
        }

    def plot(self, records: list[dict], out_dir) -> list:
        """The heatmap ``needle_heatmap.png`` under ``out_dir`` (mean score per cell); nothing without records."""
        scored = [
            {
                "length": r["meta"]["length"],
                "depth": r["meta"]["depth"],
                "score": 100.0 * answer_found(r["prediction"], r["answers"][0]),
            }
            for r in records
            if r.get("task") == TASK
        ]
        if not scored:
            return []
        path = Path(out_dir) / "needle_heatmap.png"
        return [plot_needle_heatmap(scored, path, title=f"Needle in a haystack: {Path(out_dir).name}")]


def _mean(scored: list[dict], key: str, value) -> float:
    """Mean score of the records whose ``key`` equals ``value`` (depths compared as floats)."""
    picked = [r["score"] for r in scored if float(r[key]) == float(value)]
    return sum(picked) / len(picked)
