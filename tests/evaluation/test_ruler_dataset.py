"""load_ruler_dataset: every local format round-trips generated rows, the packaged schema maps onto ours, filters,
clear errors (missing columns named, offline dataset names), and dataset names loaded through datasets."""

from __future__ import annotations

import csv
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvpress_evaluation.ruler import generate_ruler
from kvpress_evaluation.ruler.dataset import load_ruler_dataset
from tests.fixtures_pipeline import smollm2_tokenizer

TASKS = ("niah_single_1", "vt", "niah_multikey_3")
LENGTHS = (300, 600)
PACKAGED = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")


@pytest.fixture(scope="module")
def generated() -> dict[int, list[dict]]:
    """Rows of generate_ruler with the SmolLM2 tokenizer, per length: 3 tasks x 2 samples."""
    tok = smollm2_tokenizer()
    return {n: [row for task in TASKS for row in generate_ruler(tok, task, n, 2, seed=n)] for n in LENGTHS}


def packaged(rows: list[dict]) -> list[dict]:
    """The rows in the packaged RULER schema: ``answer`` instead of ``answers``, no n_tokens, no index."""
    return [{column: row["answers" if column == "answer" else column] for column in PACKAGED} for row in rows]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_csv(path, rows, encode_list=json.dumps):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: encode_list(v) if isinstance(v, list) else v for k, v in row.items()})


WRITERS = {
    "jsonl": lambda path, rows: write_jsonl(path, rows),
    "json": lambda path, rows: path.write_text(json.dumps(rows), encoding="utf-8"),
    "parquet": lambda path, rows: pq.write_table(pa.Table.from_pylist(rows), path),
    "csv": write_csv,
    "csv-python-lists": lambda path, rows: write_csv(path, rows, repr),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_generated_rows_round_trip_through_every_file_format(generated, tmp_path, fmt):
    rows = generated[300]
    path = tmp_path / f"ruler.{fmt.split('-')[0]}"
    WRITERS[fmt](path, rows)
    assert load_ruler_dataset(str(path)) == rows


def test_generated_rows_round_trip_through_save_to_disk(generated, tmp_path):
    rows = generated[600]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    assert load_ruler_dataset(str(tmp_path / "flat")) == rows
    # A DatasetDict: its test split is read (the train split here is a decoy holding other rows).
    splits = {"test": datasets.Dataset.from_list(rows), "train": datasets.Dataset.from_list(generated[300])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    assert load_ruler_dataset(str(tmp_path / "dict")) == rows


def test_datasets_own_writers_are_read_back(generated, tmp_path):
    rows = packaged(generated[300])
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_csv(str(tmp_path / "a.csv"))  # lists written as numpy reprs: ['x' 'y']
    dataset.to_json(str(tmp_path / "b.json"))  # JSON lines under a .json name
    # Without an n_tokens column or a length, n_tokens is None; the index is the position within the task.
    assert load_ruler_dataset(str(tmp_path / "a.csv")) == ours(generated[300], None)
    assert load_ruler_dataset(str(tmp_path / "b.json")) == ours(generated[300], None)


def test_csv_lists_with_quotes_commas_brackets_and_newlines(tmp_path):
    rng = random.Random(0)
    alphabet = "ab ,'\"[]\\\né-7"
    rows = [
        {
            "context": "".join(rng.choice(alphabet) for _ in range(40)),
            "question": "q",
            "answer_prefix": " A:",
            "answers": [
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))
            ],
            "task": "vt",
            "n_tokens": rng.randint(1, 9999),
            "max_new_tokens": 30,
            "index": i,
        }
        for i in range(30)
    ]
    for encode in (json.dumps, repr):
        write_csv(tmp_path / "r.csv", rows, encode)
        assert load_ruler_dataset(str(tmp_path / "r.csv")) == rows


def hub_layout(root, generated, fmt="parquet"):
    """Packaged rows laid out as the dataset repository: one folder per length."""
    for length, rows in generated.items():
        if fmt == "parquet":
            (root / str(length)).mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(packaged(rows)), root / str(length) / "test-00000-of-00001.parquet")
        else:
            write_jsonl(root / str(length) / "data.jsonl", packaged(rows))


def ours(rows: list[dict], length: int | None) -> list[dict]:
    """generate_ruler's rows as loading them from the packaged schema gives them back."""
    return [{**row, "n_tokens": length} for row in rows]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_packaged_layout_lengths_from_folders_and_filters(generated, tmp_path, fmt):
    hub_layout(tmp_path, generated, fmt)
    both = load_ruler_dataset(str(tmp_path))
    # n_tokens falls back to the folder's length; index is the position within the task at that length.
    assert both == ours(generated[300], 300) + ours(generated[600], 600)
    assert load_ruler_dataset(str(tmp_path), lengths=[600]) == ours(generated[600], 600)
    picked = load_ruler_dataset(str(tmp_path), tasks=["vt"], lengths=[600, 300])
    assert picked == [r for r in ours(generated[300], 300) + ours(generated[600], 600) if r["task"] == "vt"]
    # Pointing at one length folder gives the same rows.
    assert load_ruler_dataset(str(tmp_path / "600")) == ours(generated[600], 600)


def test_length_column_and_default_generation_lengths(generated, tmp_path):
    rows = [
        {k: v for k, v in row.items() if k != "max_new_tokens"} | {"length": 4096} for row in packaged(generated[300])
    ]
    write_jsonl(tmp_path / "r.jsonl", rows)
    loaded = load_ruler_dataset(str(tmp_path / "r.jsonl"), lengths=[4096])
    # max_new_tokens comes from each task's own generation length (what generate_ruler writes).
    assert loaded == ours(generated[300], 4096)


def test_missing_columns_are_named(generated, tmp_path):
    rows = [{k: v for k, v in row.items() if k not in ("question", "answer")} for row in packaged(generated[300])]
    write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) question, answer \(or answers\)"):
        load_ruler_dataset(str(tmp_path / "r.jsonl"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": []}, "column answer must be a non-empty list"),
        ({"answer": ["ok", ""]}, "column answer must be a non-empty list"),
        ({"context": 3}, "column context must be a string"),
        ({"max_new_tokens": 0}, "column max_new_tokens must be an int >= 1"),
        ({"index": -1}, "column index must be an int >= 0"),
        ({"task": "unknown_task", "max_new_tokens": None}, "no default generation length"),
    ],
)
def test_bad_values_name_the_row_and_column(generated, tmp_path, change, message):
    rows = packaged(generated[300])
    rows[3] = rows[3] | change
    write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(ValueError, match=message) as info:
        load_ruler_dataset(str(tmp_path / "r.jsonl"))
    assert "row 4" in str(info.value)


def test_requests_the_source_cannot_meet(generated, tmp_path):
    write_jsonl(tmp_path / "flat.jsonl", packaged(generated[300]))
    with pytest.raises(ValueError, match="lengths cannot select rows"):
        load_ruler_dataset(str(tmp_path / "flat.jsonl"), lengths=[300])
    with pytest.raises(ValueError, match=r"tasks: .* holds no rows for \['cwe'\]; it has \['niah_multikey_3'"):
        load_ruler_dataset(str(tmp_path / "flat.jsonl"), tasks=["cwe", "vt"])
    hub_layout(tmp_path / "hub", generated, "jsonl")
    with pytest.raises(ValueError, match=r"lengths: .* holds no rows for \[1024\]; it has \[300, 600\]"):
        load_ruler_dataset(str(tmp_path / "hub"), lengths=[1024])
    # The same indexed rows twice (a copy in another format) would give duplicate ids downstream.
    write_jsonl(tmp_path / "twice" / "300" / "a.jsonl", generated[300])
    pq.write_table(pa.Table.from_pylist(generated[300]), tmp_path / "twice" / "300" / "copy.parquet")
    with pytest.raises(ValueError, match="two rows of task 'niah_single_1', length 300, index 0"):
        load_ruler_dataset(str(tmp_path / "twice"))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"tasks": "vt"}, "tasks"),
        ({"tasks": ["vt", "nope"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"lengths": [0]}, "lengths"),
        ({"lengths": [True]}, "lengths"),
        ({"lengths": 4096}, "lengths"),
        ({"source": ""}, "source"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path, kwargs, name):
    write_jsonl(tmp_path / "r.jsonl", [])
    kwargs = {"source": str(tmp_path / "r.jsonl"), **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        load_ruler_dataset(**kwargs)


def test_missing_local_paths_and_empty_folders(tmp_path):
    for missing in (tmp_path / "nope.jsonl", tmp_path / "a" / "b" / "c"):
        with pytest.raises(ValueError, match="no such file or directory"):
            load_ruler_dataset(str(missing))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("not data")
    with pytest.raises(ValueError, match="holds no RULER data"):
        load_ruler_dataset(str(tmp_path / "empty"))


def test_unreachable_dataset_name_suggests_a_local_path(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub client fail at once, as on a machine without network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not be loaded") as info:
        load_ruler_dataset("someone/ruler-that-is-not-cached", lengths=[4096])
    message = str(info.value)
    assert "RULER dataset option to a local path" in message and "data_dir=4096" in message


def test_dataset_names_load_one_data_dir_per_length(generated, tmp_path, monkeypatch):
    # A local copy of the dataset repository stands in for the hub: datasets itself resolves the name's data_dir.
    hub_layout(tmp_path / "repo", generated)
    real, calls = datasets.load_dataset, []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return real(str(tmp_path / "repo"), cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    loaded = load_ruler_dataset("someone/ruler", tasks=["niah_single_1", "vt"], lengths=[600, 300])
    assert calls == [("someone/ruler", {"data_dir": "600"}), ("someone/ruler", {"data_dir": "300"})]
    want = [r for n in (600, 300) for r in ours(generated[n], n) if r["task"] in ("niah_single_1", "vt")]
    assert loaded == want
