"""LongBenchBenchmark on small fake LongBench files: prompts, context/question split, truncation, scoring, errors."""

import json

import pytest

from kvpress_evaluation.benchmark import Benchmark, Example
from kvpress_evaluation.longbench.benchmark import LongBenchBenchmark, LongBenchOptions
from kvpress_evaluation.longbench.datasets import DATASETS, E_TASKS, TASKS, LongBenchDataset
from tests.fixtures_pipeline import random_text, smollm2_tokenizer

V1 = [
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
    "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
]  # fmt: skip
HOTPOT_HEAD = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n"
)
HOTPOT_TAIL = (
    "\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nQuestion: "
)
TREC_CLASSES = ["Description", "Entity", "Abbreviation", "Human", "Location", "Number"]


class CharTokenizer:
    """One token per character: a budget of k tokens is k characters."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


# Per dataset: (input, gold answers, all_classes, a right prediction, a wrong prediction), in the official format.
CASES = {
    "hotpotqa": ("Which river runs north?", ["the Amber river"], None, "Amber river", "the Velvet lake"),
    "multifieldqa_zh": ("哪条河向北流？", ["琥珀河"], None, "琥珀河", "天鹅湖"),
    "gov_report": ("", ["The agency reviewed the budget. It found gaps."], None, None, "Nothing here"),
    "trec": ("What city hosts the tower?\nType:", ["Location"], TREC_CLASSES, "Location", "Human"),
    "lsht": ("新闻：球队赢了比赛。\n类别：", ["体育"], ["体育", "财经", "科技"], "体育", "财经"),
    "passage_count": ("", ["5"], None, "5", "There are 3 unique ones"),
    "passage_retrieval_en": ("An abstract about rivers.", ["Paragraph 3"], None, "Paragraph 3", "Paragraph 7"),
    "passage_retrieval_zh": ("关于河流的摘要。", ["段落3"], None, "段落3", "段落4"),
    # The wrong code lines share no character with the gold one, so their similarity ratio is 0.
    "lcc": ("", ["    return a + b"], None, "    return a + b", "()"),
    "repobench-p": ("def add(a, b):\n", ["    return a + b"], None, "    return a + b", "{}"),
}


def fake_row(task: str, i: int, context: str | None = None, length: int = 1000) -> dict:
    input_, answers, classes, _, _ = CASES[task]
    return {
        "input": input_,
        "context": context if context is not None else f"Passage {i} of {task}: the river runs north.",
        "answers": answers,
        "length": length,
        "dataset": task,
        "language": DATASETS[task].language,
        "all_classes": classes,
        "_id": f"{task}-{i}",
    }


def write(folder, stem, rows):
    (folder / f"{stem}.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def make(tmp_path, tasks, n=2, longbench_e=False, **options):
    for task in tasks:
        write(tmp_path, f"{task}_e" if longbench_e else task, [fake_row(task, i) for i in range(n)])
    opts = LongBenchOptions(data_dir=str(tmp_path), tasks=list(tasks), longbench_e=longbench_e, **options)
    return LongBenchBenchmark(opts)


def test_dataset_table_is_longbench_v1():
    assert list(TASKS) == V1
    assert set(E_TASKS) == {
        "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
        "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    }  # fmt: skip
    lengths = {"narrativeqa": 128, "qasper": 128, "dureader": 128, "samsum": 128, "gov_report": 512, "qmsum": 512,
               "multi_news": 512, "vcsum": 512, "multifieldqa_en": 64, "multifieldqa_zh": 64, "trec": 64, "lsht": 64,
               "lcc": 64, "repobench-p": 64}  # fmt: skip
    for name, spec in DATASETS.items():
        assert spec.max_new_tokens == lengths.get(name, 32)
        assert spec.template.count("{context}") == 1
        assert spec.chat_template == (name not in {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
        assert spec.first_line == (name in {"trec", "triviaqa", "samsum", "lsht"})
    assert LongBenchBenchmark.name == "longbench" and issubclass(LongBenchBenchmark, Benchmark)


def test_examples_fill_the_official_prompt_split_after_the_context(tmp_path):
    bench = make(tmp_path, list(CASES))
    examples = bench.examples(CharTokenizer(), seed=0)
    assert [e.task for e in examples] == [t for t in CASES for _ in range(2)]
    assert len({e.id for e in examples}) == len(examples) and examples[0].id == "hotpotqa/hotpotqa-0"
    for e in examples:
        row = fake_row(e.task, int(e.id.rsplit("-", 1)[1]))
        spec = DATASETS[e.task]
        # Joined, the parts are the official prompt; the cut is right after the row's context.
        assert e.context + e.question == spec.template.format(context=row["context"], input=row["input"])
        assert e.context.endswith(row["context"])
        assert e.answer_prefix == "" and e.answers == row["answers"]
        assert e.max_new_tokens == spec.max_new_tokens
        assert e.meta["all_classes"] == row["all_classes"] and e.meta["length"] == row["length"]
        assert e.meta["chat_template"] == spec.chat_template and e.meta["truncated"] is False
        assert e.meta["n_tokens"] == len(e.context + e.question)
    hotpot = examples[0]
    assert hotpot.context == HOTPOT_HEAD + "Passage 0 of hotpotqa: the river runs north."
    assert hotpot.question == HOTPOT_TAIL + "Which river runs north?\nAnswer:"
    gov = next(e for e in examples if e.task == "gov_report")
    assert gov.question == "\n\nNow, write a one-page summary of the report.\n\nSummary:"
    lcc = next(e for e in examples if e.task == "lcc")
    assert lcc.context.startswith("Please complete the code given below. \n") and lcc.question == "Next line of code:\n"
    repo = next(e for e in examples if e.task == "repobench-p")
    assert repo.question == "def add(a, b):\nNext line of code:\n"
    json.dumps([e.to_dict() for e in examples])  # JSON-serialisable for predictions.jsonl


def test_question_before_context_goes_whole_into_the_context():
    spec = LongBenchDataset("custom", "Question: {input}\n\nText: {context}\n\nAnswer:", 8, "qa_f1", "en")
    assert spec.prompt_parts("CTX", "Q?") == ("Question: Q?\n\nText: CTX\n\nAnswer:", "")


def official(prompt: str, budget: int) -> str:
    head = budget // 2
    return prompt if len(prompt) <= budget else prompt[:head] + prompt[len(prompt) - (budget - head) :]


def test_truncation_budget_max_length_then_runner_budget(tmp_path):
    long_context = "".join(f"<{i:04d}>" for i in range(200))  # 1200 characters
    write(tmp_path, "hotpotqa", [fake_row("hotpotqa", 0, long_context), fake_row("hotpotqa", 1)])
    full = DATASETS["hotpotqa"].prompt(long_context, CASES["hotpotqa"][0])

    def first(max_length, runner_budget):
        opts = LongBenchOptions(data_dir=str(tmp_path), tasks=["hotpotqa"], max_length=max_length)
        return LongBenchBenchmark(opts).examples(CharTokenizer(), 0, max_context_tokens=runner_budget)

    for max_length, runner_budget, expected in [(500, None, 500), (500, 9000, 500), (None, 700, 700)]:
        examples = first(max_length, runner_budget)
        e = examples[0]
        # The same text as LongBench's truncation of the whole prompt, the question untouched.
        assert e.context + e.question == official(full, expected)
        assert e.question == HOTPOT_TAIL + "Which river runs north?\nAnswer:"
        assert e.meta["truncated"] is True and e.meta["n_tokens"] == len(full)
        assert examples[1].meta["truncated"] is False  # the short row fits
    untouched = first(None, None)[0]
    assert untouched.context + untouched.question == full and untouched.meta["truncated"] is False
    assert LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), max_length=500, tasks=["hotpotqa"])) \
        .max_context_tokens() == 500  # fmt: skip


def test_truncation_with_smollm2_tokenizer(tmp_path):
    tok = smollm2_tokenizer()
    write(tmp_path, "qmsum", [{**fake_row("hotpotqa", 0, random_text(3000, seed=5)), "input": "What was decided?"}])
    bench = LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), tasks=["qmsum"], max_length=300))
    e = bench.examples(tok, seed=0)[0]
    n = len(tok.encode(e.context, add_special_tokens=False)) + len(tok.encode(e.question, add_special_tokens=False))
    assert 298 <= n <= 302 and e.meta["n_tokens"] > 3000
    assert e.question.endswith("Query: What was decided?\nAnswer:")
    assert e.context.startswith("You are given a meeting transcript")


def predictions(task, right):
    return [CASES[task][3] if r else CASES[task][4] for r in right]


@pytest.mark.parametrize("task", list(CASES))
def test_perfect_and_wrong_predictions(tmp_path, task):
    bench = make(tmp_path, [task])
    examples = bench.examples(CharTokenizer(), 0)
    perfect = [e.answers[0] for e in examples]
    assert bench.score(task, perfect, examples) == {"score": 100.0}
    if CASES[task][3] is not None:
        assert bench.score(task, predictions(task, [True, True]), examples) == {"score": 100.0}
    assert bench.score(task, predictions(task, [False, False]), examples) == {"score": 0.0}


def test_partial_scores_first_line_rule_and_best_answer(tmp_path):
    bench = make(tmp_path, ["hotpotqa", "trec"])
    examples = bench.examples(CharTokenizer(), 0)
    hotpot = [e for e in examples if e.task == "hotpotqa"]
    trec = [e for e in examples if e.task == "trec"]
    assert bench.score("hotpotqa", predictions("hotpotqa", [True, False]), hotpot) == {"score": 50.0}
    # hotpotqa scores the whole text: [amber, river, velvet, lake] vs [amber, river]: P = 2/4, R = 1 -> F1 = 2/3.
    assert bench.score("hotpotqa", ["Amber river\nVelvet lake"] * 2, hotpot) == {"score": 66.67}
    # trec keeps the first line only: "Location" (then the model's next example, which names another class).
    assert bench.score("trec", ["\nLocation\nQuestion: Who?\nType: Human"] * 2, trec) == {"score": 100.0}
    # Without the cut, two classes would be named: 1/2.
    assert bench.score("trec", ["Location, Human"] * 2, trec) == {"score": 50.0}
    two_answers = [Example(e.id, e.task, e.context, e.question, ["Velvet lake", "Amber river"]) for e in hotpot]
    assert bench.score("hotpotqa", ["Amber river"] * 2, two_answers) == {"score": 100.0}


def test_longbench_e_length_buckets(tmp_path):
    lengths = [100, 3999, 4000, 7999, 8000]
    write(tmp_path, "passage_count_e", [fake_row("passage_count", i, length=n) for i, n in enumerate(lengths)])
    bench = LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), tasks=["passage_count"], longbench_e=True))
    examples = bench.examples(CharTokenizer(), 0)
    assert [e.id for e in examples] == [f"passage_count_e/passage_count-{i}" for i in range(5)]
    right = [True, False, True, True, False]
    # 0-4k: lengths 100 (right), 3999 (wrong) -> 50; 4-8k: 4000, 7999 (both right) -> 100; 8k+: 8000 (wrong) -> 0.
    assert bench.score("passage_count", predictions("passage_count", right), examples) == {
        "score": 60.0,
        "0-4k": 50.0,
        "4-8k": 100.0,
        "8k+": 0.0,
    }
    # A bucket without examples is left out.
    assert bench.score("passage_count", predictions("passage_count", right[:2]), examples[:2]) == {
        "score": 50.0,
        "0-4k": 50.0,
    }


def test_default_tasks_and_options_round_trip(tmp_path):
    for task in V1:
        write(tmp_path, task, [fake_row("hotpotqa", 0)])
    for task in E_TASKS:
        write(tmp_path, f"{task}_e", [fake_row("hotpotqa", 0)])
    assert LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path))).tasks == tuple(V1)
    assert LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), longbench_e=True)).tasks == E_TASKS
    opts = LongBenchOptions(data_dir=str(tmp_path), tasks=["trec", "lcc"], max_length=7500)
    assert LongBenchOptions(**opts.model_dump()) == opts
    assert LongBenchOptions.model_validate(json.loads(opts.model_dump_json())) == opts


def test_missing_data_fails_in_init_naming_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir .* is not a directory"):
        LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path / "nowhere"), tasks=["hotpotqa"]))
    write(tmp_path, "hotpotqa", [fake_row("hotpotqa", 0)])
    with pytest.raises(ValueError, match=r"data_dir .* lacks trec\.jsonl"):
        LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), tasks=["hotpotqa", "trec"]))
    with pytest.raises(ValueError, match=r"lacks hotpotqa_e\.jsonl"):
        LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), tasks=["hotpotqa"], longbench_e=True))


@pytest.mark.parametrize(
    "options,field,message",
    [
        ({"data_dir": "d", "tasks": ["hotpot"]}, "tasks", "unknown: hotpot"),
        ({"data_dir": "d", "tasks": ["narrativeqa"], "longbench_e": True}, "tasks", "LongBench-E datasets from"),
        ({"data_dir": "d", "tasks": ["trec", "trec"]}, "tasks", "distinct"),
        ({"data_dir": "d", "tasks": []}, "tasks", "distinct"),
        ({"data_dir": "d", "max_length": 0}, "max_length", "greater than 0"),
        ({"data_dir": "d", "dataset_name": "owner/LongBench"}, "", "exactly one of data_dir"),
        ({}, "", "exactly one of data_dir"),
        ({"data_dir": " "}, "data_dir", "must not be blank"),
        ({"data_dir": "d", "n_samples": 3}, "n_samples", "Extra inputs are not permitted"),
    ],
)
def test_bad_options_name_the_field(options, field, message):
    with pytest.raises(ValueError, match=message) as info:
        LongBenchOptions(**options)
    assert field in str(info.value)


def test_bad_data_and_score_arguments(tmp_path):
    bench = make(tmp_path, ["hotpotqa"])
    examples = bench.examples(CharTokenizer(), 0)
    with pytest.raises(ValueError, match="task must be one of this run's tasks hotpotqa"):
        bench.score("trec", ["x", "y"], examples)
    with pytest.raises(ValueError, match="equal length"):
        bench.score("hotpotqa", ["x"], examples)
    with pytest.raises(ValueError, match="max_context_tokens must be a positive int"):
        bench.examples(CharTokenizer(), 0, max_context_tokens=0)
    write(tmp_path, "hotpotqa", [fake_row("hotpotqa", 0), fake_row("hotpotqa", 0)])
    with pytest.raises(ValueError, match="repeats an _id"):
        bench.examples(CharTokenizer(), 0)
    write(tmp_path, "hotpotqa_e", [{**fake_row("hotpotqa", 0), "length": None}])
    bench_e = LongBenchBenchmark(LongBenchOptions(data_dir=str(tmp_path), tasks=["hotpotqa"], longbench_e=True))
    with pytest.raises(ValueError, match="no 'length'"):
        bench_e.examples(CharTokenizer(), 0)
