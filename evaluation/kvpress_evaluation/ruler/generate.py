"""``generate_ruler``: RULER samples sized to a token budget with a given tokenizer, deterministic in the seed."""

from __future__ import annotations

import hashlib
import random

from . import common_words, frequent_words, niah, variable_tracking
from .prompt import Prompt, Sampler
from .qa import QA_TASKS, QATask, load_qa
from .sizing import largest_fitting, token_counter

SYNTHETIC_TASKS = {**niah.TASKS, **variable_tracking.TASKS, **common_words.TASKS, **frequent_words.TASKS}
TASKS = tuple(SYNTHETIC_TASKS) + QA_TASKS


def sample_seed(seed: int, task: str, target_tokens: int, index: int) -> int:
    """A per-sample seed from ``(seed, task, target_tokens, index)``, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}|{task}|{target_tokens}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_ruler(
    tokenizer, task: str, target_tokens: int, n_examples: int, seed: int = 42, qa_path=None
) -> list[dict]:
    """``n_examples`` samples of the RULER ``task`` whose ``context`` has about ``target_tokens`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (counted with ``encode(..., add_special_tokens=False)``) or a callable
            ``str -> list`` of tokens.
        task: one of :data:`TASKS`.
        target_tokens: token budget of the ``context`` (instructions, haystack and, for vt and cwe, the one-shot
            example; the question, answer prefix and chat template come on top). The haystack size is the largest
            one whose context fits, so ``n_tokens <= target_tokens`` and the gap is below one haystack unit.
        n_examples: number of samples.
        seed: sample ``i`` depends only on ``(seed, task, target_tokens, i)``.
        qa_path: JSONL file of QA items, required for ``qa_1`` and ``qa_2`` (format: :func:`.qa.load_qa`).

    Returns:
        one dict per sample: ``context``, ``question``, ``answer_prefix``, ``answers`` (gold strings), ``task``,
        ``n_tokens`` (tokens of ``context``), ``max_new_tokens``, ``index``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples <= 0:
        raise ValueError(f"n_examples must be a positive int, got {n_examples!r}")
    spec = QATask(task, tuple(load_qa(qa_path))) if task in QA_TASKS else SYNTHETIC_TASKS[task]
    count = token_counter(tokenizer)

    rows = []
    for index in range(n_examples):
        sampler = spec.sampler(random.Random(sample_seed(seed, task, target_tokens, index)), target_tokens, index)
        prompt = _fill(sampler, count, target_tokens, task)
        rows.append(
            {
                "context": prompt.context,
                "question": prompt.question,
                "answer_prefix": prompt.answer_prefix,
                "answers": list(prompt.answers),
                "task": task,
                "n_tokens": count(prompt.context),
                "max_new_tokens": spec.max_new_tokens,
                "index": index,
            }
        )
    return rows


def _fill(sampler: Sampler, count, target_tokens: int, task: str) -> Prompt:
    """The sample with the largest haystack whose context fits ``target_tokens``, then the largest filler."""
    n = largest_fitting(lambda k: count(sampler.build(k, 0).context), target_tokens, sampler.low, sampler.high)
    if n is None:
        smallest = count(sampler.build(sampler.low, 0).context)
        raise ValueError(
            f"target_tokens={target_tokens} is too small for task {task!r}: its smallest context has {smallest} tokens"
        )
    m = largest_fitting(lambda k: count(sampler.build(n, k).context), target_tokens) if sampler.fine else 0
    return sampler.build(n, m)
