"""qa_1/qa_2 from a local JSONL file: document layout, gold documents, budget, and refusal of missing data."""

import json
import re

import pytest

from kvpress_evaluation.ruler.generate import generate_ruler
from kvpress_evaluation.ruler.qa import QATask, load_qa
from tests.fixtures_pipeline import smollm2_tokenizer

COLOURS = ["red", "green", "blue", "amber", "violet", "silver", "golden", "grey"]


def _write_items(path, n=8):
    """``n`` items written for this test: each asks the colour of a named boat, told in its one gold document."""
    rows = []
    for i in range(n):
        document = f"The boat number {i} sails on the lake every morning. Its sails are painted {COLOURS[i]}. " * 2
        rows.append(
            {
                "question": f"What colour are the sails of boat number {i}?",
                "answers": [COLOURS[i], COLOURS[i].upper()],
                "documents": [document.strip()],
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return rows


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_samples_hold_their_gold_document_among_distractors(tmp_path, task):
    path = tmp_path / "items.jsonl"
    items = _write_items(path)
    tok = smollm2_tokenizer()
    rows = generate_ruler(tok, task, 400, 10, seed=2, qa_path=path)
    for index, row in enumerate(rows):
        item = items[index % len(items)]  # sample i asks item i, cycling
        assert row["question"] == (
            "Answer the question based on the given documents. Only give me the answer and do not output any other "
            f"words.\n\nQuestion: {item['question']} "
        )
        assert row["answer_prefix"] == "Answer:" and row["answers"] == item["answers"] and row["max_new_tokens"] == 32
        body = row["context"].split("The following are given documents.\n\n", 1)[1]
        documents = re.split(r"(?:\n\n)?Document \d+:\n", body.rstrip("\n"))[1:]
        numbers = [int(n) for n in re.findall(r"Document (\d+):\n", body)]
        assert numbers == list(range(1, len(documents) + 1))
        assert item["documents"][0] in documents and len(documents) == len(set(documents)) >= 2
        assert set(documents) <= {d for it in items for d in it["documents"]}
        assert row["n_tokens"] == len(tok.encode(row["context"], add_special_tokens=False)) <= 400
        # One more distractor would not fit: the haystack is as large as the budget allows.
        one_doc = len(tok.encode("Document 9:\n" + item["documents"][0] + "\n\n", add_special_tokens=False))
        assert row["n_tokens"] > 400 - one_doc or len(documents) == len(items)


def test_load_reads_items(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = _write_items(path, 3)
    items = load_qa(str(path))
    assert [(i.question, list(i.answers), list(i.documents)) for i in items] == [
        (r["question"], r["answers"], r["documents"]) for r in rows
    ]


def test_missing_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qa_path is required"):
        generate_ruler(smollm2_tokenizer(), "qa_1", 512, 1)
    with pytest.raises(FileNotFoundError, match="qa_path"):
        generate_ruler(smollm2_tokenizer(), "qa_2", 512, 1, qa_path=tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "line",
    [
        {"question": "q", "answers": [], "documents": ["d"]},
        {"question": "q", "answers": ["a"]},
        {"question": 3, "answers": ["a"], "documents": ["d"]},
        {"question": "q", "answers": "a", "documents": ["d"]},
    ],
)
def test_malformed_rows_are_refused(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answers": ["a"], "documents": ["d"]}) + "\n" + json.dumps(line) + "\n"
    )
    with pytest.raises(ValueError, match="qa_path line 2"):
        load_qa(path)


def test_empty_file_and_bad_task_name_are_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no QA items"):
        load_qa(path)
    with pytest.raises(ValueError, match="name must be one of"):
        QATask("qa_3", ())
