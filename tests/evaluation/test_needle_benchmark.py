"""NeedleBenchmark: the grid's contexts (length, needle depth), ids, seeds, scoring, the heatmap hook, bad options."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from kvpress_evaluation.benchmark import Example
from kvpress_evaluation.needle import benchmark as needle_benchmark
from kvpress_evaluation.needle.benchmark import NeedleBenchmark, NeedleOptions, answer_found
from kvpress_evaluation.needle.heatmap import needle_cells, plot_needle_heatmap
from tests.fixtures_pipeline import smollm2_tokenizer

LENGTHS = [300, 800, 1500]
DEPTHS = [0, 25, 50, 90, 100]
CLASSIC = {
    "needle": "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
    "question": "What is the best thing to do in San Francisco?",
    "answer": "Dolores Park",
}


def n_tokens(text: str) -> int:
    return len(smollm2_tokenizer()(text, add_special_tokens=False).input_ids)


def grid(seed: int = 5, **options) -> list[Example]:
    options = {"lengths": LENGTHS, "depths": DEPTHS, "n_per_cell": 2, **options}
    return NeedleBenchmark(NeedleOptions(**options)).examples(smollm2_tokenizer(), seed)


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return grid()


def test_one_example_per_cell_and_repeat_in_grid_order(examples):
    cells = [(e.meta["length"], e.meta["depth"]) for e in examples]
    assert cells == [(n, d) for n in LENGTHS for d in DEPTHS for _ in range(2)]
    assert all(set(e.meta) == {"length", "depth"} and e.task == "needle" for e in examples)
    # The id encodes the cell and the repeat, and no two examples share one.
    assert len({e.id for e in examples}) == len(examples)
    for i, e in enumerate(examples):
        match = re.fullmatch(r"needle_L(\d+)_d([\d.]+)_r(\d+)_s5", e.id)
        assert match and int(match[1]) == e.meta["length"] and float(match[2]) == e.meta["depth"]
        assert int(match[3]) == i % 2


def test_contexts_have_the_requested_length_and_the_needle_at_its_depth(examples):
    options = NeedleOptions()
    for e in examples:
        length, depth = e.meta["length"], e.meta["depth"]
        (passkey,) = e.answers
        assert re.fullmatch(r"[1-9]\d{6}", passkey)
        needle = options.needle.replace("{passkey}", passkey)
        total = n_tokens(e.context)
        assert abs(total - length) <= 0.02 * length
        # The passkey appears once, inside the needle: the filler has no digits.
        assert e.context.count(needle) == 1 and e.context.count(passkey) == 1
        start = e.context.index(needle)
        before = n_tokens(e.context[:start]) if start else 0
        filler = total - n_tokens(needle)
        # Off from the requested share of the filler by at most one sentence (plus seam and rounding slack).
        sentences = re.split(r"(?<=\.) ", e.context.replace(needle, ""))
        longest = max(n_tokens(" " + s) for s in sentences if s)
        assert abs(before - depth / 100 * filler) <= longest + 3
        if depth == 0:
            assert e.context.startswith(needle)
        if depth == 100:
            assert e.context.endswith(needle)
        assert e.question == "\n" + options.question and e.answer_prefix == ""
        assert e.max_new_tokens == options.max_new_tokens


def test_same_seed_same_examples_other_seed_other_examples(examples):
    assert grid() == examples
    other = grid(seed=6)
    assert [(e.meta, e.id.replace("_s6", "_s5")) for e in other] == [(e.meta, e.id) for e in examples]
    assert all(a.context != b.context and a.answers != b.answers for a, b in zip(examples, other))
    assert len({e.answers[0] for e in examples}) == len(examples)  # a fresh passkey in every example


def test_filler_is_shared_across_depths_and_differs_across_repeats(examples):
    def sentences(e: Example) -> set[str]:
        text = e.context.replace(NeedleOptions().needle.replace("{passkey}", e.answers[0]), " ")
        return {s.strip() for s in re.split(r"(?<=\.)\s", text) if s.strip().endswith(".")}

    by_cell = {(e.meta["length"], e.meta["depth"], re.search(r"_r(\d+)_", e.id)[1]): e for e in examples}
    for length in LENGTHS:
        first, middle = sentences(by_cell[length, 0, "0"]), sentences(by_cell[length, 50, "0"])
        assert len(first & middle) >= 0.8 * len(first)
        repeat = sentences(by_cell[length, 0, "1"])
        assert len(first & repeat) < 0.3 * len(first)


def test_classic_fixed_needle(tmp_path):
    examples = grid(lengths=[400], depths=[30], n_per_cell=1, **CLASSIC)
    (e,) = examples
    assert e.context.count(CLASSIC["needle"]) == 1 and e.answers == ["Dolores Park"]
    assert abs(n_tokens(e.context) - 400) <= 8


def test_answer_found_matches_whole_words_and_numbers():
    cases = [
        ("The passkey is 4821937.", "4821937", True),
        ("4821937", "4821937", True),
        ("passkey:4821937,", "4821937", True),
        ("The passkey is 48219370.", "4821937", False),
        ("The passkey is 14821937.", "4821937", False),
        ("The passkey is 482 1937.", "4821937", False),
        ("I do not know.", "4821937", False),
        ("", "4821937", False),
        ("Go and sit in dolores\n  PARK on a sunny day", "Dolores Park", True),
        ("Dolores Parkway", "Dolores Park", False),
        ("It is in San Francisco.", "Dolores Park", False),
    ]
    for prediction, answer, found in cases:
        assert answer_found(prediction, answer) is found, (prediction, answer)


def test_score_is_the_percentage_of_hand_labelled_hits(examples):
    bench = NeedleBenchmark(NeedleOptions(lengths=LENGTHS, depths=DEPTHS, n_per_cell=2))
    templates = [
        ("The secret passkey is {}.", True),
        ("{}", True),
        ("It is {}0.", False),
        ("I cannot find it.", False),
        ("The passkey for the blue vault is\n{}", True),
    ]
    predictions, hits = [], []
    for i, e in enumerate(examples):
        template, hit = templates[i % len(templates)]
        predictions.append(template.format(e.answers[0]))
        hits.append(hit)
    scores = bench.score("needle", predictions, examples)
    assert scores["string_match"] == pytest.approx(100 * sum(hits) / len(hits))
    # The breakdown the heatmap shows, recomputed here by hand from the labels.
    def mean(pick):
        chosen = [100.0 * h for e, h in zip(examples, hits) if pick(e)]
        return pytest.approx(sum(chosen) / len(chosen))

    assert scores["by_length"] == {str(n): mean(lambda e, n=n: e.meta["length"] == n) for n in LENGTHS}
    assert scores["by_depth"] == {f"{d:g}": mean(lambda e, d=d: e.meta["depth"] == d) for d in DEPTHS}
    assert scores["by_cell"] == {
        str(n): {f"{d:g}": mean(lambda e, n=n, d=d: (e.meta["length"], e.meta["depth"]) == (n, d)) for d in DEPTHS}
        for n in LENGTHS
    }
    # Another example's passkey does not count.
    shifted = [examples[(i + 1) % len(examples)].answers[0] for i in range(len(examples))]
    zero = bench.score("needle", shifted, examples)
    assert zero["string_match"] == 0.0 and set(zero["by_length"].values()) == {0.0}
    with pytest.raises(ValueError, match="one prediction per example"):
        bench.score("needle", predictions[:-1], examples)
    with pytest.raises(ValueError, match="task must be 'needle'"):
        bench.score("ruler", predictions, examples)


def test_plot_writes_the_heatmap_of_the_scored_records(examples, tmp_path, monkeypatch):
    plotted = []

    def spy(records, path, title):
        plotted.append(list(records))
        return plot_needle_heatmap(records, path, title=title)

    monkeypatch.setattr(needle_benchmark, "plot_needle_heatmap", spy)
    bench = NeedleBenchmark(NeedleOptions(lengths=LENGTHS, depths=DEPTHS, n_per_cell=2))
    records = [e.to_dict() | {"prediction": e.answers[0] if i % 3 else "no idea"} for i, e in enumerate(examples)]
    (path,) = bench.plot(records, tmp_path / "snapkv_0.50")
    assert path == tmp_path / "snapkv_0.50" / "needle_heatmap.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The cells it plots hold the mean hit rate of the records of each (length, depth).
    cells = needle_cells(plotted[0])
    for i, depth in enumerate(DEPTHS):
        for j, length in enumerate(LENGTHS):
            hits = [
                r["prediction"] == r["answers"][0] for r in records if r["meta"] == {"length": length, "depth": depth}
            ]
            assert cells.means[i][j] == pytest.approx(100 * sum(hits) / len(hits))
    assert bench.plot([], tmp_path / "empty") == [] and not (tmp_path / "empty").exists()


def test_context_budget_and_max_context_tokens():
    bench = NeedleBenchmark(NeedleOptions(lengths=[500, 2000, 1000]))
    assert bench.max_context_tokens() == 2000
    with pytest.raises(ValueError, match="^lengths: 2000 tokens exceed the context budget of 1999"):
        bench.examples(smollm2_tokenizer(), 0, max_context_tokens=1999)
    short = NeedleBenchmark(NeedleOptions(lengths=[12, 500]))
    with pytest.raises(ValueError, match="^lengths: 12 tokens leave no room"):
        short.examples(smollm2_tokenizer(), 0)
    with pytest.raises(ValueError, match="^seed"):
        bench.examples(smollm2_tokenizer(), "0")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"lengths": [1000, -5]}, "lengths"),
        ({"lengths": [0]}, "lengths"),
        ({"lengths": []}, "lengths"),
        ({"lengths": [1000, 1000]}, "lengths"),
        ({"depths": [-1]}, "depths"),
        ({"depths": [50, 100.5]}, "depths"),
        ({"depths": [float("nan")]}, "depths"),
        ({"depths": [10, 10.0]}, "depths"),
        ({"n_per_cell": 0}, "n_per_cell"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"needle": "   "}, "needle"),
        ({"question": ""}, "question"),
        ({"answer": "1234"}, "answer"),
        ({"needle": "Bob lives in Paris.", "question": "Where does Bob live?"}, "answer"),
        ({"lenghts": [1000]}, "lenghts"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValidationError) as info:
        NeedleOptions(**options)
    assert isinstance(info.value, ValueError)
    # Field checks carry the field as location; checks across fields name it first in their message.
    (error,) = info.value.errors()
    assert error["loc"] == (field,) or (error["loc"] == () and error["msg"].startswith(f"Value error, {field} "))
