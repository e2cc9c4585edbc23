"""RULER's string-match metrics: case-insensitive substring tests of the gold strings in a prediction."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: str) -> str:
    """Strip, drop control characters (``\\x00``-``\\x1f``, newlines included), strip again."""
    return _CONTROL.sub("", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction (0 to 1) of ``answers`` found case-insensitively as substrings of ``prediction``."""
    if not answers:
        raise ValueError("answers must hold at least one gold string")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 when any of ``answers`` is a case-insensitive substring of ``prediction``, else 0.0."""
    if not answers:
        raise ValueError("answers must hold at least one gold string")
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


def metric_for(task: str):
    """``string_match_part`` for the qa tasks (name prefix ``qa``), ``string_match_all`` for every other task."""
    return string_match_part if task.split("_")[0] == "qa" else string_match_all


def score_ruler(rows: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per-task scores ``{task: {"string_match": score}}``, 0 to 100 rounded to 2 decimals.

    Each row needs ``task``, ``prediction`` and ``answers``; predictions are cleaned with :func:`clean_prediction`.
    """
    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        task = row["task"]
        per_task[task].append(metric_for(task)(clean_prediction(row["prediction"]), row["answers"]))
    if not per_task:
        raise ValueError("rows must hold at least one scored sample")
    return {task: {"string_match": round(100 * sum(s) / len(s), 2)} for task, s in per_task.items()}
