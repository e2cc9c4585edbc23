"""Run an :class:`~kvpress_evaluation.config.EvalConfig`: load the model once, answer every example under each press
and ratio, score, and write the results.

Layout under ``output_dir``::

    <run>/predictions.jsonl   one line per example (Example fields, ``prediction``, ``run``, ``press``, ...), appended
                              and flushed as each answer arrives
    <run>/metrics.json        per-task metrics and their average (written once every example is answered)
    <run>/config.yaml         the resolved config of this run alone
    <run>/metadata.json       versions, git commit, device, start and end time
    summary.csv, summary.md   one row per run; scores.png: score versus compression ratio

An interrupted run resumes where it stopped: answered ids are read back (a truncated last line is dropped) and only
the others are answered. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), rank r answers examples r, r+N,
... into ``predictions.rank<r>-of-<N>.jsonl`` on ``cuda:LOCAL_RANK``; the process that completes the last shard
merges the shards into ``predictions.jsonl`` and scores. The runner uses only the :class:`Benchmark` interface.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from kvpress_evaluation import registry
from kvpress_evaluation.benchmark import Benchmark, Example
from kvpress_evaluation.config import SMOLLM2, EvalConfig, RunSpec, ratio_text

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
CONFIG = "config.yaml"
METADATA = "metadata.json"
# Fields that change where or how fast a run goes, not its answers: a resumed run may change them.
RESUME_NEUTRAL = ("output_dir", "device", "device_map", "batch_size", "plots", "cuda_graph")


# ---- data parallel --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's share of the examples: ``examples[rank::world_size]``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> Shard:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as ``torchrun`` sets them); absent means one process."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", 1))
            rank = int(env.get("RANK", 0))
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(f"need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def file_name(self) -> str:
        return PREDICTIONS if self.world_size == 1 else f"predictions.rank{self.rank}-of-{self.world_size}.jsonl"

    def take(self, examples: list[Example]) -> list[Example]:
        return examples[self.rank :: self.world_size]


# ---- predictions files ----------------------------------------------------------------------------------------------
def read_records(path) -> list[dict]:
    """The records of a predictions file; a truncated last line (a kill during a write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, without its newline: an interrupted write
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; remove it to resume") from None
    return records


def drop_partial_line(path) -> None:
    """Cut ``path`` after its last newline, so appends start on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def answered(run_dir) -> dict[str, dict]:
    """``{id: record}`` of every answered example of a run directory: merged file first, then every shard."""
    run_dir = Path(run_dir)
    files = [run_dir / PREDICTIONS, *sorted(run_dir.glob("predictions.rank*.jsonl"))]
    records: dict[str, dict] = {}
    for path in files:
        for record in read_records(path):
            records.setdefault(record["id"], record)
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- model ----------------------------------------------------------------------------------------------------------
def model_window(config: EvalConfig) -> int | None:
    """The model's ``max_position_embeddings``, read from its config only (no weights); ``None`` when unknown."""
    from transformers import AutoConfig

    try:
        if config.model == SMOLLM2:
            from kvpress.offline_model import smollm2_gguf

            directory, name = smollm2_gguf()
            model_config = AutoConfig.from_pretrained(directory, gguf_file=name)
        else:
            model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except OSError as err:
        raise ValueError(
            f"model: {config.model!r} is neither a local model directory nor a model available offline "
            f"({str(err).splitlines()[0]})"
        ) from None
    return getattr(model_config.get_text_config(decoder=True), "max_position_embeddings", None)


def check_context(config: EvalConfig, benchmark: Benchmark, window: int | None) -> int | None:
    """Raise ``ValueError`` when the benchmark's contexts plus generation exceed the model's window; returns the
    context budget handed to :meth:`Benchmark.examples`."""
    if window is None:
        return config.max_context_length
    generation = config.max_new_tokens or 0
    if config.max_context_length is not None and config.max_context_length + generation > window:
        raise ValueError(
            f"max_context_length: {config.max_context_length} tokens (+{generation} generated) exceed the "
            f"{window} positions model {config.model!r} allows"
        )
    declared = benchmark.max_context_tokens()
    if declared is not None:
        needed = min(declared, config.max_context_length or declared) + generation
        if needed > window:
            raise ValueError(
                f"benchmark_options: the {benchmark.name} prompts take up to {declared} tokens (+{generation} "
                f"generated) but model {config.model!r} allows {window} positions (max_position_embeddings); "
                "lower the lengths or set max_context_length"
            )
    return config.max_context_length or window - generation


def resolve_device(config: EvalConfig, shard: Shard) -> str | None:
    """The device to load on (``None`` with ``device_map``): ``cuda:LOCAL_RANK`` under a multi-process launch."""
    if config.device_map is not None:
        if shard.world_size > 1:
            raise ValueError("device_map: data-parallel runs place one model copy per GPU; drop device_map")
        return None
    if shard.world_size > 1 and torch.cuda.is_available() and config.device in (None, "cuda"):
        return f"cuda:{shard.local_rank}"
    if config.device is not None:
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(config: EvalConfig, device: str | None) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (or with a device map), float32 elsewhere."""
    if config.dtype == "auto":
        on_gpu = device is None or device.startswith("cuda")
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() else torch.float32
    return getattr(torch, config.dtype)


def load_tokenizer(config: EvalConfig):
    """The tokenizer of ``config.model`` alone (seconds, where the model takes longer): examples are built with it
    before the model loads."""
    if config.model == SMOLLM2:
        from kvpress.offline_model import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)


def load_model(config: EvalConfig, device: str | None):
    """``(model, tokenizer)`` in eval mode; remote code runs only with ``trust_remote_code``."""
    dtype, attn = resolve_dtype(config, device), config.attention()
    if config.model == SMOLLM2:
        from kvpress.offline_model import load_smollm2

        return load_smollm2(dtype=dtype, device=device, attn_implementation=attn)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = config.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=trust)
    kwargs = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": trust}
    if config.device_map is not None:
        kwargs["device_map"] = config.device_map
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    if config.device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def _check_pipeline_options(config: EvalConfig) -> None:
    import inspect

    from kvpress.pipeline import KVPressTextGenerationPipeline

    accepted = inspect.signature(KVPressTextGenerationPipeline._sanitize_parameters).parameters
    if config.kv_quantization is not None and "kv_quantization" not in accepted:
        raise ValueError("kv_quantization: this kvpress pipeline does not support quantized caches")
    if config.prefill_chunk_size is not None and "prefill_chunk_size" not in accepted:
        raise ValueError("prefill_chunk_size: this kvpress pipeline does not prefill in chunks")
    if config.sparse_prefill is not None and "sparse_prefill" not in accepted:
        raise ValueError("sparse_prefill: this kvpress pipeline has no sparse prefill")


# ---- examples -------------------------------------------------------------------------------------------------------
def select_examples(examples: list[Example], config: EvalConfig) -> list[Example]:
    """The ``fraction`` or ``n_examples`` subset drawn with ``seed``, in the benchmark's order; ids must be unique."""
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"the benchmark gave duplicate example ids {duplicates}; ids must be unique")
    if not examples:
        raise ValueError("the benchmark gave no examples; check benchmark_options")
    n = len(examples)
    if config.fraction is not None:
        k = max(1, round(config.fraction * n))
    elif config.n_examples is not None:
        k = min(config.n_examples, n)
    else:
        return list(examples)
    keep = sorted(random.Random(config.seed).sample(range(n), k))
    return [examples[i] for i in keep]


def _batches(examples: list[Example], size: int, max_new_tokens: int | None):
    """Consecutive examples sharing the answer prefix and generation length (one pipeline call each)."""
    batch: list[Example] = []
    for example in examples:
        key = _call_key(example, max_new_tokens)
        if batch and (len(batch) == size or key != _call_key(batch[0], max_new_tokens)):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def _call_key(example: Example, max_new_tokens: int | None) -> tuple:
    """What one pipeline call must share: answer prefix, generation length and prompt format."""
    return example.answer_prefix, max_new_tokens or example.max_new_tokens, example.meta.get("chat_template")


def _chat_template(example: Example, config: EvalConfig) -> bool | None:
    """The config's choice, else the benchmark's: LongBench's few-shot and code datasets are prompted without it."""
    if config.use_chat_template is not None:
        return config.use_chat_template
    return False if example.meta.get("chat_template") is False else None


def answer(pipe, batch: list[Example], press, config: EvalConfig) -> list[tuple[str, dict]]:
    """The pipeline's answers to ``batch`` (one call: a single context, or several stacked), each with the KV cache
    bytes its compressed context held (``{"kv_bytes": ..., "kv_bytes_uncompressed": ...}``, measured from the cache)."""
    kwargs = {
        "return_report": True,
        "press": press,
        "answer_prefix": batch[0].answer_prefix,
        "max_new_tokens": config.max_new_tokens or batch[0].max_new_tokens,
        "max_context_length": config.max_context_length,
        "query_aware": config.query_aware,
        "use_chat_template": _chat_template(batch[0], config),
        "cuda_graph": config.cuda_graph,
    }
    if config.kv_quantization is not None:
        kwargs["kv_quantization"] = config.kv_quantization
    if config.prefill_chunk_size is not None:
        kwargs["prefill_chunk_size"] = config.prefill_chunk_size
    if config.sparse_prefill is not None:
        kwargs["sparse_prefill"] = config.sparse_prefill
    if len(batch) == 1:
        out = pipe(batch[0].context, question=batch[0].question, **kwargs)
        return [(out["answer"], _memory(out["report"]))]
    outputs = pipe([e.context for e in batch], questions=[[e.question] for e in batch], **kwargs)
    return [(out["answers"][0], _memory(out["reports"][0])) for out in outputs]


def _memory(summary) -> dict:
    return {"kv_bytes": summary.kv_bytes, "kv_bytes_uncompressed": summary.kv_bytes_uncompressed}


# ---- metadata -------------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the kvpress checkout, or ``None`` outside a git checkout."""
    import kvpress

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            cwd=Path(kvpress.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def device_name(device) -> str:
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{device or 'cpu'} ({platform.processor() or platform.machine()})"


def run_metadata(config: EvalConfig, device, shard: Shard) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "kvpress": _version("kvpress"),
        "git_commit": git_commit(),
        "device": device_name(device),
        "world_size": shard.world_size,
        "model": config.model,
        "benchmark": config.benchmark,
        "start_time": _now(),
    }


# ---- one run --------------------------------------------------------------------------------------------------------
def _comparable(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in RESUME_NEUTRAL}


def check_run_dir(config: EvalConfig, run: RunSpec) -> Path:
    """``output_dir/run``, checked without creating anything: a directory holding another configuration, or one that
    cannot be created, is a ``ValueError`` naming ``output_dir``."""
    run_dir = Path(config.output_dir) / run.name
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir (--output-dir) {config.output_dir!r}: cannot create {run_dir}: {existing} is not a writable "
            "directory"
        )
    path = run_dir / CONFIG
    if path.is_file():
        resolved = config.for_run(run).model_dump(mode="json")
        previous = yaml.safe_load(path.read_text()) or {}
        old, new = _comparable(previous), _comparable(resolved)
        if old != new:
            fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise ValueError(
                f"output_dir: {run_dir} holds a run with another configuration (differs in {', '.join(fields)}); "
                "use another output_dir or remove that directory"
            )
    return run_dir


def prepare_run_dir(config: EvalConfig, run: RunSpec) -> Path:
    """Create ``output_dir/run`` with its ``config.yaml`` (after :func:`check_run_dir`); failures name ``output_dir``."""
    run_dir = check_run_dir(config, run)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / CONFIG, yaml.safe_dump(config.for_run(run).model_dump(mode="json"), sort_keys=False))
    except OSError as err:
        raise ValueError(
            f"output_dir (--output-dir) {config.output_dir!r}: cannot write {run_dir} ({err.strerror or err})"
        ) from None
    return run_dir


def run_complete(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file()


def score_run(benchmark: Benchmark, run: RunSpec, examples: list[Example], records: dict[str, dict], config) -> dict:
    """``metrics.json`` content: per-task metrics, the average of each task's first metric, and the run's facts."""
    by_task: dict[str, list[Example]] = {}
    for example in examples:
        by_task.setdefault(example.task, []).append(example)
    tasks = {
        task: _rounded(benchmark.score(task, [records[e.id]["prediction"] for e in exs], exs))
        for task, exs in by_task.items()
    }
    headline = [next(iter(m.values())) for m in tasks.values()]
    held = [records[e.id].get("kv_bytes") for e in examples]
    full = [records[e.id].get("kv_bytes_uncompressed") for e in examples]
    # Predictions written before the cache was measured have no bytes: no figure rather than a partial one.
    kv_memory = round(sum(held) / sum(full), 4) if None not in held + full and sum(full) else None
    press = registry.build_press(run.press, seed=config.seed)
    ratio = run.ratio if run.ratio is not None else getattr(press, "compression_ratio", None)
    return {
        "run": run.name,
        "press": run.label,
        "compression_ratio": ratio,
        "swept": run.ratio is not None and run.label != registry.NO_PRESS,
        "kv_bits": config.kv_quantization.bits if config.kv_quantization is not None else None,
        "kv_method": config.kv_quantization.method if config.kv_quantization is not None else None,
        "n_examples": len(examples),
        "kv_memory": kv_memory,
        "tasks": tasks,
        "average": round(sum(headline) / len(headline), 2),
    }


def _rounded(metrics):
    """Every score to 2 decimals (nested breakdowns too): one rounding in metrics.json, the summaries and the plots."""
    if isinstance(metrics, dict):
        return {k: _rounded(v) for k, v in metrics.items()}
    return round(metrics, 2) if isinstance(metrics, float) else metrics


def finish_run(run_dir: Path, run: RunSpec, examples: list[Example], benchmark: Benchmark, config) -> dict | None:
    """Merge every shard into ``predictions.jsonl`` (example order, one line per id) and write ``metrics.json``;
    ``None`` while another process has examples left."""
    records = answered(run_dir)
    if any(e.id not in records for e in examples):
        return None
    text = "".join(json.dumps(records[e.id], ensure_ascii=False) + "\n" for e in examples)
    _write_atomic(run_dir / PREDICTIONS, text)
    metrics = score_run(benchmark, run, examples, records, config)
    _write_atomic(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    meta_path = run_dir / METADATA
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({"end_time": _now(), "n_predictions": len(examples)})
    _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    if config.plots:
        try:
            benchmark.plot([records[e.id] for e in examples], run_dir)
        except Exception as err:  # noqa: BLE001  (a figure must not cost the scores already written)
            logger.error("%s: the benchmark's plot failed: %s", run.name, err)
    return metrics


def answer_run(
    pipe,
    run: RunSpec,
    examples: list[Example],
    config: EvalConfig,
    shard: Shard,
    run_dir: Path,
    on_record: Callable[[dict], None] | None = None,
) -> None:
    """Answer this shard's examples not yet answered, appending each record to the shard's file as it comes."""
    press = registry.build_press(run.press, seed=config.seed)
    mine = shard.take(examples)
    own_file = run_dir / shard.file_name
    drop_partial_line(own_file)
    done = answered(run_dir)
    pending = [e for e in mine if e.id not in done]
    ratio = run.ratio if run.ratio is not None else getattr(press, "compression_ratio", None)
    progress = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=run.name, unit="ex", file=sys.stderr)
    try:
        with open(own_file, "a", encoding="utf-8") as f:
            for batch in _batches(pending, config.batch_size, config.max_new_tokens):
                start = time.perf_counter()
                predictions = answer(pipe, batch, press, config)
                seconds = (time.perf_counter() - start) / len(batch)
                for example, (prediction, memory) in zip(batch, predictions):
                    record = {
                        **example.to_dict(),
                        "prediction": prediction,
                        **memory,
                        "run": run.name,
                        "press": run.label,
                        "compression_ratio": ratio,
                        "seconds": round(seconds, 4),
                    }
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                    progress.update(1)
                    if on_record is not None:
                        on_record(record)
    finally:
        progress.close()


# ---- summary --------------------------------------------------------------------------------------------------------
def summary_rows(metrics: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per run (``run``, ``press``, ``compression_ratio``, ``kv_memory``, ``kv_bits``, ``swept``,
    ``n_examples``, each task's first metric, ``average``) and the task names in order. ``kv_memory`` is the share
    of the uncompressed KV cache's bytes that the compressed contexts really held (measured from the cache)."""
    tasks: list[str] = []
    for m in metrics:
        tasks += [t for t in m["tasks"] if t not in tasks]
    rows = []
    for m in metrics:
        row = {
            k: m.get(k)
            for k in ("run", "press", "compression_ratio", "kv_memory", "kv_bits", "kv_method", "swept", "n_examples")
        }
        for task in tasks:
            row[task] = next(iter(m["tasks"][task].values())) if task in m["tasks"] else None
        row["average"] = m["average"]
        rows.append(row)
    return rows, tasks


def _score_cell(value) -> str:
    return "" if value is None else f"{value:.2f}"


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """The summary as a Markdown table: run, press, ratio, KV memory held, examples, each task, average (scores to 2
    decimals)."""
    header = ["run", "press", "ratio", "KV held", "n", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ratio = "" if row["compression_ratio"] is None else ratio_text(row["compression_ratio"])
        held = "" if row.get("kv_memory") is None else f"{row['kv_memory']:.0%}"
        cells = [row["run"], row["press"], ratio, held, str(row["n_examples"])]
        cells += [_score_cell(row[t]) for t in tasks] + [_score_cell(row["average"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], tasks: list[str], out_dir) -> tuple[Path, Path]:
    """``summary.csv`` (every column of the rows) and ``summary.md`` (:func:`format_table`) under ``out_dir``."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    columns = ["run", "press", "compression_ratio", "kv_memory", "kv_bits", "swept", "n_examples", *tasks, "average"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    _write_atomic(out_dir / "summary.csv", buffer.getvalue())
    _write_atomic(out_dir / "summary.md", format_table(rows, tasks))
    return out_dir / "summary.csv", out_dir / "summary.md"


# ---- the whole evaluation -------------------------------------------------------------------------------------------
def evaluate(
    config: EvalConfig,
    *,
    model=None,
    tokenizer=None,
    benchmark: Benchmark | None = None,
    env=None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict] | None:
    """Run every press and ratio of ``config``; returns the summary rows, or ``None`` when other processes of a
    data-parallel launch still have examples to answer.

    Every check runs before the model loads: benchmark options and paths, press arguments, the model's window,
    existing run directories. ``model``/``tokenizer`` (loaded by the caller) and ``benchmark`` replace the ones the
    config names; ``env`` replaces ``os.environ`` for the ``RANK``/``WORLD_SIZE`` variables; ``on_record`` sees each
    record after it is written.
    """
    shard = Shard.from_env(env)
    benchmark = benchmark or registry.build_benchmark(config.benchmark, config.benchmark_options)
    runs = config.runs()
    _check_pipeline_options(config)
    if model is not None:
        window = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    else:
        window = model_window(config)
    budget = check_context(config, benchmark, window)
    device = resolve_device(config, shard) if model is None else model.device
    if config.cuda_graph and not str(device).startswith("cuda"):
        raise ValueError(f"cuda_graph: needs the model on a CUDA device, got {device}")
    run_dirs = {run.name: check_run_dir(config, run) for run in runs}
    pending = [run for run in runs if not run_complete(run_dirs[run.name])]

    if pending:
        from transformers import pipeline

        import kvpress  # noqa: F401  (registers the pipeline)
        from kvpress.pipeline import TASK

        # Examples first (data files are read and checked here), then the output folders, then the model: bad data
        # fails in seconds and leaves nothing behind.
        examples = select_examples(
            benchmark.examples(tokenizer if model is not None else load_tokenizer(config), config.seed, budget), config
        )
        run_dirs = {run.name: prepare_run_dir(config, run) for run in runs}
        if model is None:
            model, tokenizer = load_model(config, device)
        pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
        for run in pending:
            run_dir = run_dirs[run.name]
            meta_path = run_dir / METADATA
            if not meta_path.is_file():
                _write_atomic(meta_path, json.dumps(run_metadata(config, device, shard), indent=2) + "\n")
            answer_run(pipe, run, examples, config, shard, run_dir, on_record)
            if finish_run(run_dir, run, examples, benchmark, config) is None:
                logger.info("%s: this process is done; other processes still answer their examples", run.name)

    if not all(run_complete(run_dirs[run.name]) for run in runs):
        return None
    metrics = [json.loads((run_dirs[run.name] / METRICS).read_text()) for run in runs]
    rows, tasks = summary_rows(metrics)
    out_dir = Path(config.output_dir)
    write_summary(rows, tasks, out_dir)
    print(format_table(rows, tasks))
    if config.plots:
        from kvpress_evaluation.plots import plot_scores

        try:
            plot_scores(rows, tasks, out_dir / "scores.png")
        except ImportError as err:  # matplotlib comes with the eval extra; the scores are written already
            logger.warning("scores.png not drawn (%s); install kvpress[eval] for plots", err)
    return rows
