"""`RulerBenchmark` (``ruler``): RULER tasks generated offline for the evaluated tokenizer, or read from a data set."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from kvpress_evaluation.benchmark import Benchmark, BenchmarkOptions, Example
from kvpress_evaluation.metrics.ruler import score_ruler

from .generate import TASKS, generate_ruler
from .niah import TASKS as NIAH_TASKS
from .qa import QA_TASKS

logger = logging.getLogger(__name__)

# Question, answer prefix and chat template come on top of a generated context of ``length`` tokens.
PROMPT_ALLOWANCE = 64
_PATH_LIKE = re.compile(r"^(\.{1,2}/|/|~)|\.(jsonl|json|parquet|csv)$")


class RulerOptions(BenchmarkOptions):
    """Options of :class:`RulerBenchmark`.

    Attributes:
        tasks: RULER task names (default: the eight needle tasks).
        lengths: token budgets of the contexts, e.g. ``[2048, 4096]``; one set of examples per length.
        n_examples: examples per task and length.
        qa_path: JSONL file of QA items for ``qa_1``/``qa_2`` (format: :func:`kvpress_evaluation.ruler.load_qa`);
            without it the QA tasks are skipped (logged).
        dataset: read examples from an existing RULER data set (a local path or a dataset name) instead of
            generating them; ``lengths`` then selects its lengths and ``n_examples`` caps each task and length.
    """

    tasks: list[str] = Field(default_factory=lambda: list(NIAH_TASKS))
    lengths: list[int] = Field(default_factory=lambda: [4096])
    n_examples: int = 20
    qa_path: str | None = None
    dataset: str | None = None

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if not value or unknown:
            raise ValueError(f"must be a non-empty list of RULER tasks ({', '.join(TASKS)}); unknown: {unknown}")
        if len(set(value)) != len(value):
            raise ValueError(f"tasks must be distinct, got {value}")
        return value

    @field_validator("lengths")
    @classmethod
    def _check_lengths(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list of distinct positive token counts, got {value}")
        return value

    @field_validator("n_examples")
    @classmethod
    def _check_n(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive int, got {value}")
        return value

    @field_validator("qa_path")
    @classmethod
    def _check_qa_path(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"{value!r} is not a file (a JSONL file of QA items)")
        return value

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str | None) -> str | None:
        # A name such as owner/name is looked up later; a path must exist now, before any model is loaded.
        if value is not None and _PATH_LIKE.search(value) and not Path(value).expanduser().exists():
            raise ValueError(f"{value!r}: no such file or directory")
        return value

    @model_validator(mode="after")
    def _check_qa(self) -> RulerOptions:
        if self.dataset is None and self.qa_path is None and all(t in QA_TASKS for t in self.tasks):
            raise ValueError(f"qa_path: the tasks {self.tasks} are QA tasks, which need qa_path (a JSONL file)")
        return self


class RulerBenchmark(Benchmark):
    """RULER's synthetic tasks: needles, variable tracking, common and frequent words, QA over supplied data.

    Example ids are ``task/length/index`` (generated) or ``task/position`` (read from a data set); scores are RULER's
    string match (0 to 100), per task, with one ``string_match@length`` entry per length as well.
    """

    name = "ruler"
    Options = RulerOptions
    task_names = TASKS

    def max_context_tokens(self) -> int | None:
        return max(self.options.lengths) + PROMPT_ALLOWANCE

    def examples(self, tokenizer, seed: int, max_context_tokens: int | None = None) -> list[Example]:
        opts = self.options
        if max_context_tokens is not None and max(opts.lengths) > max_context_tokens:
            logger.warning(
                "RULER lengths up to %d tokens exceed the context budget of %d tokens: contexts will be truncated",
                max(opts.lengths),
                max_context_tokens,
            )
        if opts.dataset is not None:
            return self._loaded_examples()
        examples = []
        for task in opts.tasks:
            if task in QA_TASKS and opts.qa_path is None:
                logger.warning("RULER task %s skipped: it needs qa_path (a JSONL file of QA items)", task)
                continue
            for length in opts.lengths:
                for row in generate_ruler(tokenizer, task, length, opts.n_examples, seed, opts.qa_path):
                    examples.append(_example(f"{task}/{length}/{row['index']}", row, length))
        return examples

    def _loaded_examples(self) -> list[Example]:
        from .dataset import load_ruler_dataset  # its reader dependencies load only when a data set is used

        opts = self.options
        examples = []
        for length in opts.lengths:  # one load per length: rows know their budget from the call, not a column
            seen: dict[str, int] = {}
            for row in load_ruler_dataset(opts.dataset, opts.tasks, [length]):
                if row["index"] >= opts.n_examples:
                    continue
                position = seen.get(row["task"], 0)
                seen[row["task"]] = position + 1
                examples.append(_example(f"{row['task']}/{length}/{position}", row, length))
        return examples

    def score(self, task: str, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        if len(predictions) != len(examples) or not examples:
            raise ValueError(
                f"predictions ({len(predictions)}) and examples ({len(examples)}) must be non-empty and match"
            )
        if any(e.task != task for e in examples):
            raise ValueError(f"every example must belong to task {task!r}")
        rows = [{"task": task, "prediction": p, "answers": e.answers} for p, e in zip(predictions, examples)]
        metrics = {"string_match": score_ruler(rows)[task]["string_match"]}
        lengths = sorted({e.meta["length"] for e in examples if e.meta.get("length") is not None})
        for length in lengths:
            subset = [r for r, e in zip(rows, examples) if e.meta.get("length") == length]
            metrics[f"string_match@{length}"] = score_ruler(subset)[task]["string_match"]
        return metrics


def _example(example_id: str, row: dict, length: int | None) -> Example:
    return Example(
        id=example_id,
        task=row["task"],
        context=row["context"],
        question=row["question"],
        answers=list(row["answers"]),
        answer_prefix=row["answer_prefix"],
        max_new_tokens=row["max_new_tokens"],
        meta={"length": length, "n_tokens": row.get("n_tokens"), "index": row["index"]},
    )
