"""niah tasks: needles, answers, queries and templates checked against the task definitions."""

import re

import pytest

from kvpress_evaluation.ruler.generate import generate_ruler
from kvpress_evaluation.ruler.niah import TASKS, NiahTask
from kvpress_evaluation.ruler.words import ADJECTIVES, NOUNS
from tests.fixtures_pipeline import smollm2_tokenizer

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
PATTERN = {"numbers": r"[1-9][0-9]{6}", "uuids": UUID4, "words": r"[a-z]+-[a-z]+"}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _needles(context, type_v):
    """(key, value) of every needle line, parsed with a pattern written from the needle format."""
    return re.findall(rf"One of the special magic {type_v} for (\S+?) is: (\S+?)\.(?=\s|$)", context)


def _query_keys(question):
    match = re.fullmatch(
        r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\? ", question
    )
    assert match, question
    return re.split(r", and |, ", match.group(1))


@pytest.mark.parametrize("name", list(TASKS))
def test_needles_answers_and_query_follow_the_definition(name):
    task = TASKS[name]
    for row in generate_ruler(smollm2_tokenizer(), name, 1024, 3, seed=3):
        needles = _needles(row["context"], task.type_v)
        keys = _query_keys(row["question"])
        assert len(keys) == task.num_q and len(set(keys)) == task.num_q
        assert len(row["answers"]) == task.num_q * task.num_v
        for key in keys:
            assert re.fullmatch(PATTERN[task.type_k], key)
            if task.type_k == "words":
                adjective, noun = key.split("-")
                assert adjective in ADJECTIVES and noun in NOUNS
        # The gold strings are exactly the values of the queried keys, each planted once.
        gold = [value for key in keys for k, value in needles if k == key]
        assert sorted(gold) == sorted(row["answers"])
        for value in row["answers"]:
            assert re.fullmatch(PATTERN[task.type_v], value)
            assert row["context"].count(value) == 1
        real = [(k, v) for k, v in needles if v in row["answers"] or k in keys]
        if task.haystack == "needle":
            assert len(needles) > 3 * len(real)  # distractors fill the haystack
            # No distractor reuses a real key or value, so the question has one answer per value.
            assert sum(k in keys for k, _ in needles) == len(row["answers"])
        else:
            assert len(needles) == task.num_k * task.num_v
        if task.haystack == "noise":
            assert NOISE in row["context"]


def test_single_answer_prompt_is_rulers_singular_rewrite():
    row = generate_ruler(smollm2_tokenizer(), "niah_single_1", 512, 1, seed=0)[0]
    (key,) = _query_keys(row["question"])
    head = (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert row["context"].startswith(head) and row["context"].endswith("\n")
    assert row["question"] == f"What is the special magic number for {key} mentioned in the provided text? "
    assert row["answer_prefix"] == f"The special magic number for {key} mentioned in the provided text is"
    # The needle sentence keeps the plural, as in RULER.
    assert f"One of the special magic numbers for {key} is: {row['answers'][0]}." in row["context"]


@pytest.mark.parametrize("name", ["niah_multivalue", "niah_multiquery"])
def test_several_answers_keep_the_plural_template(name):
    row = generate_ruler(smollm2_tokenizer(), name, 512, 1, seed=1)[0]
    keys = _query_keys(row["question"])
    query = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
    assert row["context"].startswith("Some special magic numbers are hidden within the following text.")
    assert row["question"] == f"What are all the special magic numbers for {query} mentioned in the provided text? "
    assert row["answer_prefix"] == f"The special magic numbers for {query} mentioned in the provided text are"


def test_uuid_haystack_is_made_of_uuid_needles():
    row = generate_ruler(smollm2_tokenizer(), "niah_multikey_3", 2048, 1, seed=5)[0]
    haystack = row["context"].split("\n", 1)[1]
    lines = [line for line in haystack.split("\n") if line]
    needle_lines = [
        line for line in lines if re.fullmatch(rf"One of the special magic uuids for {UUID4} is: {UUID4}\.", line)
    ]
    # Only the filler of less than one needle line's tokens may be plain noise (at most one 5-sentence line here).
    assert len(needle_lines) >= len(lines) - 2


def test_essay_needles_spread_over_depths():
    rows = generate_ruler(smollm2_tokenizer(), "niah_single_2", 2048, 12, seed=0)
    positions = [row["context"].index("One of the special magic") / len(row["context"]) for row in rows]
    assert min(positions) < 0.4 and max(positions) > 0.6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"haystack": "hay"}, "haystack must be one of"),
        ({"type_k": "letters"}, "type_k must be one of"),
        ({"type_v": "dates"}, "type_v must be one of"),
        ({"num_k": 2, "num_q": 3}, "num_q <= num_k"),
        ({"num_v": 0}, "num_v >= 1"),
    ],
)
def test_bad_task_definition_is_refused(kwargs, message):
    base = {"name": "x", "haystack": "noise", "type_k": "words", "type_v": "numbers"}
    with pytest.raises(ValueError, match=message):
        NiahTask(**{**base, **kwargs})
