"""kvpress-eval: one-line errors with status 2 before any model loads, flags over YAML, an end-to-end run on a local
tiny model with an interruption and a resume, and (slow) the real SmolLM2 through main() and the console script."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from kvpress_evaluation import cli, runner
from kvpress_evaluation.config import load_config, parse_config
from tests.fixtures_pipeline import smollm2_tokenizer, text_model

RULER_SLICE = ["--option", "tasks=[niah_single_1]", "--option", "n_examples=2"]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runner, "load_model", refuse)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--press", "snapkvv"], ["presses[0].name", "snapkvv"]),
        (["--benchmark", "rulerr"], ["benchmark", "rulerr"]),
        (["--option", "qa_path=/no/such/qa.jsonl", "--option", "tasks=[qa_1]"], ["qa_path", "/no/such/qa.jsonl"]),
        (["--option", "dataset=./missing/ruler.jsonl"], ["dataset", "no such file"]),
        (["--config", "/no/such/config.yaml"], ["config", "/no/such/config.yaml"]),
        (["--ratios", "1.5"], ["compression_ratios"]),
        (["--ratios", "half"], ["--ratios", "half"]),
        (["--option", "lengths"], ["KEY=VALUE"]),
        (["--press", "{name: adakv, press: {name: snapkv, window: 2}}"], ["'window'", "window_size"]),
        (["--kv-bits", "5"], ["kv_quantization.bits"]),
        (["--bogus-flag"], ["--bogus-flag"]),
        (["--option", "lengths=[9000]"], ["8192 positions", "max_position_embeddings"]),
        (["--max-context-length", "8190", "--max-new-tokens", "16"], ["max_context_length"]),
    ],
)
def test_bad_input_exits_2_with_one_line_before_loading(argv, words, tmp_path, capsys, no_model_loading):
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpress-eval: error: ") and err.count("\n") == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_bad_longbench_rows_fail_before_the_model_loads_and_leave_no_folder(tmp_path, capsys, no_model_loading):
    data = tmp_path / "data"
    data.mkdir()
    good = {"input": "q?", "context": "some text", "answers": ["a"], "length": 2, "all_classes": None}
    rows = [good, {k: v for k, v in good.items() if k != "answers"}]
    (data / "trec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--benchmark", "longbench", "--option", f"data_dir={data}", "--option", "tasks=[trec]"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data / 'trec.jsonl'}:2: missing field(s) answers" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["/proc/forbidden", "file"])
def test_unwritable_output_dir_names_the_option(where, tmp_path, capsys, no_model_loading):
    if where == "file":
        (tmp_path / "file").write_text("not a folder")
        where = str(tmp_path / "file" / "out")
    assert cli.main([*RULER_SLICE, "--option", "lengths=[256]", "--output-dir", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpress-eval: error: output_dir (--output-dir) ") and err.count("\n") == 1 and where in err


def test_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"presses": ["tova"], "seed": 3, "benchmark_options": {"lengths": [512]},
                                    "query_aware": True}))
    args = cli.build_parser().parse_args(
        ["--config", str(path), "--press", "knorm", "{name: adakv, press: snapkv}", "--ratios", "0.25", "0.5",
         "--option", "n_examples=4", "--no-query-aware", "--kv-bits", "4", "--fraction", "0.5", "--no-plots"]
    )
    config = load_config(args.config, cli.overrides(args))
    expected = parse_config(
        {"presses": ["knorm", {"name": "adakv", "press": "snapkv"}], "compression_ratios": [0.25, 0.5], "seed": 3,
         "benchmark_options": {"lengths": [512], "n_examples": 4}, "query_aware": False,
         "kv_quantization": {"bits": 4}, "fraction": 0.5, "plots": False}
    )
    assert config == expected
    # Flags not given set nothing.
    assert cli.overrides(cli.build_parser().parse_args([])) == {}


def test_list_prints_every_press_with_its_parameters_and_every_benchmark_with_its_tasks(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    from kvpress.presses.registry import PRESSES, describe_press
    from kvpress_evaluation.registry import BENCHMARKS, benchmark_class

    assert re.search(r"^  none\s+no compression$", out, re.M)
    for name in PRESSES:
        assert f"  {describe_press(name)}\n" in out
    assert "SnapKVPress(compression_ratio=0.0, target_size=None, window_size=8, kernel_size=7, pooling='max', group_reduction='mean')" in out
    for name in BENCHMARKS:
        assert re.search(rf"^  {name}\s+options: ", out, re.M)
        assert f"tasks: {', '.join(benchmark_class(name).task_names)}" in out
    assert "lengths=[4096], n_examples=20" in out and "niah_multiquery, vt, cwe, fwe, qa_1, qa_2" in out


def test_help_shows_defaults_and_task_names(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("compression ratios to sweep (default: 0.5)", "(default: ruler)", "(default: none)",
                 "(default: 42)", "contexts per pipeline call (default: 1)", "(default: results)"):  # fmt: skip
        assert text in out, text
    assert "tasks: niah_single_1, niah_single_2" in out and "narrativeqa, qasper" in out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A local model directory (tiny random Llama with the SmolLM2 tokenizer), loaded through from_pretrained."""
    path = tmp_path_factory.mktemp("tiny")
    text_model("llama").save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    return path


def test_local_model_end_to_end_with_interruption_and_resume(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--press", "none", "knorm", "--ratios", "0.5", *RULER_SLICE,
            "--option", "lengths=[300]", "--max-new-tokens", "3", "--output-dir", str(out)]
    reference_out = tmp_path / "reference"
    assert cli.main([*argv[:-1], str(reference_out)]) == 0
    capsys.readouterr()

    calls = []
    real_answer = runner.answer

    def interrupt_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(runner, "answer", interrupt_third_call)
    assert cli.main(argv) == 130
    assert "resume" in capsys.readouterr().err
    assert (out / "none" / "metrics.json").is_file() and not (out / "knorm_0.50" / "metrics.json").exists()
    monkeypatch.setattr(runner, "answer", real_answer)
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "| knorm_0.50 | knorm | 0.50 | 50% | 2 |" in table

    for run in ("none", "knorm_0.50"):
        got = [json.loads(x) for x in (out / run / "predictions.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (reference_out / run / "predictions.jsonl").read_text().splitlines()]
        assert [(r["id"], r["prediction"]) for r in got] == [(r["id"], r["prediction"]) for r in want]
        assert len({r["id"] for r in got}) == 2
    assert (out / "summary.md").read_text() == (reference_out / "summary.md").read_text()
    assert (out / "scores.png").stat().st_size > 1000


def _check_outputs(out, presses=("knorm", "snapkv")):
    runs = [f"{p}_0.50" for p in presses]
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [row["run"] for row in summary] == runs
    assert set(summary[0]) >= {"run", "press", "compression_ratio", "n_examples", "niah_single_1", "average"}
    for run, row in zip(runs, summary):
        run_dir = out / run
        records = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == ["niah_single_1/512/0", "niah_single_1/512/1"]
        assert all(r["press"] == run.split("_")[0] and isinstance(r["prediction"], str) for r in records)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics["tasks"]["niah_single_1"]) == {"string_match", "string_match@512"}
        hits = [all(a.lower() in r["prediction"].lower() for a in r["answers"]) for r in records]
        assert metrics["tasks"]["niah_single_1"]["string_match"] == 100 * sum(hits) / 2
        assert float(row["average"]) == metrics["average"] and metrics["compression_ratio"] == 0.5
        config = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
        assert config.runs()[0].name == run and config.benchmark_options["lengths"] == [512]
        meta = json.loads((run_dir / "metadata.json").read_text())
        assert meta["model"] == "smollm2" and meta["end_time"] >= meta["start_time"]
    assert (out / "scores.png").stat().st_size > 1000
    return {run: [json.loads(x)["prediction"] for x in (out / run / "predictions.jsonl").read_text().splitlines()]
            for run in runs}


SMOLLM2_ARGS = ["--press", "knorm", "snapkv", "--ratios", "0.5", *RULER_SLICE, "--option", "lengths=[512]",
                "--max-new-tokens", "12"]


@pytest.mark.slow
def test_smollm2_end_to_end_through_main(tmp_path, capsys):
    assert cli.main([*SMOLLM2_ARGS, "--output-dir", str(tmp_path)]) == 0
    _check_outputs(tmp_path)
    assert "| snapkv_0.50 | snapkv |" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_end_to_end_through_the_console_script(tmp_path):
    # The script sits beside the interpreter running the tests, also when its venv is not activated.
    script = shutil.which("kvpress-eval", path=os.path.dirname(sys.executable)) or shutil.which("kvpress-eval")
    assert script is not None, "the kvpress-eval console script is not installed"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"presses": ["knorm", "snapkv"], "compression_ratios": [0.5],
                                      "benchmark_options": {"tasks": ["niah_single_1"], "lengths": [512],
                                                            "n_examples": 2},
                                      "max_new_tokens": 12, "output_dir": str(tmp_path / "script")}))
    done = subprocess.run([script, "--config", str(config)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    first = _check_outputs(tmp_path / "script")
    # python -m runs the same command; a second invocation finds every run complete and answers nothing again.
    again = subprocess.run([sys.executable, "-m", "kvpress_evaluation", "--config", str(config)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _check_outputs(tmp_path / "script") == first
    assert "snapkv_0.50" in again.stdout and "Loading weights" not in again.stderr


def test_torchrun_shards_the_examples_over_two_processes(tiny_model_dir, tmp_path):
    """The launcher path users take on several GPUs, here with two CPU processes: each rank answers its share into
    its own file, and the merged predictions equal a single process's."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun is not None, "torch's torchrun launcher is not installed"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--press", "knorm", "--ratios", "0.5",
            "--option", "tasks=[niah_single_1]", "--option", "n_examples=4", "--option", "lengths=[300]",
            "--max-new-tokens", "3", "--no-plots"]  # fmt: skip
    assert cli.main([*args, "--output-dir", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "kvpress_evaluation", *args,
                           "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                          check=False, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "two" / "knorm_0.50"
    shards = [runner.read_records(run / f"predictions.rank{r}-of-2.jsonl") for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    merged = runner.read_records(run / "predictions.jsonl")
    single = runner.read_records(tmp_path / "single" / "knorm_0.50" / "predictions.jsonl")
    assert [(r["id"], r["prediction"]) for r in merged] == [(r["id"], r["prediction"]) for r in single]
    assert json.loads((run / "metrics.json").read_text())["average"] == json.loads(
        (tmp_path / "single" / "knorm_0.50" / "metrics.json").read_text())["average"]  # fmt: skip
