"""``load_ruler_dataset``: RULER samples read from an existing data set (local files or a dataset name).

The rows follow the packaged RULER schema: ``context``, ``question``, ``answer_prefix`` (strings), ``answer`` (list of
gold strings; ``answers`` is accepted too), ``task`` and ``max_new_tokens``. Packaged sets keep one length per
configuration (a folder named by the token budget, e.g. ``4096/``); a ``length`` or ``target_tokens`` column gives it
per row instead. Rows come back with the keys :func:`.generate.generate_ruler` returns, so generated and loaded
samples are interchangeable.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import tokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .generate import SYNTHETIC_TASKS, TASKS
from .qa import QA_TASKS, QATask

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
REQUIRED = ("context", "question", "answer_prefix", "answer", "task")
KEYS = ("context", "question", "answer_prefix", "answers", "task", "n_tokens", "max_new_tokens", "index")
LENGTH_COLUMNS = ("target_tokens", "length")
# Generation lengths of the tasks, used when a data set has no max_new_tokens column.
MAX_NEW_TOKENS = {
    **{name: spec.max_new_tokens for name, spec in SYNTHETIC_TASKS.items()},
    **{name: QATask.max_new_tokens for name in QA_TASKS},
}
# JSON files that datasets writes next to its data; they describe a data set and hold no rows.
_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_LAYOUT_TOKENS = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
_LOCAL_HINT = (
    "a JSONL/JSON/Parquet/CSV file, a folder of such files (one subfolder per length, e.g. 4096/), "
    "or a folder written by datasets.save_to_disk"
)


@dataclass
class Table:
    """Rows read from one file, folder or dataset configuration.

    ``origin`` names it in error messages; ``length`` is the token budget its location gives (an integer folder name
    or the ``data_dir`` of a dataset configuration), ``None`` when it gives none.
    """

    origin: str
    length: int | None
    rows: list[dict]


def load_ruler_dataset(source: str, tasks: list[str] | None = None, lengths: list[int] | None = None) -> list[dict]:
    """Samples of an existing RULER data set, as dicts with the keys :func:`.generate.generate_ruler` returns.

    Args:
        source: an existing path (a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder of such files searched
            recursively, or a ``datasets.save_to_disk`` folder; ``~`` is expanded), else a dataset name loaded with
            ``datasets.load_dataset`` (one ``data_dir`` per entry of ``lengths``, as the packaged RULER sets are laid
            out; the ``test`` split, or the only one).
        tasks: keep only these tasks (names of :data:`.generate.TASKS`); ``None`` keeps every task.
        lengths: keep only these token budgets; ``None`` keeps every one. A row's length comes from a ``target_tokens``
            or ``length`` column, else from the innermost folder named by an integer (``4096/``), else from the
            dataset configuration.

    Returns:
        one dict per row, in the order of the source (length folders in numeric order, other names sorted):
        ``context``, ``question``, ``answer_prefix``, ``answers`` (the ``answer`` column), ``task``, ``n_tokens`` (the
        ``n_tokens`` column when present; otherwise the row's length, the token budget that bounds the whole prompt,
        or ``None`` when the source gives none), ``max_new_tokens`` (the column, else the task's default), ``index``
        (the column, else the row's position among the rows of its task and length).

    Raises:
        ValueError: a bad argument, a missing path, an unreachable dataset, missing columns (named), bad values, or
            a requested task or length the source does not hold.
    """
    tasks = _check_tasks(tasks)
    lengths = _check_lengths(lengths)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a path or a dataset name (a non-empty string), got {source!r}")
    path = Path(source).expanduser()
    if path.exists():
        tables = _local_tables(path)
    elif _looks_like_path(source):
        raise ValueError(f"source {source!r}: no such file or directory (a local RULER data set is {_LOCAL_HINT})")
    else:
        tables = _hub_tables(source, lengths)

    rows, keys = [], []
    positions: Counter = Counter()
    for table in tables:
        if table.rows:
            _check_columns(table)
        for number, raw in enumerate(table.rows, 1):
            row, length = _convert(raw, table, number)
            group = (row["task"], length)
            if row["index"] is None:
                row["index"] = positions[group]
            positions[group] += 1
            keys.append((*group, row["index"], table.origin))
            rows.append((row, length, table.origin))
    _check_unique(keys)
    return _select(rows, source, tasks, lengths)


def _check_tasks(tasks) -> list[str] | None:
    if tasks is None:
        return None
    if (
        isinstance(tasks, str)
        or not isinstance(tasks, (list, tuple))
        or not tasks
        or any(t not in TASKS for t in tasks)
    ):
        raise ValueError(f"tasks must be None or a non-empty list of RULER tasks ({', '.join(TASKS)}), got {tasks!r}")
    return list(tasks)


def _check_lengths(lengths) -> list[int] | None:
    if lengths is None:
        return None
    bad = not isinstance(lengths, (list, tuple)) or not lengths
    if bad or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"lengths must be None or a non-empty list of positive ints (token budgets), got {lengths!r}")
    return list(lengths)


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be dataset names: file names, absolute, home or dot-relative paths."""
    return source.endswith(SUFFIXES) or source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _local_tables(path: Path) -> list[Table]:
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"source {str(path)!r} is not a data file: expected {_LOCAL_HINT}")
        return [Table(str(path), _folder_length(path.parent), _read_file(path))]
    tables = _folder_tables(path, _folder_length(path))
    if not tables:
        raise ValueError(f"source {str(path)!r} holds no RULER data: expected {_LOCAL_HINT}")
    return tables


def _folder_length(folder: Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _folder_tables(folder: Path, length: int | None) -> list[Table]:
    if _is_saved_dataset(folder):
        datasets = _import_datasets()
        return [Table(str(folder), length, _split_rows(datasets.load_from_disk(str(folder)), str(folder)))]
    tables = []
    for child in sorted(folder.iterdir(), key=_by_name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            tables += _folder_tables(child, _folder_length(child) or length)
        elif child.name.endswith(SUFFIXES) and child.name not in _METADATA:
            tables.append(Table(str(child), length, _read_file(child)))
    return tables


def _by_name(path: Path) -> tuple:
    """Folders named by lengths first, in numeric order (4096 before 16384), then everything else by name."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _read_file(path: Path) -> list[dict]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq  # installed with datasets

        return pq.read_table(path).to_pylist()
    if path.name.endswith(".csv"):
        return _read_csv(path)
    text = path.read_text(encoding="utf-8")
    if path.name.endswith(".json"):
        # A JSON array of rows, or JSON lines (what datasets' to_json writes).
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return rows
        if rows is not None and not isinstance(rows, dict):  # a dict is one JSON line: read below
            raise ValueError(f"{str(path)!r}: a .json data file must hold a list of row objects or JSON lines")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{str(path)!r} line {number} is not a JSON object")  # noqa: TRY004  (bad data)
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    # Long contexts exceed csv's default field limit (128 KiB); the limit is global, so it is restored afterwards.
    limit = csv.field_size_limit(2**31 - 1)
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    finally:
        csv.field_size_limit(limit)
    for row in rows:
        for column in ("answer", "answers"):
            if column in row:
                row[column] = _cell_list(row[column])
    return rows


def _cell_list(cell: str):
    """The strings of a CSV cell holding a list: JSON (``["a", "b"]``) or a Python/numpy repr (``['a', 'b']``,
    ``['a' 'b']``, as datasets' ``to_csv`` writes). Anything else is one plain string. Never executed: the repr is
    read token by token, each token a string literal."""
    try:
        value = json.loads(cell)
    except ValueError:
        value = None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(cell).readline) if t.type not in _LAYOUT_TOKENS]
    except (tokenize.TokenError, SyntaxError):
        return cell
    if len(tokens) < 2 or tokens[0].string != "[" or tokens[-1].string != "]":
        return cell
    inner = [t for t in tokens[1:-1] if t.string != ","]
    if not all(t.type == tokenize.STRING for t in inner):
        return cell
    values = [ast.literal_eval(t.string) for t in inner]
    return values if all(isinstance(v, str) for v in values) else cell


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "reading saved or named data sets needs the datasets package: pip install kvpress[eval]"
        ) from err
    return datasets


def _split_rows(loaded, origin: str) -> list[dict]:
    """The rows of a ``Dataset``, or of the ``test`` split (else the only split) of a ``DatasetDict``."""
    if hasattr(loaded, "keys"):
        splits = list(loaded.keys())
        if "test" in splits:
            loaded = loaded["test"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise ValueError(
                f"{origin!r} has the splits {splits} and none named 'test': save the one to evaluate alone"
            )
    return loaded.to_list()


def _hub_tables(name: str, lengths: list[int] | None) -> list[Table]:
    datasets = _import_datasets()
    tables = []
    for length in lengths or [None]:
        data_dir = None if length is None else str(length)
        try:
            loaded = datasets.load_dataset(name, data_dir=data_dir)
        except Exception as err:  # the hub client raises many types (ConnectionError, FileNotFoundError, ...)
            where = name if data_dir is None else f"{name} (data_dir={data_dir})"
            raise ValueError(
                f"source {name!r} is not a local path and the dataset {where} could not be loaded "
                f"({type(err).__name__}: {err}). Without a reachable dataset hub, set the RULER dataset option to a "
                f"local path instead: {_LOCAL_HINT}"
            ) from err
        tables.append(Table(name if data_dir is None else f"{name}/{data_dir}", length, _split_rows(loaded, name)))
    return tables


# ---------------------------------------------------------------------------------------------------------------
# Columns and values


def _check_columns(table: Table) -> None:
    columns = set().union(*table.rows)
    if "answers" in columns:
        columns.add("answer")
    missing = [c if c != "answer" else "answer (or answers)" for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(
            f"RULER data {table.origin!r} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(sorted(set().union(*table.rows)))} (needed: {', '.join(REQUIRED)}; optional: max_new_tokens, "
            "index, n_tokens, length, target_tokens)"
        )


def _convert(raw: dict, table: Table, number: int) -> tuple[dict, int | None]:
    """Our row from a source row, and the row's length; ``number`` (1-based) locates it in error messages."""
    where = f"RULER data {table.origin!r} row {number}"
    row = {}
    for column in ("context", "question", "answer_prefix", "task"):
        if not isinstance(raw.get(column), str):
            raise ValueError(f"{where}: column {column} must be a string, got {raw.get(column)!r}")  # noqa: TRY004
        row[column] = raw[column]
    answers = raw["answers"] if raw.get("answers") is not None else raw.get("answer")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"{where}: column answer must be a non-empty list of non-empty strings, got {answers!r}")
    row["answers"] = list(answers)

    length = next((_int(raw[c], c, where) for c in LENGTH_COLUMNS if raw.get(c) not in (None, "")), table.length)
    n_tokens = raw.get("n_tokens")
    row["n_tokens"] = length if n_tokens in (None, "") else _int(n_tokens, "n_tokens", where)
    max_new_tokens = raw.get("max_new_tokens")
    if max_new_tokens in (None, ""):
        if row["task"] not in MAX_NEW_TOKENS:
            raise ValueError(f"{where}: task {row['task']!r} has no default generation length; add max_new_tokens")
        row["max_new_tokens"] = MAX_NEW_TOKENS[row["task"]]
    else:
        row["max_new_tokens"] = _int(max_new_tokens, "max_new_tokens", where)
    index = raw.get("index")
    row["index"] = None if index in (None, "") else _int(index, "index", where, low=0)
    return {key: row[key] for key in KEYS}, length


def _int(value, column: str, where: str, low: int = 1) -> int:
    """``value`` as an int ``>= low``; CSV cells arrive as digit strings."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: column {column} must be an int >= {low}, got {value!r}")
    return value


def _check_unique(keys: list[tuple]) -> None:
    """Row ids downstream are (task, length, index): two rows sharing them would be answered and scored as one."""
    seen: dict[tuple, str] = {}
    for task, length, index, origin in keys:
        if (task, length, index) in seen:
            raise ValueError(
                f"RULER data holds two rows of task {task!r}, length {length}, index {index} "
                f"(in {seen[task, length, index]!r} and {origin!r}): the same data twice? Point source at one copy"
            )
        seen[task, length, index] = origin


def _select(rows: list[tuple[dict, int | None, str]], source: str, tasks, lengths) -> list[dict]:
    if lengths is not None:
        unsized = next((origin for _, length, origin in rows if length is None), None)
        if unsized is not None:
            raise ValueError(
                f"lengths cannot select rows of {unsized!r}: they carry no length (no target_tokens or length column, "
                "no folder named by the length such as 4096/); drop lengths or lay the data out by length"
            )
    have = {(row["task"], length) for row, length, _ in rows}
    for name, wanted, held in (
        ("tasks", tasks, {task for task, _ in have}),
        ("lengths", lengths, {length for _, length in have}),
    ):
        missing = [w for w in wanted or [] if w not in held]
        if missing:
            raise ValueError(f"{name}: {source!r} holds no rows for {missing}; it has {sorted(held, key=str)}")
    if tasks is not None and lengths is not None:
        missing = [(t, n) for t in tasks for n in lengths if (t, n) not in have]
        if missing:
            raise ValueError(f"tasks and lengths: {source!r} holds no rows for the (task, length) pairs {missing}")
    kept = [
        row
        for row, length, _ in rows
        if (tasks is None or row["task"] in tasks) and (lengths is None or length in lengths)
    ]
    if not kept:
        raise ValueError(f"source {source!r} holds no rows")
    return kept
