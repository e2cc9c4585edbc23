"""``LongBenchBenchmark``: LongBench v1 (or LongBench-E) from the official files, scored with the official metrics.

Each row becomes one :class:`~kvpress_evaluation.benchmark.Example`:

- The official prompt is cut right after the row's context (:meth:`LongBenchDataset.prompt_parts`): the
  instructions and the context are the compressed ``context``; what follows (the question and the closing
  instructions, e.g. ``"\\n\\nQuestion: ...\\nAnswer:"``) is the ``question``, read after compression. Joined, they
  are the official prompt, byte for byte; ``answer_prefix`` stays empty, as the official prompts end with their
  answer cue.
- A prompt over the token budget is truncated in the middle of its context (:func:`fit_prompt`), keeping the same
  first and last tokens as LongBench's own truncation of the whole prompt.
- ``max_new_tokens`` is the official generation length. ``meta`` keeps ``length``, ``all_classes``, ``_id``,
  ``language``, ``chat_template`` (False for the datasets LongBench runs without the chat template: trec, triviaqa,
  samsum, lsht, lcc, repobench-p), ``n_tokens`` (prompt tokens before truncation) and ``truncated``.

Scores are LongBench's: the best metric value over the gold answers, the first line only for the few-shot datasets,
averaged and scaled to 0-100 with 2 decimals; LongBench-E adds the means of the length buckets ``0-4k``, ``4-8k`` and
``8k+`` (of the row's ``length``: words, or characters for Chinese). LongBench stops samsum's generation at a
newline; here the first-line rule gives the same score.
"""

from __future__ import annotations

from pydantic import PositiveInt, ValidationInfo, field_validator, model_validator

from ..benchmark import Benchmark, BenchmarkOptions, Example
from ..metrics.longbench import best_score, first_line
from .data import check_local_files, load_rows
from .datasets import DATASETS, check_tasks, file_stem
from .truncation import fit_prompt

# LongBench-E's length buckets: (name, lowest length, first length past the bucket).
LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, None))


class LongBenchOptions(BenchmarkOptions):
    """Where the data is and which part of it to run.

    Attributes:
        data_dir: folder of the official JSONL files (the unpacked ``data.zip``: ``<name>.jsonl``, ``<name>_e.jsonl``).
        dataset_name: a dataset repository on a reachable hub (one configuration per file stem, split ``test``);
            used instead of ``data_dir``.
        tasks: the datasets to run; default every v1 dataset (English, Chinese, code), or every LongBench-E dataset.
        longbench_e: run LongBench-E (the ``_e`` files) and report its length buckets.
        max_length: the prompt budget in tokens (LongBench's ``model2maxlen``, e.g. 7500 for an 8k model); ``None``
            uses the runner's context budget, and no truncation happens when both are ``None``.
    """

    data_dir: str | None = None
    dataset_name: str | None = None
    longbench_e: bool = False
    tasks: list[str] | None = None
    max_length: PositiveInt | None = None

    @field_validator("data_dir", "dataset_name")
    @classmethod
    def _not_blank(cls, value, info: ValidationInfo):
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} must not be blank")
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value, info: ValidationInfo):
        # longbench_e is declared first, so it is validated (when valid) before the tasks that depend on it.
        check_tasks(value, info.data.get("longbench_e", False))
        return value

    @model_validator(mode="after")
    def _one_source(self):
        if (self.data_dir is None) == (self.dataset_name is None):
            raise ValueError(
                "give exactly one of data_dir (a folder of LongBench .jsonl files) and dataset_name (a hub dataset)"
            )
        return self


class LongBenchBenchmark(Benchmark):
    """LongBench v1 / LongBench-E. ``__init__`` checks that every task's file is in ``data_dir`` (reads none)."""

    name = "longbench"
    Options = LongBenchOptions
    task_names = tuple(DATASETS)  # LongBench-E (longbench_e=true) takes a subset of these

    def __init__(self, options: LongBenchOptions):
        if not isinstance(options, LongBenchOptions):
            raise ValueError(f"options must be LongBenchOptions, got {type(options).__name__}")  # noqa: TRY004
        super().__init__(options)
        self.tasks = check_tasks(options.tasks, options.longbench_e)
        if options.data_dir is not None:
            check_local_files(options.data_dir, self.tasks, options.longbench_e)

    def max_context_tokens(self) -> int | None:
        return self.options.max_length

    def examples(self, tokenizer, seed: int, max_context_tokens: int | None = None) -> list[Example]:
        """Every row of every task, in task order then file order (``seed`` is unused: the data is fixed).

        The prompt budget is ``max_length`` when set, else ``max_context_tokens``.
        """
        opts = self.options
        budget = opts.max_length if opts.max_length is not None else max_context_tokens
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"max_context_tokens must be a positive int or None, got {budget!r}")
        examples: list[Example] = []
        for task in self.tasks:
            stem = file_stem(task, opts.longbench_e)
            rows = load_rows(task, opts.longbench_e, data_dir=opts.data_dir, dataset_name=opts.dataset_name)
            ids = [f"{stem}/{row.get('_id') or index}" for index, row in enumerate(rows)]
            if len(set(ids)) != len(ids):  # resume keys on the ids
                raise ValueError(f"LongBench data {stem!r} repeats an _id; every row needs its own")
            examples.extend(self._example(task, row, id_, tokenizer, budget) for row, id_ in zip(rows, ids))
        return examples

    def _example(self, task: str, row: dict, id_: str, tokenizer, budget: int | None) -> Example:
        spec = DATASETS[task]
        full = spec.prompt_parts(row["context"], row["input"])
        n_tokens = sum(len(tokenizer.encode(part, add_special_tokens=False)) for part in full)
        context, question = full if budget is None else fit_prompt(*full, tokenizer, budget)
        if self.options.longbench_e and row.get("length") is None:
            raise ValueError(f"LongBench-E row {id_!r} has no 'length', which its length buckets need")
        return Example(
            id=id_,
            task=task,
            context=context,
            question=question,
            answers=list(row["answers"]),
            max_new_tokens=spec.max_new_tokens,
            meta={
                "length": row.get("length"),
                "all_classes": row.get("all_classes"),
                "_id": row.get("_id"),
                "language": spec.language,
                "chat_template": spec.chat_template,
                "n_tokens": n_tokens,
                "truncated": (context, question) != full,
            },
        )

    def score(self, task: str, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """``{"score": ...}`` (0-100), plus ``"0-4k"``, ``"4-8k"`` and ``"8k+"`` for LongBench-E (a bucket with no
        example is left out)."""
        if task not in self.tasks:
            raise ValueError(f"task must be one of this run's tasks {', '.join(self.tasks)}; got {task!r}")
        if len(predictions) != len(examples) or not examples:
            raise ValueError(
                f"predictions and examples must be non-empty and of equal length, got {len(predictions)} "
                f"and {len(examples)}"
            )
        spec = DATASETS[task]
        scores = []
        for prediction, example in zip(predictions, examples):
            if example.task != task:
                raise ValueError(f"examples must all be of task {task!r}, got one of {example.task!r}")
            text = first_line(prediction) if spec.first_line else prediction
            scores.append(best_score(spec.metric, text, example.answers, example.meta.get("all_classes")))
        result = {"score": _percent(scores)}
        if self.options.longbench_e:
            for bucket, low, high in LENGTH_BUCKETS:
                in_bucket = [
                    s
                    for s, e in zip(scores, examples)
                    if e.meta["length"] >= low and (high is None or e.meta["length"] < high)
                ]
                if in_bucket:
                    result[bucket] = _percent(in_bucket)
        return result


def _percent(scores: list[float]) -> float:
    """Mean of 0-1 scores on LongBench's scale: 0 to 100, 2 decimals."""
    return round(100 * sum(scores) / len(scores), 2)
