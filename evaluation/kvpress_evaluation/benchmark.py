"""What every benchmark hands the evaluation runner: examples to answer and a scorer for their predictions.

A benchmark is a small class registered under a name (``ruler``, ``longbench``, ``needle``). Its options are a pydantic
model (validated before any model is loaded); it turns them into :class:`Example` objects with a tokenizer, and scores
the predictions of one task at a time. The runner knows nothing of a benchmark's data formats or metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


@dataclass
class Example:
    """One prompt to answer.

    Attributes:
        id: unique within a run and stable across runs with the same options and seed (resume keys on it).
        task: the task or dataset the example belongs to; scores are reported per task.
        context: text that is prefilled and compressed.
        question: text appended after compression (may be empty).
        answers: reference answers (gold strings) handed to the task's metric.
        answer_prefix: text the answer starts with (appended after the question, before generation).
        max_new_tokens: generation length for this example.
        meta: JSON-serialisable details the scorer or the plots need (e.g. ``{"length": 4096, "depth": 0.5}``,
            LongBench's ``all_classes``).
    """

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    max_new_tokens: int = 128
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BenchmarkOptions(BaseModel):
    """Base of each benchmark's options: unknown fields are errors, values are checked on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Benchmark(ABC):
    """Base class. Subclasses set ``name`` and ``Options`` and implement :meth:`examples` and :meth:`score`.

    ``__init__`` must not read large data or load a model: it validates that inputs exist (paths, task names) so a
    bad configuration fails before the model loads.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BenchmarkOptions]]
    task_names: ClassVar[tuple[str, ...]] = ()  # the task names its ``tasks`` option accepts (shown by kvpress-eval)

    def __init__(self, options: BenchmarkOptions):
        self.options = options

    def max_context_tokens(self) -> int | None:
        """Largest context (tokens) this configuration asks for, or ``None`` when the benchmark truncates to fit."""
        return None

    @abstractmethod
    def examples(self, tokenizer, seed: int, max_context_tokens: int | None = None) -> list[Example]:
        """Every example of the run, in a deterministic order.

        ``max_context_tokens``: the run's context budget (the config's ``max_context_length``, else the model's
        window minus the generation length). Benchmarks that truncate (LongBench) cut contexts to it; generated
        benchmarks size contexts from their own options and were checked against it through
        :meth:`max_context_tokens`.
        """

    @abstractmethod
    def score(self, task: str, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Metrics (name -> value in [0, 100]) of ``predictions[i]`` answering ``examples[i]``, all of ``task``."""

    def plot(self, records: list[dict], out_dir) -> list:
        """Benchmark-specific figures (e.g. the needle heatmap) written under ``out_dir``; returns their paths.

        ``records``: the rows of one run's ``predictions.jsonl`` (``Example.to_dict()`` plus ``prediction``).
        """
        return []
