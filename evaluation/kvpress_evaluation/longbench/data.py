"""LongBench rows, read from the official JSONL files or, when a hub is reachable, from a dataset repository.

The official ``data.zip`` unpacks to ``data/<name>.jsonl`` (and ``data/<name>_e.jsonl`` for LongBench-E), one JSON
object per line: ``input`` (the question, may be empty), ``context``, ``answers`` (gold strings), ``length`` (words,
or characters for Chinese), ``dataset``, ``language``, ``all_classes`` (class names for trec and lsht, else null)
and ``_id``. Repositories on a hub hold the same columns, one configuration per file stem, split ``test``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .datasets import file_stem

REQUIRED_FIELDS = ("input", "context", "answers")


def local_file(data_dir, task: str, longbench_e: bool = False) -> Path:
    """``<data_dir>/<task>.jsonl``, or ``<data_dir>/<task>_e.jsonl`` for LongBench-E."""
    return Path(data_dir) / f"{file_stem(task, longbench_e)}.jsonl"


def check_local_files(data_dir, tasks, longbench_e: bool = False) -> None:
    """Raise ``ValueError`` naming ``data_dir`` unless it is a directory holding the file of every task."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise ValueError(f"data_dir {str(directory)!r} is not a directory (the unpacked LongBench data.zip)")
    missing = [t for t in tasks if not local_file(directory, t, longbench_e).is_file()]
    if missing:
        names = ", ".join(local_file(directory, t, longbench_e).name for t in missing)
        raise ValueError(f"data_dir {str(directory)!r} lacks {names} (expected the files of the unpacked data.zip)")


def check_row(row, where: str) -> dict:
    """``row`` with ``input`` as a string (null becomes ``""``), after checking the fields every scorer needs."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004  (bad data)
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; LongBench rows need {REQUIRED_FIELDS}")
    row = dict(row)
    row["input"] = "" if row["input"] is None else row["input"]
    answers, classes = row["answers"], row.get("all_classes")
    if not isinstance(row["context"], str) or not isinstance(row["input"], str):
        raise ValueError(f"{where}: 'context' and 'input' must be strings")  # noqa: TRY004  (bad data)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{where}: 'all_classes' must be null or a list of strings")
    length = row.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise ValueError(f"{where}: 'length' must be an integer")
    return row


def read_jsonl(path) -> list[dict]:
    """The checked rows (:func:`check_row`) of one LongBench JSONL file; blank lines are skipped."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            rows.append(check_row(row, where))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def load_hub(dataset_name: str, task: str, longbench_e: bool = False, cache_dir=None) -> list[dict]:
    """The checked rows of configuration ``<task>`` (or ``<task>_e``), split ``test``, of ``dataset_name``.

    Goes through ``datasets.load_dataset``, so the local cache and ``HF_HUB_OFFLINE`` apply. Any failure there
    (no network, unknown repository or configuration) is re-raised as a ``ValueError`` that names ``dataset_name``
    and suggests ``data_dir`` instead.
    """
    config = file_stem(task, longbench_e)
    try:
        from datasets import load_dataset

        table = load_dataset(dataset_name, config, split="test", cache_dir=cache_dir)
    except Exception as err:  # network, hub and builder errors have many types; all mean "not available here"
        raise ValueError(
            f"dataset_name {dataset_name!r}: could not load configuration {config!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without hub access, unpack "
            f"LongBench's data.zip and pass data_dir=<folder holding {config}.jsonl> instead"
        ) from err
    rows = [check_row(row, f"{dataset_name}[{config}] row {i}") for i, row in enumerate(table)]
    if not rows:
        raise ValueError(f"dataset_name {dataset_name!r}: configuration {config!r} has no test rows")
    return rows


def load_rows(task: str, longbench_e: bool = False, data_dir=None, dataset_name=None, cache_dir=None) -> list[dict]:
    """The rows of one dataset, from ``data_dir`` (official JSONL files) or ``dataset_name`` (a hub repository).

    Exactly one of ``data_dir`` and ``dataset_name`` must be given.
    """
    if (data_dir is None) == (dataset_name is None):
        raise ValueError("give exactly one of data_dir (a folder of LongBench .jsonl files) and dataset_name")
    if data_dir is not None:
        check_local_files(data_dir, [task], longbench_e)
        return read_jsonl(local_file(data_dir, task, longbench_e))
    return load_hub(dataset_name, task, longbench_e, cache_dir)
