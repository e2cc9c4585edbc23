"""RULER string-match metrics on hand-worked cases."""

import pytest

from kvpress_evaluation.metrics.ruler import (
    clean_prediction,
    metric_for,
    score_ruler,
    string_match_all,
    string_match_part,
)


def test_string_match_all_counts_each_gold_string():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert string_match_all("", ["x"]) == 0.0
    assert string_match_all("x", ["x", "x"]) == 1.0


def test_string_match_part_needs_any_gold_string():
    assert string_match_part("It was Paris, France.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("London", ["paris", "Lyon"]) == 0.0


def test_empty_gold_list_is_refused():
    for metric in (string_match_all, string_match_part):
        with pytest.raises(ValueError, match="answers must hold at least one"):
            metric("x", [])


def test_cleaning_drops_control_characters():
    assert clean_prediction("  12\n34\t \x00ab ") == "1234 ab"
    # Cleaning joins lines: a gold string split by a newline matches after it.
    assert string_match_all(clean_prediction("12\n34"), ["1234"]) == 1.0


def test_metric_choice_by_task():
    assert metric_for("qa_1") is string_match_part and metric_for("qa_2") is string_match_part
    for task in ("niah_single_1", "vt", "cwe", "fwe", "niah_multiquery"):
        assert metric_for(task) is string_match_all


def test_scores_per_task_times_100_rounded():
    rows = [
        {"task": "vt", "prediction": "A B C", "answers": ["a", "b", "c"]},  # 1
        {"task": "vt", "prediction": "A", "answers": ["a", "b", "c"]},  # 1/3
        {"task": "vt", "prediction": "none", "answers": ["a", "b", "c"]},  # 0
        {"task": "qa_1", "prediction": " Blue\n", "answers": ["blue", "navy"]},  # 1
        {"task": "qa_1", "prediction": "green", "answers": ["blue", "navy"]},  # 0
    ]
    assert score_ruler(rows) == {"vt": {"string_match": 44.44}, "qa_1": {"string_match": 50.0}}
    with pytest.raises(ValueError, match="rows must hold at least one"):
        score_ruler([])
