"""vt: the answers are exactly the variables that resolve to the queried value, checked by an independent resolver."""

import random
import re

import pytest

from kvpress_evaluation.ruler.generate import generate_ruler
from kvpress_evaluation.ruler.variable_tracking import VariableTrackingTask
from tests.fixtures_pipeline import smollm2_tokenizer

HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _resolve(text):
    """{variable: int value} from the ``VAR X = ...`` lines of ``text``, following assignments in reading order."""
    values = {}
    for name, rhs in re.findall(r"^VAR ([A-Z]+) = (.+?) ?$", text, flags=re.MULTILINE):
        values[name] = int(rhs) if rhs.isdigit() else values[rhs.removeprefix("VAR ")]
    return values


@pytest.mark.parametrize("target", [512, 4096])
def test_answers_are_the_variables_holding_the_value(target):
    for row in generate_ruler(smollm2_tokenizer(), "vt", target, 3, seed=11):
        example, main = row["context"].split(HEADER)[1:]
        value = int(re.search(r"assigned the value (\d+) in the text above", row["question"]).group(1))
        assert 10000 <= value < 99999
        resolved = _resolve(main)
        assert sorted(n for n, v in resolved.items() if v == value) == sorted(row["answers"])
        assert len(row["answers"]) == 5 and all(re.fullmatch("[A-Z]{5}", a) for a in row["answers"])
        # The chain is written in assignment order: each name's statement comes after its source's.
        lines = main.split("\n")
        first = [next(i for i, line in enumerate(lines) if line.startswith(f"VAR {a} =")) for a in row["answers"]]
        assert first == sorted(first)
        assert row["answer_prefix"] == (
            "Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
            f"the value {value}, they are: "
        )
        # The one-shot example: 3-letter names, another value, its answer written out after its prefix.
        example_value = int(re.search(r"assigned the value (\d+), they are: ", example).group(1))
        assert example_value != value
        example_answers = example.rsplit("they are: ", 1)[1].split()
        assert len(example_answers) == 5 and all(re.fullmatch("[A-Z]{3}", a) for a in example_answers)
        example_resolved = _resolve(example)
        assert sorted(n for n, v in example_resolved.items() if v == example_value) == sorted(example_answers)


def test_more_chains_keep_each_chain_in_order():
    task = VariableTrackingTask(num_chains=3, num_hops=2)
    prompt = task.sampler(random.Random(0), 2048, 0).build(40, 0)
    main = prompt.context.split(HEADER)[2]
    resolved = _resolve(main)
    assert len(resolved) == 9 and len(set(resolved.values())) == 3
    value = int(re.search(r"value (\d+) in the text", prompt.question).group(1))
    assert sorted(n for n, v in resolved.items() if v == value) == sorted(prompt.answers)


@pytest.mark.parametrize("kwargs", [{"num_chains": 0}, {"num_hops": 0}])
def test_bad_chain_shape_is_refused(kwargs):
    with pytest.raises(ValueError, match="num_chains and num_hops must be >= 1"):
        VariableTrackingTask(**kwargs)
