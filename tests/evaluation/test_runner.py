"""The evaluation runner on a tiny random model: predictions equal direct pipeline calls, output files, resume after
an interruption (nothing lost or duplicated), data-parallel shards merged, batches, subsets, checks before loading."""

import csv
import itertools
import json
import random

import pytest
import yaml

from kvpress_evaluation import runner
from kvpress_evaluation.benchmark import Benchmark, BenchmarkOptions, Example
from kvpress_evaluation.config import parse_config
from kvpress_evaluation.registry import build_press
from tests.fixtures_pipeline import random_text, smollm2_tokenizer, text_model, text_pipeline


class WordsBenchmark(Benchmark):
    """Short random texts in two tasks; answers are words of the context. Scores: hit rate, then mean length."""

    name = "words"

    class Options(BenchmarkOptions):
        n: int = 7

    def examples(self, tokenizer, seed, max_context_tokens=None):
        out = []
        for i in range(self.options.n):
            context = random_text(30 + 7 * i, seed=1000 * seed + i)
            out.append(
                Example(
                    id=f"ex{i}",
                    task=f"task{i % 2}",
                    context=context,
                    question=" Which word comes first?",
                    answers=[context.split()[0].lower()],
                    answer_prefix="Answer:" if i % 3 else "",
                    max_new_tokens=3 + i % 2,
                    meta={"i": i},
                )
            )
        return out

    def score(self, task, predictions, examples):
        hits = [any(a in p.lower() for a in e.answers) for p, e in zip(predictions, examples)]
        return {"hit": 100 * sum(hits) / len(hits), "chars": sum(map(len, predictions)) / len(predictions)}


def _config(tmp_path, **fields):
    base = {"presses": ["none", "knorm"], "compression_ratios": [0.5], "output_dir": str(tmp_path), "plots": False}
    return parse_config({**base, **fields})


def _evaluate(config, bench=None, env=None, on_record=None):
    return runner.evaluate(
        config,
        model=text_model("llama"),
        tokenizer=smollm2_tokenizer(),
        benchmark=bench or WordsBenchmark(WordsBenchmark.Options()),
        env=env or {},
        on_record=on_record,
    )


def _predictions(run_dir):
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def _reference_answers(examples, press, max_new_tokens=None):
    pipe = text_pipeline("llama")
    return [
        pipe(
            e.context,
            question=e.question,
            answer_prefix=e.answer_prefix,
            press=press,
            max_new_tokens=max_new_tokens or e.max_new_tokens,
        )["answer"]
        for e in examples
    ]


def test_predictions_metrics_and_files_match_direct_pipeline_calls(tmp_path):
    config = _config(tmp_path)
    bench = WordsBenchmark(WordsBenchmark.Options())
    rows = _evaluate(config, bench)
    examples = bench.examples(None, config.seed)
    assert [r["run"] for r in rows] == ["none", "knorm_0.50"]
    for run in config.runs():
        run_dir = tmp_path / run.name
        records = _predictions(run_dir)
        assert [r["id"] for r in records] == [e.id for e in examples]
        expected = _reference_answers(examples, build_press(run.press))
        assert [r["prediction"] for r in records] == expected
        for record, example in zip(records, examples):
            assert {k: record[k] for k in example.to_dict()} == example.to_dict()
            assert record["run"] == run.name and record["press"] == run.label
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for task in ("task0", "task1"):
            idx = [i for i, e in enumerate(examples) if e.task == task]
            direct = bench.score(task, [expected[i] for i in idx], [examples[i] for i in idx])
            assert metrics["tasks"][task] == {k: round(v, 2) for k, v in direct.items()}  # 2 decimals throughout
        headline = [metrics["tasks"][t]["hit"] for t in ("task0", "task1")]
        assert metrics["average"] == pytest.approx(sum(headline) / 2, abs=0.005)
        assert metrics["compression_ratio"] == run.ratio and metrics["n_examples"] == len(examples)
        # The bytes the compressed contexts held, measured from each example's cache.
        assert all(r["kv_bytes"] <= r["kv_bytes_uncompressed"] for r in records)
        assert metrics["kv_memory"] == round(
            sum(r["kv_bytes"] for r in records) / sum(r["kv_bytes_uncompressed"] for r in records), 4
        )
        assert metrics["kv_memory"] == pytest.approx(1.0 if run.label == "none" else 0.5, abs=0.02)
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert parse_config(resolved) == config.for_run(run)
        meta = json.loads((run_dir / "metadata.json").read_text())
        assert {"python", "torch", "transformers", "kvpress", "git_commit", "device", "start_time", "end_time"} <= set(
            meta
        )
        assert meta["start_time"] <= meta["end_time"] and meta["n_predictions"] == len(examples)
    # The summary holds each run's headline scores (the first metric of each task) and their average.
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["none", "knorm_0.50"]
    for row, line in zip(rows, table):
        metrics = json.loads((tmp_path / row["run"] / "metrics.json").read_text())
        assert float(line["task0"]) == pytest.approx(metrics["tasks"]["task0"]["hit"])
        assert float(line["average"]) == pytest.approx(metrics["average"])
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].split("|")[1:-1] == [
        " run ",
        " press ",
        " ratio ",
        " KV held ",
        " n ",
        " task0 ",
        " task1 ",
        " average ",
    ]
    assert len(md) == 2 + len(rows)
    for line, row in zip(md[2:], rows):  # one rounding: every score cell with 2 decimals
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[5:] == [f"{row[k]:.2f}" for k in ("task0", "task1", "average")]
        assert cells[3] == f"{row['kv_memory']:.0%}"


def test_resume_after_interrupt_loses_and_duplicates_nothing(tmp_path):
    full = _config(tmp_path / "full", presses=["knorm"])
    _evaluate(full)
    reference = _predictions(tmp_path / "full" / "knorm_0.50")

    config = _config(tmp_path / "cut", presses=["knorm"])
    seen = []

    def stop_after_three(record):
        seen.append(record["id"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _evaluate(config, on_record=stop_after_three)
    run_dir = tmp_path / "cut" / "knorm_0.50"
    assert not (run_dir / "metrics.json").exists()
    assert [json.loads(x)["id"] for x in (run_dir / "predictions.jsonl").read_text().splitlines()] == seen
    # A kill in the middle of a write leaves a partial last line.
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write('{"id": "ex3", "predic')

    resumed = []
    _evaluate(config, on_record=lambda r: resumed.append(r["id"]))
    records = _predictions(run_dir)
    assert resumed == [r["id"] for r in reference[3:]]  # only the examples not yet answered
    assert [r["id"] for r in records] == [r["id"] for r in reference]
    assert [r["prediction"] for r in records] == [r["prediction"] for r in reference]
    assert (
        json.loads((run_dir / "metrics.json").read_text())["tasks"]
        == json.loads((tmp_path / "full" / "knorm_0.50" / "metrics.json").read_text())["tasks"]
    )

    again = []  # a finished run is not answered again
    _evaluate(config, on_record=lambda r: again.append(r["id"]))
    assert again == [] and _predictions(run_dir) == records


def test_data_parallel_shards_merge_to_the_single_process_result(tmp_path):
    single = _config(tmp_path / "single", presses=["knorm"])
    _evaluate(single)
    reference = _predictions(tmp_path / "single" / "knorm_0.50")
    examples = WordsBenchmark(WordsBenchmark.Options()).examples(None, single.seed)

    config = _config(tmp_path / "dp", presses=["knorm"])
    run_dir = tmp_path / "dp" / "knorm_0.50"
    world = 3
    for rank in range(world):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        result = _evaluate(config, env=env)
        shard = runner.read_records(run_dir / f"predictions.rank{rank}-of-{world}.jsonl")
        assert [r["id"] for r in shard] == [e.id for e in examples[rank::world]]
        if rank < world - 1:  # scores wait for every shard
            assert result is None and not (run_dir / "metrics.json").exists()
    assert result is not None
    merged = _predictions(run_dir)
    assert [(r["id"], r["prediction"]) for r in merged] == [(r["id"], r["prediction"]) for r in reference]
    assert (tmp_path / "dp" / "summary.csv").is_file()


def test_batched_contexts_answer_like_single_ones(tmp_path):
    single = _config(tmp_path / "one", presses=["knorm"], max_new_tokens=4)
    _evaluate(single)
    batched = _config(tmp_path / "three", presses=["knorm"], max_new_tokens=4, batch_size=3)
    _evaluate(batched)
    one = _predictions(tmp_path / "one" / "knorm_0.50")
    three = _predictions(tmp_path / "three" / "knorm_0.50")
    assert [r["prediction"] for r in three] == [r["prediction"] for r in one]


def test_chunked_prefill_runs_and_is_part_of_the_configuration(tmp_path):
    """Without a press a chunked prefill answers like one forward; with one the run completes, and a resumed run may
    not change the chunk size (it changes the answers)."""
    _evaluate(_config(tmp_path / "one", max_new_tokens=4))
    _evaluate(_config(tmp_path / "chunked", max_new_tokens=4, prefill_chunk_size=8))
    assert [r["prediction"] for r in _predictions(tmp_path / "chunked" / "none")] == [
        r["prediction"] for r in _predictions(tmp_path / "one" / "none")
    ]
    _evaluate(_config(tmp_path / "knorm", presses=["knorm"], max_new_tokens=3, prefill_chunk_size=8))
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        _evaluate(_config(tmp_path / "knorm", presses=["knorm"], max_new_tokens=3, prefill_chunk_size=16))


def test_sparse_prefill_runs_and_is_part_of_the_configuration(tmp_path):
    """A pattern file whose heads read every causal block answers like a dense prefill; a resumed run may not drop it."""
    from kvpress.sparse_prefill import HeadPattern, SparsePrefillConfig

    text = text_model("llama").config.get_text_config(decoder=True)
    path = tmp_path / "patterns.json"
    SparsePrefillConfig.uniform(text.num_hidden_layers, text.num_attention_heads,
                                HeadPattern(kind="a_shape", sink_blocks=0, local_blocks=1000), block_size=16,
                                min_tokens=16).save(path)  # fmt: skip
    _evaluate(_config(tmp_path / "dense", presses=["knorm"], max_new_tokens=4))
    _evaluate(_config(tmp_path / "sparse", presses=["knorm"], max_new_tokens=4, sparse_prefill=str(path)))
    assert [r["prediction"] for r in _predictions(tmp_path / "sparse" / "knorm_0.50")] == [
        r["prediction"] for r in _predictions(tmp_path / "dense" / "knorm_0.50")
    ]
    with pytest.raises(ValueError, match="sparse_prefill"):
        _evaluate(_config(tmp_path / "sparse", presses=["knorm"], max_new_tokens=4))


def test_batches_group_consecutive_examples_with_equal_prefix_and_length():
    rng = random.Random(0)
    examples = [
        Example(f"e{i}", "t", "c", "q", ["a"], answer_prefix=rng.choice(["", "A:"]), max_new_tokens=rng.choice([2, 3]))
        for i in range(40)
    ]
    for size in (1, 2, 5):
        for override in (None, 7):
            batches = list(runner._batches(examples, size, override))
            assert [e for b in batches for e in b] == examples
            for batch in batches:
                assert 1 <= len(batch) <= size
                assert len({(e.answer_prefix, override or e.max_new_tokens) for e in batch}) == 1
            # A batch ends early only where the next example has another prefix or length.
            for a, b in itertools.pairwise(batches):
                if len(a) < size:
                    key = (a[0].answer_prefix, override or a[0].max_new_tokens)
                    assert (b[0].answer_prefix, override or b[0].max_new_tokens) != key


@pytest.mark.parametrize("fraction, n_examples", [(0.5, None), (0.2, None), (None, 3), (None, 100), (1.0, None)])
def test_example_subsets_are_seeded_and_keep_the_order(tmp_path, fraction, n_examples):
    examples = WordsBenchmark(WordsBenchmark.Options(n=11)).examples(None, 0)
    config = _config(tmp_path, fraction=fraction, n_examples=n_examples, seed=3)
    chosen = runner.select_examples(examples, config)
    k = max(1, round(fraction * 11)) if fraction is not None else min(n_examples, 11)
    assert len(chosen) == k
    positions = [examples.index(e) for e in chosen]
    assert positions == sorted(positions)
    assert chosen == runner.select_examples(examples, config)
    other = runner.select_examples(examples, _config(tmp_path, fraction=fraction, n_examples=n_examples, seed=4))
    assert len(other) == k
    duplicate = [*examples, examples[0]]
    with pytest.raises(ValueError, match="duplicate example ids"):
        runner.select_examples(duplicate, config)


def test_rerun_with_another_configuration_is_refused(tmp_path):
    _evaluate(_config(tmp_path, presses=["knorm"], max_new_tokens=3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        _evaluate(_config(tmp_path, presses=["knorm"], max_new_tokens=4))
    # Fields that do not change the answers may change between sessions.
    _evaluate(_config(tmp_path, presses=["knorm"], max_new_tokens=3, batch_size=2))


def test_context_longer_than_the_model_is_refused_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)
    config = parse_config(
        {"benchmark_options": {"tasks": ["niah_single_1"], "lengths": [9000]}, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="8192 positions"):
        runner.evaluate(config, env={})
    config = parse_config({"max_context_length": 8190, "max_new_tokens": 8, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="max_context_length"):
        runner.evaluate(config, env={})
    # A budget that fits passes the check: the context budget is the window minus the generation.
    fits = parse_config({"benchmark_options": {"lengths": [4096]}, "max_new_tokens": 100, "output_dir": "x"})
    bench = runner.registry.build_benchmark(fits.benchmark, fits.benchmark_options)
    assert runner.check_context(fits, bench, 8192) == 8192 - 100
    assert not list(tmp_path.iterdir())


def test_shard_from_environment():
    assert runner.Shard.from_env({}) == runner.Shard(0, 1, 0)
    shard = runner.Shard.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    items = list(range(10))
    assert shard.take(items) == [2, 6] and shard.file_name == "predictions.rank2-of-4.jsonl"
    covered = sorted(x for r in range(4) for x in runner.Shard(r, 4).take(items))
    assert covered == items
    for env in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "0"}, {"RANK": "x"}):
        with pytest.raises(ValueError, match="RANK"):
            runner.Shard.from_env(env)


def test_read_records_drops_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": f"r{i}", "prediction": "x" * i} for i in range(4)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"id": "r4", "pre')
    assert runner.read_records(path) == rows
    runner.drop_partial_line(path)
    assert path.read_text() == text
    path.write_text(text + "{broken\n" + text)
    with pytest.raises(ValueError, match="line 5"):
        runner.read_records(path)
