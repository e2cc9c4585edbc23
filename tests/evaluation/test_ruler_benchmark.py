"""RulerBenchmark: options, examples equal generate_ruler's rows, QA tasks skipped without data, data sets, scoring."""

import json
import logging
import random

import pytest
from pydantic import ValidationError

from kvpress_evaluation.benchmark import Example
from kvpress_evaluation.metrics.ruler import string_match_all, string_match_part
from kvpress_evaluation.ruler.benchmark import PROMPT_ALLOWANCE, RulerBenchmark, RulerOptions
from kvpress_evaluation.ruler.generate import generate_ruler
from kvpress_evaluation.ruler.niah import TASKS as NIAH_TASKS


def words(text: str) -> list[str]:
    """A whitespace tokenizer: fast, and enough for generate_ruler's token counting."""
    return text.split()


def _qa_file(tmp_path, n=6):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": f"Who keeps lantern {i}?", "answers": [f"keeper {i}"], "documents": [f"Lantern {i} is kept by keeper {i}."]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_options_are_the_needle_tasks():
    opts = RulerOptions()
    assert opts.tasks == list(NIAH_TASKS) and len(opts.tasks) == 8
    assert RulerBenchmark(RulerOptions(lengths=[300, 900])).max_context_tokens() == 900 + PROMPT_ALLOWANCE


@pytest.mark.parametrize(
    "options, field",
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": ["niah_single_1", "nope"]}, "tasks"),
        ({"tasks": ["vt", "vt"]}, "tasks"),
        ({"lengths": [0]}, "lengths"),
        ({"lengths": [512, 512]}, "lengths"),
        ({"n_examples": 0}, "n_examples"),
        ({"qa_path": "/no/such.jsonl"}, "qa_path"),
        ({"tasks": ["qa_1"]}, "qa_path"),
        ({"dataset": "/no/such/ruler.jsonl"}, "dataset"),
        ({"lenghts": [512]}, "lenghts"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValidationError) as info:
        RulerOptions(**options)
    assert field in str(info.value)


def test_examples_are_generate_ruler_rows_per_task_and_length():
    opts = RulerOptions(tasks=["niah_single_1", "vt", "niah_multikey_3"], lengths=[300, 700], n_examples=2)
    examples = RulerBenchmark(opts).examples(words, seed=5)
    expected = []
    for task in opts.tasks:
        for length in opts.lengths:
            for row in generate_ruler(words, task, length, 2, seed=5):
                expected.append((f"{task}/{length}/{row['index']}", row, length))
    assert len(examples) == len(expected) == 12
    for example, (eid, row, length) in zip(examples, expected):
        assert example.id == eid and example.task == row["task"]
        assert (example.context, example.question, example.answer_prefix) == (
            row["context"], row["question"], row["answer_prefix"]
        )
        assert example.answers == row["answers"] and example.max_new_tokens == row["max_new_tokens"]
        assert example.meta == {"length": length, "n_tokens": row["n_tokens"], "index": row["index"]}
        assert len(words(example.context)) <= length
    # Ids are unique and stable across calls; another seed gives other contexts.
    assert len({e.id for e in examples}) == len(examples)
    assert RulerBenchmark(opts).examples(words, seed=5) == examples
    other = RulerBenchmark(opts).examples(words, seed=6)
    assert [e.id for e in other] == [e.id for e in examples] and other[0].context != examples[0].context


def test_qa_tasks_without_data_are_skipped_with_a_message(tmp_path, caplog):
    opts = RulerOptions(tasks=["qa_1", "niah_single_1"], lengths=[400], n_examples=2)
    with caplog.at_level(logging.WARNING):
        examples = RulerBenchmark(opts).examples(words, seed=0)
    assert {e.task for e in examples} == {"niah_single_1"}
    assert any("qa_1" in r.getMessage() and "qa_path" in r.getMessage() for r in caplog.records)
    qa = _qa_file(tmp_path)
    with_data = RulerBenchmark(RulerOptions(tasks=["qa_1"], lengths=[400], n_examples=2, qa_path=str(qa)))
    examples = with_data.examples(words, seed=0)
    expected = generate_ruler(words, "qa_1", 400, 2, seed=0, qa_path=qa)
    assert [e.context for e in examples] == [r["context"] for r in expected]


def test_examples_from_a_dataset_file(tmp_path):
    rows = []
    for task in ("niah_single_1", "vt"):
        for row in generate_ruler(words, task, 500, 3, seed=1):
            rows.append({"context": row["context"], "question": row["question"], "answer_prefix": row["answer_prefix"],
                         "answer": row["answers"], "task": task, "max_new_tokens": row["max_new_tokens"],
                         "length": 500})
    path = tmp_path / "ruler.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = RulerOptions(tasks=["vt", "niah_single_1"], lengths=[500], n_examples=2, dataset=str(path))
    examples = RulerBenchmark(opts).examples(words, seed=0)
    kept = [r for r in rows if r["task"] in opts.tasks]
    kept = [r for r in kept if sum(1 for q in kept[: kept.index(r)] if q["task"] == r["task"]) < 2]
    assert sorted((e.task, e.context) for e in examples) == sorted((r["task"], r["context"]) for r in kept)
    assert len({e.id for e in examples}) == 4 and all(e.meta["length"] == 500 for e in examples)
    for e in examples:
        source = next(r for r in rows if r["context"] == e.context)
        assert e.answers == source["answer"] and e.max_new_tokens == source["max_new_tokens"]


@pytest.mark.parametrize("task", ["niah_multikey_1", "qa_2"])
def test_score_is_rulers_string_match_per_task_and_length(task):
    rng = random.Random(0)
    examples, predictions = [], []
    for i in range(30):
        answers = [f"v{i}a", f"v{i}b", f"v{i}c"][: rng.randint(1, 3)]
        length = rng.choice([1024, 2048])
        examples.append(Example(f"{i}", task, "ctx", "q", answers, meta={"length": length}))
        found = [a.upper() if rng.random() < 0.5 else a for a in answers if rng.random() < 0.6]
        predictions.append(" \n" + " and ".join(found) + "\x01 ")
    metrics = RulerBenchmark(RulerOptions()).score(task, predictions, examples)
    metric = string_match_part if task.startswith("qa") else string_match_all

    def reference(idx):
        return round(100 * sum(metric(predictions[i].strip(), examples[i].answers) for i in idx) / len(idx), 2)

    assert metrics["string_match"] == reference(range(30))
    for length in (1024, 2048):
        idx = [i for i, e in enumerate(examples) if e.meta["length"] == length]
        assert metrics[f"string_match@{length}"] == reference(idx)
    assert next(iter(metrics)) == "string_match"
    with pytest.raises(ValueError, match="match"):
        RulerBenchmark(RulerOptions()).score(task, predictions[:-1], examples)
    with pytest.raises(ValueError, match="belong to task"):
        RulerBenchmark(RulerOptions()).score("vt", predictions, examples)
