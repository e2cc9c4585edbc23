"""generate_ruler: determinism, gold strings in the context, token budget with the SmolLM2 tokenizer, bad input."""

import pytest

from kvpress_evaluation.ruler.generate import SYNTHETIC_TASKS, TASKS, generate_ruler
from tests.fixtures_pipeline import smollm2_tokenizer

SYNTHETIC = list(SYNTHETIC_TASKS)
MAX_NEW_TOKENS = {"vt": 30, "cwe": 120, "fwe": 50}


def test_task_list_is_rulers_thirteen():
    assert set(TASKS) == {
        "niah_single_1",
        "niah_single_2",
        "niah_single_3",
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
        "qa_1",
        "qa_2",
    }


@pytest.mark.parametrize("task", SYNTHETIC)
def test_same_seed_same_samples_other_seed_other_samples(task):
    tok = smollm2_tokenizer()
    first = generate_ruler(tok, task, 512, 3, seed=7)
    assert first == generate_ruler(tok, task, 512, 3, seed=7)
    other = generate_ruler(tok, task, 512, 3, seed=8)
    assert all(a["context"] != b["context"] for a, b in zip(first, other))
    # Samples of one set differ from each other, and sample i does not depend on how many are asked for.
    assert len({row["context"] for row in first}) == 3
    assert generate_ruler(tok, task, 512, 1, seed=7)[0] == first[0]


@pytest.mark.parametrize("target", [512, 2048])
@pytest.mark.parametrize("task", SYNTHETIC)
def test_rows_fill_the_budget_and_hold_their_answers(task, target):
    tok = smollm2_tokenizer()
    rows = generate_ruler(tok, task, target, 2, seed=target)
    for index, row in enumerate(rows):
        assert set(row) == {
            "context",
            "question",
            "answer_prefix",
            "answers",
            "task",
            "n_tokens",
            "max_new_tokens",
            "index",
        }
        assert row["task"] == task and row["index"] == index
        assert row["max_new_tokens"] == MAX_NEW_TOKENS.get(task, 128)
        n = len(tok.encode(row["context"], add_special_tokens=False))
        assert row["n_tokens"] == n
        assert 0.98 * target <= n <= target
        assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"])
        for answer in row["answers"]:
            assert answer in row["context"]
        assert row["question"].strip() and row["answer_prefix"].strip()
        assert row["answer_prefix"] == row["answer_prefix"].lstrip()


def test_callable_tokenizer_counts_with_it():
    def words(text):
        return text.split()

    for task in ("niah_single_1", "cwe"):
        for row in generate_ruler(words, task, 700, 2, seed=0):
            assert 0.98 * 700 <= len(row["context"].split()) == row["n_tokens"] <= 700


def test_unknown_task_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="task must be one of") as info:
        generate_ruler(smollm2_tokenizer(), "niah_single_9", 512, 1)
    for name in TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("target", [0, -5, 1.5, True])
def test_non_positive_or_non_int_target_is_refused(target):
    with pytest.raises(ValueError, match="target_tokens must be a positive int"):
        generate_ruler(smollm2_tokenizer(), "vt", target, 1)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_non_positive_example_count_is_refused(n):
    with pytest.raises(ValueError, match="n_examples must be a positive int"):
        generate_ruler(smollm2_tokenizer(), "vt", 512, n)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_budget_below_the_fixed_prompt_is_refused(task):
    with pytest.raises(ValueError, match=f"target_tokens=40 is too small for task '{task}'"):
        generate_ruler(smollm2_tokenizer(), task, 40, 1)


def test_unknown_tokenizer_type_is_refused():
    with pytest.raises(ValueError, match="tokenizer must have an encode method"):
        generate_ruler(object(), "vt", 512, 1)
